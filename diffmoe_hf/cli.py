"""The `diffmoe` command (also `python -m diffmoe_hf`): `convert` original checkpoints, `generate` images,
`evaluate-digits`, `sample` and `evaluate` for FID.

Arguments are checked before anything slow happens (loading a model, sampling): a bad value, an unwritable `--output`
or a grid too large to write stops the command at once with one line that says what is wrong and what to do.
"""

import argparse
import difflib
import logging
import os
import sys
import textwrap
from dataclasses import dataclass

from diffmoe_hf.cli_expert_offload import (
    add_expert_offload_arguments,
    check_expert_offload_arguments,
    load_pipeline_with_expert_offload,
)
from diffmoe_hf.cli_sampling import (
    CommandError,
    check_device,
    check_writable_folder,
    checked_model_source,
    guidance_scale_argument,
    select_scheduler,
)


DEFAULT_BATCH_SIZE = 64


# argument types: argparse reports their messages as "argument --NAME: MESSAGE" (exit status 2)
def _whole_number(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _seed(text: str) -> int:
    return _whole_number(text, 0, 2**63 - 1)  # what torch.Generator.manual_seed takes on every device


def _digits_num_samples(text: str) -> int:
    from diffmoe_hf.evaluation.digits import check_num_samples

    try:
        return check_num_samples(_positive_int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("num_samples must be", "must be", 1)) from None


def _taking(option: str) -> str:
    """The families whose converter takes `option` (`family_options`), e.g. `"spatial-temporal-moe / dit-moe"`."""
    from diffmoe_hf.conversion import family_options
    from diffmoe_hf.families import FAMILIES

    return " / ".join(family for family in FAMILIES if option in family_options(family))


def _add_convert_parser(subparsers) -> None:
    from diffmoe_hf.dtypes import DTYPES
    from diffmoe_hf.families import FAMILIES, family_names

    description = textwrap.fill(
        "Convert an original checkpoint into a Hub-ready folder (transformer/, scheduler/, model_index.json, model "
        "card). Nothing is written unless the conversion succeeds; what an interrupted run left next to --output is "
        "cleaned up (or restored) by the next one.",
        width=100,
    )
    families = "\n".join(textwrap.indent(family.describe(), "  ") for family in FAMILIES.values())
    parser = subparsers.add_parser(
        "convert",
        help="convert an original research checkpoint into a diffusers folder",
        description=f"{description}\n\nFAMILY is one of these ids (an alias, a family's earlier id, works too):\n"
        f"{families}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "family",
        metavar="FAMILY",
        choices=family_names(),
        help=f"model family of the checkpoint: {', '.join(FAMILIES)} (or an alias; see above)",
    )
    parser.add_argument("--checkpoint", required=True, help="original .pt/.pth or .safetensors file")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--config", help="original training config (yaml) or constructor kwargs (json/yaml)")
    parser.add_argument(
        "--preset",
        help="the family's name of a released architecture (e.g. Diff-MoE-XL/2, DiT-MoE-XL/2, DSMoE-S-E16; the "
        "original code's names, e.g. DiT-XL/2, are accepted within their family), for checkpoints that do not "
        "record it",
    )
    parser.add_argument(
        "--num-experts", type=int, help=f"routed experts per MoE layer (bare {_taking('num_experts')} dicts)"
    )
    parser.add_argument(
        "--experts-per-token", type=int, help=f"experts per token (bare {_taking('experts_per_token')} dicts)"
    )
    parser.add_argument(
        "--formulation", help=f"ddpm or rf, for families trained with either ({_taking('formulation')})"
    )
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default: ema)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="saved dtype")
    parser.add_argument("--vae", help="AutoencoderKL folder (or Hub repo id) to include as vae/")
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
        "--model",
        default=None,
        help="converted folder or Hub repo id (default: the first model shipped in the package)",
    )
    parser.add_argument("--vae", help="AutoencoderKL folder or repo, for latent models saved without vae/")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="class ids or names (default: every class of models with at most 10 classes, else the first 4)",
    )
    parser.add_argument("--per-class", type=_positive_int, default=4, help="images per class (default 4)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per pipeline call (default {DEFAULT_BATCH_SIZE}); bounds the memory of large grids. A --seed "
        "reproduces its images for the same --batch-size; another batch size may change them (the batches draw their "
        "noise in turn from one generator, and DiffMoE of Shi et al., dynamic-token-moe, routes over the whole "
        "batch).",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="denoising steps (default: the pipeline default; at most the scheduler's num_train_timesteps)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=guidance_scale_argument,
        default=None,
        help="classifier-free guidance scale (finite, >= 0)",
    )
    parser.add_argument(
        "--scheduler",
        help="diffusers scheduler class name, one the model's formulation can use (e.g. FlowMatchEulerDiscreteScheduler"
        " for JiT models); an unusable one is refused with the list",
    )
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--output",
        default="samples.png",
        help="image file to write, in the format its extension names (.png, .jpg, .webp, ...; default samples.png)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--min-cell-size",
        type=_positive_int,
        default=64,
        help="enlarge small images by an integer factor (nearest neighbour) to at least this many pixels (default 64)",
    )
    parser.add_argument(
        "--padding",
        type=_non_negative_int,
        default=None,
        help="grey pixels between images (default: 4 for enlarged images, else 0)",
    )
    add_expert_offload_arguments(parser)
    parser.set_defaults(handler=_run_generate)


