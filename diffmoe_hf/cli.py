"""The `diffmoe` command (also `python -m diffmoe_hf`): `convert` original checkpoints, `generate` images, `sample` and
`evaluate` for FID."""

import argparse
import os
import sys


def _add_convert_parser(subparsers) -> None:
    from diffmoe_hf.conversion import CONVERTERS

    parser = subparsers.add_parser(
        "convert",
        help="convert an original research checkpoint into a diffusers folder",
        description="Convert an original checkpoint into a Hub-ready folder (transformer/, scheduler/, "
        "model_index.json, model card). Nothing is written unless the conversion succeeds.",
    )
    parser.add_argument("family", choices=sorted(CONVERTERS), help="model family of the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="original .pt/.pth or .safetensors file")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--config", help="original training config (yaml) or constructor kwargs (json/yaml)")
    parser.add_argument("--preset", help="released architecture name, for checkpoints that do not record it")
    parser.add_argument("--num-experts", type=int, help="routed experts per MoE layer (bare Diff-MoE/DiT-MoE dicts)")
    parser.add_argument("--experts-per-token", type=int, help="experts per token (bare Diff-MoE/DiT-MoE dicts)")
    parser.add_argument("--formulation", help="ddpm or rf, for families trained with either (Diff-MoE, DiT-MoE)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default: ema)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="saved dtype")
    parser.add_argument("--vae", help="local AutoencoderKL folder to include as vae/")
    parser.add_argument("--id2label", help="JSON {class id: name}; ImageNet names are used for 1000 classes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects (only for trusted files)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--hub-layout", choices=["package", "remote_code"], default="package")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished folder to this Hub repo")
    parser.add_argument("--token", help="Hub token for --push-to-hub")
    parser.set_defaults(handler=_run_convert)


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a grid of class-conditional samples",
        description="Generate images for the given classes and write them as one PNG grid (one row per class). "
        "Without --model it samples the first model shipped in the package (diffmoe_hf.default_models(), "
        "digits-jitmoe: handwritten digits trained on scikit-learn's digits).",
    )
    parser.add_argument(
        "--model", default=None, help="converted folder or Hub repo id (default: the first model shipped in the package)"
    )
    parser.add_argument("--vae", help="AutoencoderKL folder or repo, for latent models saved without vae/")
    parser.add_argument(
        "--classes", nargs="+", default=None,
        help="class ids or names (default: every class of models with at most 10 classes, else the first 4)",
    )
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline default)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", help="diffusers scheduler class name, e.g. FlowMatchHeunDiscreteScheduler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default="samples.png", help="PNG file to write (default samples.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--min-cell-size", type=int, default=64,
        help="enlarge small images by an integer factor (nearest neighbour) to at least this many pixels (default 64)",
    )
    parser.add_argument("--padding", type=int, default=None, help="grey pixels between images (default: 4 for enlarged "
                        "images, else 0)")  # fmt: skip
    parser.set_defaults(handler=_run_generate)


def _add_evaluate_digits_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-digits",
        help="score a digits model (sklearn digits): accuracy, Frechet distance, c2st, memorisation",
        description="Generate samples of the 10 digit classes and score them against scikit-learn's digits "
        "(metrics in diffmoe_hf.evaluation.digits). Needs the [eval] extra.",
    )
    parser.add_argument("--model", required=True, help="model folder or Hub repo id of a 10-class 1-channel model")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples in total (default 1000)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline default)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    parser.set_defaults(handler=_run_evaluate_digits)


def _add_sample_parser(subparsers) -> None:
    from diffmoe_hf.evaluation.commands import add_sample_arguments

    parser = subparsers.add_parser(
        "sample",
        help="class-conditional samples for FID evaluation (ADM .npz), distributed and resumable",
        description="Sample a model for evaluation: the same images for any number of processes "
        "(`accelerate launch -m diffmoe_hf sample ...`), kept on disk as they are made so a restarted run continues. "
        "See diffmoe_hf.evaluation.sampling.",
    )
    add_sample_arguments(parser)
    parser.set_defaults(handler=_run_sample)


def _run_sample(args) -> None:
    from diffmoe_hf.evaluation.commands import run_sample

    run_sample(args)


