#!/usr/bin/env bash
# Fine-tunes the shipped digits-jitmoe model on classes it never saw (outline shapes drawn with PIL, no download)
# and trains the same architecture from scratch with the same recipe for the same steps, then scores both. One
# command, fixed seed, CPU:
#
#     bash training/recipes/new_classes_shapes.sh [OUTPUT_DIR=runs/shapes] [STEPS="100 400 1500"]
#
# Steps: (1) 48 augmented images per shape (circle, cross, square, triangle; 16x16 grayscale) as an image folder
# (diffmoe_hf.training.shapes_data); (2) for each step count: train_class_conditional.py from digits-jitmoe with
# --new_classes replace (full fine-tuning; the class table is rebuilt for the 4 shapes plus the null class, new rows
# from the mean of the digit rows), and from a preset with fresh weights of the same architecture; at the last step
# count also a LoRA fine-tune (rank 8, class table and LoRA trained); (3) scoring with
# diffmoe_hf.training.shapes_recipe (a classifier fitted on real shapes: sample accuracy per class, diversity).
# Needs the [train] and [eval] extras. Environment: SEED (0), PYTHON (python), OMP_NUM_THREADS (1), NICE (10).
set -euo pipefail
OUT=${1:-runs/shapes}
STEP_COUNTS=${2:-"100 400 1500"}
SEED=${SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
RUN=(nice -n "${NICE:-10}" "$PYTHON")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIGITS=$("$PYTHON" -c "from diffmoe_hf import default_models; print(default_models()['digits-jitmoe'])" 2>/dev/null)

mkdir -p "$OUT"
[ -d "$OUT/data/train" ] || "${RUN[@]}" -m diffmoe_hf.training.shapes_data --output_dir "$OUT/data/train" \
  --per_class 48 --resolution 16 --seed "$SEED"

# the digits recipe's settings (training/recipes/digits.sh), without EMA (short runs)
COMMON=(--train_data_dir "$OUT/data/train" --resolution 16 --seed "$SEED" --train_batch_size 64
        --learning_rate 1e-3 --checkpointing_steps 100000 --validation_epochs 0 --report_to none)
# digits-jitmoe's architecture (training/recipes/digits.sh)
OVERRIDES='{"in_channels": 1, "patch_size": 4, "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16,
            "mlp_ratio": 2.0, "bottleneck_dim": 16, "in_context_len": 0, "moe_layers": [1, 3], "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}'

train() {  # NAME STEPS ARGS...: one run into $OUT/NAME, its time in $OUT/NAME.train_info.json (a finished run is kept)
  local name=$1 steps=$2
  shift 2
  if [ -f "$OUT/$name/model_index.json" ]; then echo "kept $name (finished before)"; return; fi
  local start
  start=$(date +%s)
  "${RUN[@]}" "$ROOT/training/train_class_conditional.py" "$@" --max_train_steps "$steps" "${COMMON[@]}" \
    --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  local seconds=$(( $(date +%s) - start ))
  local load
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  printf '{"steps": %s, "seconds": %s, "load": "%s"}\n' "$steps" "$seconds" "$load" > "$OUT/$name.train_info.json"
  echo "trained $name in $seconds s (log: $OUT/$name.log, load average $load)"
}

RUNS=()
for steps in $STEP_COUNTS; do
  train "finetune-$steps" "$steps" --pretrained_model_name_or_path "$DIGITS" --new_classes replace
  train "scratch-$steps" "$steps" --preset JiT-B/16 --model_family jit --model_config_overrides "$OVERRIDES"
  RUNS+=("finetune-$steps" "scratch-$steps")
done
train "lora-$steps" "$steps" --pretrained_model_name_or_path "$DIGITS" --new_classes replace --use_lora --rank 8
RUNS+=("lora-$steps")

"${RUN[@]}" -m diffmoe_hf.training.shapes_recipe --runs_dir "$OUT" --runs "${RUNS[@]}"