def _add_evaluate_digits_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-digits",
        help="score a digits model (sklearn digits): accuracy, Frechet distance, c2st, memorisation",
        description="Generate samples of the 10 digit classes and score them against scikit-learn's digits "
        "(metrics in diffmoe_hf.evaluation.digits). Needs the [eval] extra.",
    )
    parser.add_argument("--model", required=True, help="model folder or Hub repo id of a 10-class 1-channel model")
    parser.add_argument(
        "--num-samples",
        type=_digits_num_samples,
        default=1000,
        help="samples in total, a multiple of 10, at least 360 (default 1000)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help="denoising steps (default: the pipeline default)"
    )
    parser.add_argument(
        "--guidance-scale", type=guidance_scale_argument, default=None, help="classifier-free guidance scale"
    )
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_expert_offload_arguments(parser)
    parser.set_defaults(handler=_run_evaluate_digits)


def _add_sample_parser(subparsers) -> None:
    from diffmoe_hf.cli_evaluation import add_sample_arguments, run_sample

    parser = subparsers.add_parser(
        "sample",
        help="class-conditional samples for FID evaluation (ADM .npz), distributed and resumable",
        description="Sample a model for evaluation: the same images for any number of processes "
        "(`accelerate launch -m diffmoe_hf sample ...`), kept on disk as they are made so a restarted run continues. "
        "See diffmoe_hf.evaluation.sampling.",
    )
    add_sample_arguments(parser)
    parser.set_defaults(handler=run_sample)


def _add_evaluate_parser(subparsers) -> None:
    from diffmoe_hf.cli_evaluation import add_evaluate_arguments, run_evaluate

    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, Inception Score, precision and recall of a sample batch against a reference (JSON)",
        description="Score samples (ADM .npz or an image folder) against a reference batch under a named protocol "
        "(adm, jit, float-features); see diffmoe_hf.evaluation.evaluate. Needs the [eval] extra and torch-fidelity.",
    )
    add_evaluate_arguments(parser)
    parser.set_defaults(handler=run_evaluate)