def _add_evaluate_parser(subparsers) -> None:
    from diffmoe_hf.evaluation.commands import add_evaluate_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, Inception Score, precision and recall of a sample batch against a reference (JSON)",
        description="Score samples (ADM .npz or an image folder) against a reference batch under a named protocol "
        "(adm, jit, float-features); see diffmoe_hf.evaluation.evaluate. Needs the [eval] extra and torch-fidelity.",
    )
    add_evaluate_arguments(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> None:
    from diffmoe_hf.evaluation.commands import run_evaluate

    run_evaluate(args)


def _run_evaluate_digits(args) -> None:
    import json

    from diffmoe_hf import ClassConditionalMoEPipeline
    from diffmoe_hf.evaluation import DigitsReference, evaluate_pipeline

    pipe = ClassConditionalMoEPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    reference = DigitsReference(args.seed)
    metrics = evaluate_pipeline(pipe, args.num_samples, args.seed, reference=reference,
                                **{k: v for k, v in call_kwargs.items() if v is not None})  # fmt: skip
    print(f"held-out real digits: classifier accuracy {reference.heldout_accuracy():.3f}")
    for name, value in metrics.as_dict().items():
        print(f"{name:32s} {value:.4f}" if isinstance(value, float) else f"{name:32s} {value}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(metrics.as_dict(), f, indent=2)


def _run_convert(args) -> None:
    from diffmoe_hf.conversion import convert_checkpoint

    family_settings = {"num_experts": args.num_experts, "experts_per_token": args.experts_per_token,
                       "formulation": args.formulation}  # fmt: skip
    output = convert_checkpoint(
        args.family,
        args.checkpoint,
        args.output,
        config_path=args.config,
        preset=args.preset,
        weights=args.weights,
        dtype=args.dtype,
        vae_path=args.vae,
        id2label_path=args.id2label,
        overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint,
        max_shard_size=args.max_shard_size,
        hub_layout=args.hub_layout,
        push_to_hub=args.push_to_hub,
        token=args.token,
        **{name: value for name, value in family_settings.items() if value is not None},
    )
    print(f"Converted {args.checkpoint} -> {output}")


def _parse_classes(values: list[str] | None) -> list[int | str] | None:
    if values is None:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def _default_model() -> str:
    from diffmoe_hf.embedded_models import default_models

    models = default_models()
    if not models:
        raise FileNotFoundError("No model is shipped in this installation; pass --model <folder or Hub repo id>.")
    return next(iter(models.values()))


def _image_grid(images, columns: int, min_cell_size: int = 1, padding: int = 0):
    """One row per `columns` images; small images enlarged (nearest) to `min_cell_size`; `padding` grey pixels between."""
    from PIL import Image

    width, height = images[0].size
    factor = max(1, -(-min_cell_size // min(width, height)))  # ceil division: small images are enlarged whole
    if factor > 1:
        width, height = width * factor, height * factor
        images = [image.resize((width, height), Image.NEAREST) for image in images]
    rows = (len(images) + columns - 1) // columns
    step_x, step_y = width + padding, height + padding
    size = (columns * step_x - padding, rows * step_y - padding)
    grid = Image.new(images[0].mode, size, color="gray" if padding else "black")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * step_x, (index // columns) * step_y))
    return grid


def _run_generate(args) -> None:
    import torch
    from diffusers import schedulers

    from diffmoe_hf import ClassConditionalMoEPipeline

    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it.")
    if args.per_class < 1:
        raise ValueError("--per-class must be at least 1.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    components = {}
    if args.vae:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(args.vae)
    model = args.model or _default_model()
    pipe = ClassConditionalMoEPipeline.from_pretrained(model, **components).to(device)
    if args.scheduler:
        scheduler_class = getattr(schedulers, args.scheduler, None)
        if scheduler_class is None:
            raise ValueError(f"Unknown diffusers scheduler {args.scheduler!r}.")
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    num_classes = pipe.transformer.config.num_classes
    classes = _parse_classes(args.classes) or list(range(num_classes if num_classes <= 10 else 4))
    labels = [c for c in classes for _ in range(args.per_class)]
    call_kwargs = {}
    if args.steps is not None:
        call_kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        call_kwargs["guidance_scale"] = args.guidance_scale
    generator = torch.Generator(device).manual_seed(args.seed)
    images = pipe(class_labels=labels, generator=generator, **call_kwargs).images
    enlarged = min(images[0].size) < args.min_cell_size
    padding = args.padding if args.padding is not None else (4 if enlarged else 0)
    grid = _image_grid(images, columns=args.per_class, min_cell_size=args.min_cell_size, padding=padding)
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    partial = args.output + ".partial.png"
    grid.save(partial)
    os.replace(partial, args.output)
    print(f"Wrote {len(images)} images ({len(classes)} classes x {args.per_class}) from {model} to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmoe", description="Diffusion MoE transformers for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_evaluate_digits_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_evaluate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"diffmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
