"""
Evaluates the digits models trained by `training/recipes/digits.sh` and writes their model cards (the recipe's last
step; see that script for the whole recipe).

    python -m diffmoe_hf.training.digits_recipe --runs_dir runs/digits --models jitmoe dsmoe [--ship]

For each `<runs_dir>/<model>/` pipeline folder: 1000 samples (seed 0, 25 steps, the pipeline's default guidance and
scheduler) scored with `diffmoe_hf.evaluation.digits`, a 10 x 8 sample grid `samples.png`, `metrics.json` and a model
card `README.md` with the recipe, the training time and the metric table against the targets the model cards state. `--ship`
copies the folder (weights, configs, card, grid, metrics) to `diffmoe_hf/data/models/digits-<model>/`.
"""

import argparse
import json
import os
import shutil

import torch

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.embedded_models import embedded_models_root
from diffmoe_hf.evaluation.digits import DigitsReference, evaluate_pipeline


NUM_SAMPLES, SEED, STEPS = 1000, 0, 25
# written into each model's model_index.json as its default guidance scale, chosen on the guidance sweeps quoted in
# NOTES (JiT's formulation default, 2.9 with an interval, is the ImageNet setting; 1.5 is the scale of the
# demo-digits feasibility study)
GUIDANCE_SCALES = {"jitmoe": 1.5, "dsmoe": 1.25}
# the quality targets the model cards state (1000 samples, fixed seed, default sampler)
TARGETS = {
    "accuracy": (">=", 0.98),
    "worst_class_accuracy": (">=", 0.90),
    "frechet_over_floor": ("<=", 3.0),
    "c2st_accuracy": ("<=", 0.80),
    "memorisation_rate": ("<=", 0.10),
}
DESCRIPTIONS = {
    "jitmoe": "JiTMoE (`JiTTransformer2DModel` with MoE blocks): x-prediction flow matching in pixel space",
    "dsmoe": "DSMoE (`DSMoETransformer2DModel`, a latent-space family) run in pixel space: rectified flow, "
    "1 channel, no VAE",
}
# measured once with `diffmoe evaluate-digits --steps 25 --guidance-scale G` (1000 samples, seed 0) and kept in the cards
NOTES = {
    "jitmoe": "At JiT's formulation default (guidance 2.9 on the interval (0.1, 1)) the same model scores accuracy "
    "1.000, Frechet 6.4x the floor, c2st 0.938, memorisation 0.033, missing the Frechet and c2st targets; without "
    "guidance (1.0) accuracy 0.986, worst class 0.93, Frechet 1.5x, c2st 0.639; at 2.0 Frechet 3.7x and c2st 0.847. "
    "Hence the folder's default of 1.5 (the scale of the digits feasibility study).",
    "dsmoe": "The guidance scale trades accuracy for fidelity: at 1.0 (no guidance) the same model scores accuracy "
    "0.982, worst class 0.92, Frechet 2.0x the floor, c2st 0.633; at 1.5 accuracy 0.998 but Frechet 3.2x (missed), "
    "c2st 0.699; at 2.0 Frechet 5.1x and c2st 0.814 (both missed), hence the folder's default of 1.25. Trained for "
    "2000 steps like the JiTMoE model, it missed the Frechet target (3.5x the floor at 1.0, 4.5x at 1.5): its samples were "
    "blurrier than JiTMoE's x-prediction samples.",
}
FILES = (
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "README.md",
    "samples.png",
    "metrics.json",
)


def meets(name: str, value: float) -> bool:
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value <= bound


def sample_grid(pipe, per_class: int = 8):
    from diffmoe_hf.cli import _image_grid

    labels = [c for c in range(10) for _ in range(per_class)]
    generator = torch.Generator().manual_seed(SEED)
    images = pipe(class_labels=labels, num_inference_steps=STEPS, generator=generator).images
    return _image_grid(images, columns=per_class, min_cell_size=64, padding=4)