def _run_evaluate_digits(args) -> None:
    import json

    import torch

    from diffmoe_hf.atomic_files import write_text_atomically
    from diffmoe_hf.cli_evaluation import check_output_file
    from diffmoe_hf.evaluation import DigitsReference, evaluate_pipeline
    from diffmoe_hf.evaluation.digits import check_digits_pipeline

    if args.output:
        check_output_file(args.output, args.overwrite, ".json", require_extension=False)
    cpu = torch.device("cpu")
    check_expert_offload_arguments(args, args.model, cpu, torch.float32)
    pipe = load_pipeline_with_expert_offload(args.model, args, cpu, torch.float32)
    check_digits_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    reference = DigitsReference(args.seed)
    metrics = evaluate_pipeline(
        pipe,
        args.num_samples,
        args.seed,
        reference=reference,
        **{k: v for k, v in call_kwargs.items() if v is not None},
    )
    print(f"held-out real digits: classifier accuracy {reference.heldout_accuracy():.3f}")
    for name, value in metrics.as_dict().items():
        print(f"{name:32s} {value:.4f}" if isinstance(value, float) else f"{name:32s} {value}")
    if args.output:
        write_text_atomically(args.output, json.dumps(metrics.as_dict(), indent=2) + "\n")


def _run_convert(args) -> None:
    from diffmoe_hf.conversion import convert_checkpoint

    family_settings = {
        "num_experts": args.num_experts,
        "experts_per_token": args.experts_per_token,
        "formulation": args.formulation,
    }
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


def _default_model() -> str:
    from diffmoe_hf.embedded_models import default_models

    models = default_models()
    if not models:
        raise FileNotFoundError("No model is shipped in this installation; pass --model <folder or Hub repo id>.")
    return next(iter(models.values()))


def _image_format(path: str) -> str:
    """The PIL format that `--output`'s extension names (`.png` -> PNG, `.jpg` -> JPEG, `.webp` -> WEBP, ...), if PIL
    can write it; else a `CommandError` listing the extensions it can."""
    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    extensions = Image.registered_extensions()
    writable = sorted(ext for ext, image_format in extensions.items() if image_format in Image.SAVE)
    if extension not in writable:
        said = f"has the extension {extension!r}" if extension else "has no extension"
        raise CommandError(
            f"--output {path!r} {said}, which names no image format PIL can write; end it with one of "
            f"{', '.join(ext for ext in writable if ext in ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif'))} "
            "(.png keeps the samples lossless)."
        )
    return extensions[extension]


def _check_output(path: str, overwrite: bool) -> str:
    """Refuses an `--output` that cannot be written, before anything is loaded or sampled; returns its image format."""
    if not path.strip():
        raise CommandError("--output is empty; name the image file to write, e.g. --output samples.png.")
    if os.path.isdir(path):
        raise CommandError(
            f"--output {path} is a folder; name the PNG file to write, e.g. --output "
            f"{os.path.join(path, 'samples.png')}."
        )
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it.")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f"--output {path}")
    return _image_format(path)


def _write_image(image, path: str, image_format: str) -> None:
    """Writes `image` to `path` in `image_format` (a PIL format name) all-or-nothing
    (`atomic_files.written_atomically`)."""
    from diffmoe_hf.atomic_files import written_atomically

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with written_atomically(path, suffix=os.path.splitext(path)[1]) as partial:
            image.save(partial, format=image_format)
    except OSError as err:
        raise CommandError(f"Could not write {path}: {err.strerror or err}. Nothing was written.") from None


