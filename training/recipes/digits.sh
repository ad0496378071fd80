#!/usr/bin/env bash
# Trains the two digits models shipped in diffmoe_hf/data/models/ from scratch on CPU, evaluates them and
# writes their model cards. One command, fixed seed:
#
#     bash training/recipes/digits.sh [OUTPUT_DIR=runs/digits] [MODELS="jitmoe dsmoe"]
#
# Steps: (1) the 1437 training digits of the fixed split as a 16x16 image folder (diffmoe_hf.training.digits_data);
# (2) train_class_conditional.py from a preset with fresh weights, 1 channel, pixel space, no VAE; (3) evaluation
# with the digits metrics (1000 samples, seed 0, 25 steps), sample grid and model card
# (diffmoe_hf.training.digits_recipe). SHIP=1 copies the finished folders into diffmoe_hf/data/models/digits-<model>/.
# Needs the [train] and [eval] extras. Environment: SEED (0), STEPS (per model: 2000 JiTMoE, 6000 DSMoE), PYTHON
# (python), OMP_NUM_THREADS (1).
set -euo pipefail
OUT=${1:-runs/digits}
MODELS=${2:-"jitmoe dsmoe"}
SEED=${SEED:-0}
# One intra-op thread: on a shared 2-core machine two threads per process were 10x slower (oversubscription).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

mkdir -p "$OUT"
[ -d "$OUT/data/train" ] || "$PYTHON" -m diffmoe_hf.training.digits_data --output_dir "$OUT/data/train" --resolution 16

COMMON=(--train_data_dir "$OUT/data/train" --resolution 16 --seed "$SEED"
        --train_batch_size 64 --learning_rate 1e-3 --use_ema --ema_decay 0.999
        --checkpointing_steps 100000 --validation_epochs 100000 --validation_class_labels 0,1,2,3,4,5,6,7,8,9
        --validation_inference_steps 25 --report_to tensorboard)

for model in $MODELS; do
  case $model in
    jitmoe)  # JiTMoE: x-prediction flow in pixel space; hidden 64, 4 blocks, MoE in blocks 1 and 3 (4 experts, top 2)
      PRESET=JiT-B/16 FAMILY=jit MODEL_STEPS=${STEPS:-2000}
      OVERRIDES='{"in_channels": 1, "patch_size": 4, "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16,
                  "mlp_ratio": 2.0, "bottleneck_dim": 16, "in_context_len": 0, "moe_layers": [1, 3], "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}' ;;
    dsmoe)   # DSMoE (latent family) run in pixel space: rectified flow, 1 channel, no VAE; same size as above,
             # trained 3x longer (at 2000 steps its samples were too blurry for the Frechet target)
      PRESET=DSMoE-S-E16 FAMILY=dsmoe MODEL_STEPS=${STEPS:-6000}
      OVERRIDES='{"in_channels": 1, "out_channels": 1, "patch_size": 4, "num_layers": 4, "num_attention_heads": 4,
                  "attention_head_dim": 16, "mlp_ratio": 2.0, "moe_layers": [1, 3], "num_experts": 4,
                  "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64}' ;;
    *) echo "unknown model $model (jitmoe, dsmoe)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  "$PYTHON" "$ROOT/training/train_class_conditional.py" --preset "$PRESET" --model_family "$FAMILY" \
    --model_config_overrides "$OVERRIDES" --max_train_steps "$MODEL_STEPS" "${COMMON[@]}" \
    --output_dir "$OUT/$model" > "$OUT/$model.log" 2>&1
  seconds=$(( $(date +%s) - start ))
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  printf '{"preset": "%s", "family": "%s", "steps": %s, "seconds": %s, "load": "%s"}\n' \
    "$PRESET" "$FAMILY" "$MODEL_STEPS" "$seconds" "$load" > "$OUT/$model.train_info.json"
  echo "trained $model in $seconds s (log: $OUT/$model.log, load average $load)"
done

"$PYTHON" -m diffmoe_hf.training.digits_recipe --runs_dir "$OUT" --models $MODELS ${SHIP:+--ship}