def model_card(model: str, pipe, metrics: dict, train_info: dict) -> str:
    transformer = pipe.transformer
    params = sum(p.numel() for p in transformer.parameters())
    formulation = transformer.config.formulation
    guidance = metrics["guidance_scale"]
    rows = []
    for name, label in [
        ("accuracy", "class-conditional accuracy"),
        ("worst_class_accuracy", "worst class"),
        ("frechet_over_floor", "Frechet distance / real floor"),
        ("c2st_accuracy", "c2st accuracy"),
        ("memorisation_rate", "memorisation rate"),
    ]:
        op, bound = TARGETS[name]
        rows.append(
            f"| {label} | {metrics[name]:.3f} | {op} {bound} | {'yes' if meets(name, metrics[name]) else 'NO'} |"
        )
    rows.append(
        f"| Frechet distance (floor) | {metrics['frechet_distance']:.3f} ({metrics['frechet_floor']:.3f}) | | |"
    )
    rows.append(f"| nearest-train distance ratio | {metrics['nearest_train_distance_ratio']:.3f} | about 1 | |")
    rows.append(f"| diversity ratio | {metrics['diversity_ratio']:.3f} | about 1 | |")
    table = "\n".join(rows)
    config = json.dumps({k: v for k, v in transformer.config.items() if not k.startswith("_")}, sort_keys=True)
    return f"""---
library_name: diffusers
license: apache-2.0
tags: [diffmoe-hf, class-conditional, mixture-of-experts, digits]
---

# digits-{model}

{DESCRIPTIONS[model]}, trained from scratch on the 1437 training digits of scikit-learn's `load_digits` (the fixed
stratified split of `diffmoe_hf.evaluation.digits.load_digits_split(seed=0)`; the 360 held-out digits were never
seen), upsampled 8x8 -> 16x16 by pixel replication. 10 classes, named "0, zero" ... "9, nine". {params:,} parameters
(float32, {train_info["weights_bytes"] / 1e6:.2f} MB of safetensors). Shipped inside the `diffmoe-hf` package so that
`diffmoe generate` works offline.

![samples](samples.png)

```python
from diffmoe_hf import ClassConditionalMoEPipeline, default_models

pipe = ClassConditionalMoEPipeline.from_pretrained(default_models()["digits-{model}"])
images = pipe(class_labels=["seven", 3], num_inference_steps={STEPS}).images
```

## Training recipe

```bash
bash training/recipes/digits.sh runs/digits          # data, both models, evaluation, cards; seed 0
```

`training/train_class_conditional.py` with `--preset {train_info["preset"]} --model_family {train_info["family"]}`,
fresh weights, formulation `{formulation}`, {train_info["steps"]} steps of batch 64, AdamW lr 1e-3 (constant),
EMA 0.999 (the shipped weights), label dropout 0.1, seed 0. Transformer config: `{config}`.

Training took {train_info["seconds"] / 60:.1f} minutes of wall-clock time on CPU (1 thread, `OMP_NUM_THREADS=1`) on
a 2-core machine (load average {train_info["load"]} when it finished; the recipe trains the models one after the
other).

## Quality

`diffmoe evaluate-digits --model <this folder> --steps {STEPS}`: {NUM_SAMPLES} samples (100 per class, seed {SEED}),
{STEPS} steps of the default scheduler (`{type(pipe.scheduler).__name__}`), the folder's default guidance scale
{guidance} (`default_guidance_scale` in `model_index.json`).
Metric definitions in `diffmoe_hf/evaluation/digits.py`; the classifier scores
{metrics["heldout_classifier_accuracy"]:.3f} on held-out real digits.

| metric | value | target | met |
|---|---|---|---|
{table}

{NOTES[model]}

## Limits

A toy: 16x16 grayscale digits, 10 classes, a model of a few hundred thousand parameters. It shows the package's
training, sampling and evaluation path end to end; it says nothing about the quality of the full-size families.
"""


def finalize(runs_dir: str, model: str, ship: bool) -> dict:
    folder = os.path.join(runs_dir, model)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    guidance_scale = GUIDANCE_SCALES[model]
    index["default_guidance_scale"] = guidance_scale
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    assert pipe.config.default_guidance_scale == guidance_scale
    pipe.set_progress_bar_config(disable=True)
    reference = DigitsReference(SEED)
    result = evaluate_pipeline(pipe, NUM_SAMPLES, SEED, reference=reference, num_inference_steps=STEPS).as_dict()
    result["frechet_over_floor"] = result["frechet_distance"] / result["frechet_floor"]
    result["heldout_classifier_accuracy"] = reference.heldout_accuracy()
    result["num_inference_steps"] = STEPS
    result["guidance_scale"] = guidance_scale
    result["meets_targets"] = all(meets(name, result[name]) for name in TARGETS)
    sample_grid(pipe).save(os.path.join(folder, "samples.png"))

    with open(os.path.join(runs_dir, f"{model}.train_info.json"), encoding="utf-8") as f:
        train_info = json.load(f)
    train_info["weights_bytes"] = os.path.getsize(
        os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    )
    result["training"] = train_info
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, pipe, result, train_info))
    if ship:
        target = os.path.join(embedded_models_root(), f"digits-{model}")
        shutil.rmtree(target, ignore_errors=True)
        for name in FILES:
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", required=True, help="the recipe's output folder")
    parser.add_argument("--models", nargs="+", default=["jitmoe", "dsmoe"], choices=sorted(DESCRIPTIONS))
    parser.add_argument("--ship", action="store_true", help="copy the results into diffmoe_hf/data/models/")
    args = parser.parse_args(argv)
    for model in args.models:
        result = finalize(args.runs_dir, model, args.ship)
        print(model, json.dumps({k: v for k, v in result.items() if k != "training"}, indent=1))


if __name__ == "__main__":
    main()