@dataclass(frozen=True)
class GridLayout:
    """
    Where `count` images of `image_size` (width, height) pixels go in a grid of `columns` columns: images smaller
    than `min_cell_size` are enlarged by the integer `factor` (nearest neighbour), `padding` grey pixels between them.
    """

    count: int
    columns: int
    image_size: tuple[int, int]
    factor: int
    padding: int

    @classmethod
    def for_images(
        cls, count: int, columns: int, image_size: tuple[int, int], min_cell_size: int = 1, padding: int | None = None
    ) -> "GridLayout":
        """`padding=None`: 4 pixels when the images are enlarged, else 0."""
        factor = max(1, -(-min_cell_size // min(image_size)))  # ceil division: small images are enlarged whole
        padding = padding if padding is not None else (4 if factor > 1 else 0)
        return cls(count, columns, tuple(image_size), factor, padding)

    @property
    def cell(self) -> tuple[int, int]:
        return self.image_size[0] * self.factor, self.image_size[1] * self.factor

    @property
    def size(self) -> tuple[int, int]:
        rows = -(-self.count // self.columns)
        width, height = self.cell
        return self.columns * (width + self.padding) - self.padding, rows * (height + self.padding) - self.padding

    def paste(self, grid, index: int, image) -> None:
        """Puts `image` (of `image_size`) at position `index` (row-major) of `grid`."""
        from PIL import Image

        if image.size != self.image_size:
            raise ValueError(f"The grid expects {self.image_size} images, got one of {image.size}.")
        if self.factor > 1:
            image = image.resize(self.cell, Image.NEAREST)
        step_x, step_y = self.cell[0] + self.padding, self.cell[1] + self.padding
        grid.paste(image, ((index % self.columns) * step_x, (index // self.columns) * step_y))

    def new_grid(self, mode: str):
        from PIL import Image

        return Image.new(mode, self.size, color="gray" if self.padding else "black")


def _image_grid(images, columns: int, min_cell_size: int = 1, padding: int = 0):
    """One row per `columns` images; small images enlarged (nearest) to `min_cell_size`; `padding` grey pixels between."""
    layout = GridLayout.for_images(len(images), columns, images[0].size, min_cell_size, padding)
    grid = layout.new_grid(images[0].mode)
    for index, image in enumerate(images):
        layout.paste(grid, index, image)
    return grid


def _image_size(pipe) -> tuple[int, int]:
    """(width, height) in pixels of the pipeline's images: the transformer's sample size, times the VAE's
    downsampling (2 per encoder block after the first) for latent models."""
    size = pipe.transformer.config.sample_size
    if pipe.vae is not None:
        size *= 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return size, size


def _class_ids(pipe, values: list[str] | None) -> list[int]:
    """`--classes` (ids or names) as class ids, or the default classes; unknown ones name the close matches."""
    num_classes = pipe.transformer.config.num_classes
    if values is None:
        return list(range(num_classes if num_classes <= 10 else 4))
    by_lower_name = {name.lower(): class_id for name, class_id in pipe.labels.items()}
    ids = []
    for value in values:
        if value.lstrip("-").isdigit():
            class_id = int(value)
            if not 0 <= class_id <= num_classes:
                raise CommandError(
                    f"--classes {value}: this model has the classes 0..{num_classes - 1} (and {num_classes}, the "
                    "null class, for unconditional samples)."
                )
        elif value.lower() in by_lower_name:
            class_id = by_lower_name[value.lower()]
        elif not pipe.labels:
            raise CommandError(
                f"--classes {value}: this model has no class names; give class ids 0..{num_classes - 1}."
            )
        else:
            spelled = {name.lower(): name for name in pipe.labels}
            close = difflib.get_close_matches(value.lower(), spelled, n=5, cutoff=0.6)
            if close:
                hint = "close names: " + ", ".join(f"{spelled[c]!r} (class {by_lower_name[c]})" for c in close)
            else:
                hint = "no name is close; the names are the id2label entries of the model's model_index.json"
            raise CommandError(
                f"--classes {value!r} is not a class name of this model ({hint}). Class ids "
                f"0..{num_classes - 1} work too."
            )
        ids.append(class_id)
    return ids


def _check_steps(pipe, steps: int | None) -> None:
    from diffmoe_hf.formulations import max_inference_steps

    limit = max_inference_steps(pipe.scheduler)
    if steps is not None and steps > limit:
        raise CommandError(
            f"--steps {steps} is more than {type(pipe.scheduler).__name__} can take for this model: at most {limit} "
            "(its num_train_timesteps). Omit --steps for the pipeline's default."
        )


def _check_grid_size(layout: GridLayout) -> None:
    from PIL import Image

    width, height = layout.size
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise CommandError(
            f"The grid of {layout.count} images would be {width} x {height} pixels, more than PIL opens without a "
            f"decompression-bomb error ({Image.MAX_IMAGE_PIXELS} pixels). Ask for fewer --classes or --per-class, or "
            "a smaller --min-cell-size."
        )


def _run_generate(args) -> None:
    try:
        _generate(args)
    except KeyboardInterrupt:  # the grid is written at the very end, all-or-nothing
        raise KeyboardInterrupt(f"nothing was written ({args.output} is as it was)") from None


def _generate(args) -> None:
    image_format = _check_output(args.output, args.overwrite)
    model = checked_model_source(args.model or _default_model())

    import numpy as np
    import torch

    device = check_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components = {}
    if args.vae:
        from diffmoe_hf.conversion.vae_source import load_vae

        components["vae"] = load_vae(args.vae)
    check_expert_offload_arguments(args, model, device, torch.float32)
    pipe = load_pipeline_with_expert_offload(model, args, device, torch.float32, **components)
    in_channels = pipe.transformer.config.in_channels
    if pipe.vae is None and in_channels not in (1, 3):
        raise CommandError(
            f"{model} has no VAE (no vae/ folder) to decode its {in_channels}-channel latents into images; pass "
            "--vae FOLDER_OR_REPO with the AutoencoderKL the model was trained with (e.g. stabilityai/sd-vae-ft-mse)."
        )
    select_scheduler(pipe, args.scheduler)
    _check_steps(pipe, args.steps)
    classes = _class_ids(pipe, args.classes)
    labels = [c for c in classes for _ in range(args.per_class)]
    layout = GridLayout.for_images(len(labels), args.per_class, _image_size(pipe), args.min_cell_size, args.padding)
    _check_grid_size(layout)

    call_kwargs = {"output_type": "np"}
    if args.steps is not None:
        call_kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        call_kwargs["guidance_scale"] = args.guidance_scale
    generator = torch.Generator(device).manual_seed(args.seed)
    num_batches = -(-len(labels) // args.batch_size)
    grid = None
    for batch_index, start in enumerate(range(0, len(labels), args.batch_size)):
        if num_batches > 1:
            pipe.set_progress_bar_config(desc=f"batch {batch_index + 1}/{num_batches}")
        batch = labels[start : start + args.batch_size]
        images = pipe(class_labels=batch, generator=generator, **call_kwargs).images
        if not np.isfinite(images).all():
            raise CommandError(
                "The model produced NaN or infinite values, so no grid was written. Its weights or this sampler "
                "setting are broken: try the folder's own scheduler and default --guidance-scale, or re-convert it."
            )
        for offset, image in enumerate(pipe.numpy_to_pil(images)):
            if grid is None:
                grid = layout.new_grid(image.mode)
            layout.paste(grid, start + offset, image)
    _write_image(grid, args.output, image_format)
    print(f"Wrote {len(labels)} images ({len(classes)} classes x {args.per_class}) from {model} to {args.output}")


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
    # the package's warnings (e.g. what the converter cleaned up) go to stderr as "diffmoe COMMAND: ..." lines
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setFormatter(logging.Formatter(f"diffmoe {args.command}: %(message)s"))
    package_logger = logging.getLogger("diffmoe_hf")
    package_logger.addHandler(warnings)
    try:
        args.handler(args)
    except KeyboardInterrupt as interrupt:
        if not interrupt.args:  # a command that says what it kept raises KeyboardInterrupt("what was kept")
            raise
        print(f"diffmoe {args.command}: interrupted; {interrupt}", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, ImportError) as err:
        if isinstance(err, OSError) and err.strerror and err.filename:
            err = f"{err.strerror}: {err.filename}"
        print(f"diffmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        package_logger.removeHandler(warnings)
    return 0
