"""`diffmoe sample` and `diffmoe evaluate`: argument definitions and runners (the CLI delegates here).

Part of the command-line layer, with `cli.py`: it loads the pipeline and reads a folder's published settings, which
the evaluation library below it (`diffmoe_hf.evaluation`) does not. A user's mistake is raised as `ValueError` or
`OSError`, which `cli.main` reports as one line with exit status 2 (this module does not import `cli`, which imports
it).
"""

import argparse
import json
import os
import sys

from diffmoe_hf.atomic_files import write_text_atomically
from diffmoe_hf.cli_expert_offload import (
    add_expert_offload_arguments,
    check_expert_offload_arguments,
    load_pipeline_with_expert_offload,
)
from diffmoe_hf.cli_sampling import (
    check_device,
    check_sampling_call,
    check_writable_folder,
    guidance_channels_argument,
    guidance_scale_argument,
    load_pipeline,
    select_scheduler,
)
from diffmoe_hf.dtypes import DTYPES


INTERRUPTED = 130  # the shell's exit status for a command stopped by SIGINT (128 + 2)


def check_output_file(path: str, overwrite: bool, extension: str, require_extension: bool = True) -> None:
    """Refuses an `--output` that is empty, lacks `extension` (when required), is a folder, exists without
    `--overwrite`, or cannot be created, before anything is loaded or computed."""
    if os.path.isdir(path):
        raise ValueError(
            f"--output {path} is a folder (--overwrite replaces files only); name the {extension} file to write, "
            f"e.g. --output {os.path.join(path, 'results' + extension)}."
        )
    named = os.path.basename(path) not in ("", extension)
    if not named or (require_extension and not path.endswith(extension)):
        raise ValueError(f"--output {path!r}: name the {extension} file to write, e.g. --output results{extension}.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it.")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f"--output {path}")


def check_output_folder(path: str, option: str) -> None:
    """Refuses a folder option (`--png-dir`) that names a file or cannot be created, before anything is sampled."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file; name a folder to write the images into.")
    check_writable_folder(os.path.abspath(path), f"{option} {path}")


def _check_counts(args, names: tuple[str, ...]) -> None:
    """Refuses a count option below 1 (argparse's `type=int` takes any integer)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def interrupted(command: str, kept: str) -> SystemExit:
    """The exit for Ctrl-C: one line saying what was kept, status 130, no traceback."""
    print(f"diffmoe {command}: interrupted; {kept}", file=sys.stderr)
    return SystemExit(INTERRUPTED)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="converted folder or Hub repo id")
    parser.add_argument("--vae", help="AutoencoderKL folder or repo, for latent models saved without vae/")
    parser.add_argument("--num-samples", type=int, default=50_000, help="samples in total (default 50000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="samples per global batch (default 32); batches of consecutive indices go round-robin "
        "to the processes, so the output does not depend on the number of processes",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's published setting, else 50)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every label and noise (default 0)")
    parser.add_argument(
        "--output",
        required=True,
        help=".npz file to write (ADM format: arr_0 uint8 NHWC); finished batches are kept in <output>.parts/ until "
        "it is complete, so rerunning an interrupted command continues it",
    )
    parser.add_argument("--png-dir", help="also write each sample as <png-dir>/<index>.png")
    parser.add_argument(
        "--keep-float",
        action="store_true",
        help="also store the un-rounded float pixels (arr_float) for `evaluate --protocol "
        "float-features` (float32: 39 GB for 50K 256x256 samples)",
    )
    parser.add_argument(
        "--labels",
        choices=["balanced", "random"],
        default="balanced",
        help="balanced (default): every block of num-classes consecutive samples holds each class once, in a "
        "seeded order; random: uniform labels as DiT's sampling script. Either way a sample's label depends only "
        "on --seed and its index, not on --num-samples",
    )
    parser.add_argument("--scheduler", help="diffusers scheduler class name (default: the folder's)")
    parser.add_argument(
        "--guidance-scale", type=guidance_scale_argument, help="classifier-free guidance scale (default: the model's)"
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="guide only for LOW < model time < HIGH (default: the model's)",
    )
    parser.add_argument(
        "--guidance-channels",
        type=guidance_channels_argument,
        help="guide only the first N latent channels (3 reproduces the DiT DDPM samplers)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument(
        "--device",
        help="torch device of a single process (default: the process's accelerator, else cpu); with several "
        "processes each takes its own, so only cpu may be named",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--expert-parallel-size",
        type=int,
        help="expert parallelism: K processes (of torchrun / accelerate launch) share one copy of the experts, each "
        "holding E/K of every MoE layer's experts, and sample each batch together; K divides the number of processes "
        "and every expert count. Writes the same file as without it (per-token families up to float summation order)",
    )
    add_expert_offload_arguments(parser)


def _sampling_defaults(model: str, args) -> tuple[dict, str | None]:
    """Pipeline call arguments and scheduler class name: the command line's, else the model folder's published
    settings (`published_settings.json`, written by the converter for released models), else the pipeline's."""
    from diffmoe_hf.published_settings import read_folder_settings

    published = read_folder_settings(model) or {}
    chosen = {
        "num_inference_steps": args.steps if args.steps is not None else published.get("num_inference_steps"),
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else published.get("guidance_scale"),
        "guidance_interval": first_given(args.guidance_interval, published.get("guidance_interval")),
        "guidance_channels": first_given(args.guidance_channels, published.get("guidance_channels")),
    }
    if chosen["guidance_interval"] is not None:
        chosen["guidance_interval"] = tuple(chosen["guidance_interval"])
    return {k: v for k, v in chosen.items() if v is not None}, args.scheduler or published.get("scheduler")


def first_given(*values):
    """The first of `values` that is not None (0 and empty values count as given), else None."""
    return next((value for value in values if value is not None), None)


def distributed_state(device: str | None = None):
    """
    `accelerate.PartialState` of this process, and the `torch.device` it computes on. CPU processes
    (`ACCELERATE_USE_CPU=true accelerate launch --num_processes N`, `torchrun`, `--device cpu`, or no GPU) join a gloo
    group, which `PartialState()` alone would not do (each would run as a single process). `accelerate launch --cpu
    --num_processes N` starts one process, not N.

    Args:
        device: the `--device` option (checked with `check_device`), or None for the process's own device. Several
            processes each take their own accelerator, so then only `cpu` may be named.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    chosen = None if device is None else check_device(device)
    on_cpu = chosen is not None and chosen.type == "cpu"
    state = PartialState(cpu=on_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if chosen is not None and not on_cpu and state.num_processes > 1:
        raise ValueError(
            f"--device {device}: each of the {state.num_processes} processes takes its own device (process i the "
            "i-th accelerator); omit --device, or pass --device cpu to run every process on the CPU."
        )
    return state, chosen or state.device


def load_expert_parallel_pipeline(model: str, expert_parallel_size: int, state, device, **components):
    """The pipeline of `model` on this process's `device` with only this rank's experts, expert-parallel over groups of
    `expert_parallel_size` consecutive processes (`diffmoe_hf.parallel`); a size that does not fit is a `ValueError`
    naming the numbers."""
    from diffmoe_hf.models.moe import holding_experts
    from diffmoe_hf.parallel import (
        check_expert_parallel_processes,
        check_expert_parallel_size,
        enable_expert_parallel,
        expert_parallel_mesh,
        model_outline,
    )

    check_expert_parallel_processes(expert_parallel_size, state.num_processes, "--expert-parallel-size")
    try:  # the expert counts from the config alone, before any weight is read (or downloaded)
        outline = model_outline(model, "transformer")
    except OSError:  # no config there: loading names what is wrong with the folder or repo id
        outline = None
    if outline is not None:
        check_expert_parallel_size(outline, expert_parallel_size)
    mesh = expert_parallel_mesh(expert_parallel_size, device.type)
    with holding_experts(mesh.expert_rank, mesh.expert_size):
        pipe = load_pipeline(model, **components).to(device)
    check_expert_parallel_size(pipe.transformer, expert_parallel_size)
    enable_expert_parallel(pipe.transformer, mesh)
    return pipe


def run_sample(args) -> None:
    """`diffmoe sample`: every file argument is checked before the model is loaded; Ctrl-C keeps finished batches."""
    check_output_file(args.output, args.overwrite, ".npz")
    _check_counts(args, ("num_samples", "batch_size", "steps"))
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}.")
    if args.png_dir:
        check_output_folder(args.png_dir, "--png-dir")
    run = None
    try:
        state, device = distributed_state(args.device)
        run = _prepared_run(args, state, device)
        _sample(run, state, args)
    except KeyboardInterrupt:
        raise interrupted("sample", _kept_batches(run)) from None


def _kept_batches(run) -> str:
    """What an interrupted `sample` leaves on disk, in words."""
    batches = 0 if run is None else sum(os.path.isfile(run.batch_path(b)) for b in range(run.num_batches))
    if not batches:
        return "nothing was written."
    return (
        f"{batches} finished batches ({run.finished_samples()} of {run.num_samples} samples) are kept in "
        f"{run.parts_dir}; rerun the same command to continue."
    )


def _prepared_run(args, state, device):
    """The pipeline of `args.model` on this process's `device` (of the processes `state`), as a `SampleRun` of the
    command's settings."""
    import torch

    from diffmoe_hf.evaluation.sampling import SampleRun

    dtype = DTYPES[args.dtype]
    components = {}
    if args.vae:
        from diffmoe_hf.conversion.vae_source import load_vae

        components["vae"] = load_vae(args.vae).to(dtype)
    if args.expert_parallel_size is not None and args.expert_offload != "none":
        raise ValueError(
            f"--expert-parallel-size and --expert-offload {args.expert_offload} are two ways of holding fewer experts "
            "per process; choose one."
        )
    check_expert_offload_arguments(args, args.model, device, dtype)
    if args.expert_parallel_size is None:
        pipe = load_pipeline_with_expert_offload(args.model, args, device, dtype, **components)
    else:
        if dtype != torch.float32:
            components["torch_dtype"] = dtype
        pipe = load_expert_parallel_pipeline(args.model, args.expert_parallel_size, state, device, **components)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs, scheduler_name = _sampling_defaults(args.model, args)
    select_scheduler(pipe, scheduler_name)
    check_sampling_call(pipe, call_kwargs)
    local = {
        name: os.path.abspath(path) if path and os.path.isdir(path) else path
        for name, path in (("model", args.model), ("vae", args.vae))
    }
    settings = {**local, "dtype": args.dtype, "scheduler": type(pipe.scheduler).__name__}
    return SampleRun(
        pipe,
        args.output,
        args.num_samples,
        args.batch_size,
        args.seed,
        args.labels,
        call_kwargs,
        settings,
        png_dir=args.png_dir,
        keep_float=args.keep_float,
        group_size=args.expert_parallel_size or 1,
    )


def _sample(run, state, args) -> None:
    from diffmoe_hf.evaluation.sampling import run_sampling

    run_sampling(run, state, progress=not args.no_progress)
    if state.is_main_process:
        print(f"Wrote {args.num_samples} samples of {args.model} to {args.output} ({json.dumps(run.record['call'])})")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from diffmoe_hf.evaluation.evaluate import PROTOCOLS
    from diffmoe_hf.evaluation.metrics import PRECISION_RECALL_DISTANCES

    parser.add_argument("samples", help="sample batch: .npz (ADM format, arr_0) or an image folder")
    parser.add_argument(
        "--reference",
        required=True,
        help="reference batch: .npz (images and/or mu, sigma, mu_s, sigma_s) or an image folder (sub-folders, e.g. "
        "one per class, included)",
    )
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="adm",
        help="adm (default: the ADM evaluator's numerics), jit (torch-fidelity, JiT), float-features "
        "(un-rounded pixels; DiffMoE of Shi et al., DSMoE)",
    )
    parser.add_argument(
        "--inception-weights",
        help="the Inception weights file (weights-inception-2015-12-05-"
        "6726825d.pth); default: the torch hub cache, downloaded there only when online",
    )
    parser.add_argument(
        "--allow-nonstandard-weights",
        action="store_true",
        help="accept Inception weights that are not the standard file (scores not comparable)",
    )
    parser.add_argument(
        "--precision-recall-distances",
        choices=PRECISION_RECALL_DISTANCES,
        default="float16",
        help="how precision / recall compute distances: float16 (default: ADM's evaluator, which the papers ran) or "
        "float32 (exact to float32, not comparable with published numbers)",
    )
    parser.add_argument(
        "--allow-resolution-mismatch",
        action="store_true",
        help="score a reference of another resolution than the samples (a warning; not comparable with papers)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    parser.add_argument(
        "--device",
        help="torch device of a single process (default: the process's accelerator, else cpu); with several "
        "processes each takes its own, so only cpu may be named",
    )
    parser.add_argument("--output", help="write the JSON record to this file (default: print it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate(args) -> None:
    """`diffmoe evaluate`: the output, both batches and the weights are checked before any feature is computed."""
    if args.output:
        check_output_file(args.output, args.overwrite, ".json", require_extension=False)
    _check_counts(args, ("batch_size",))
    try:
        _evaluate(args)
    except KeyboardInterrupt:
        raise interrupted("evaluate", "nothing was written (features are not kept); rerun the command.") from None


def _evaluate(args) -> None:
    from diffmoe_hf.evaluation.evaluate import (
        PROTOCOLS,
        check_batch_path,
        check_resolutions,
        evaluate_batches,
        evaluation_record,
        load_batch,
        summary_line,
    )
    from diffmoe_hf.evaluation.inception import InceptionFeatures, resolve_weights

    check_batch_path(args.samples, "samples")
    check_batch_path(args.reference, "--reference")
    state, device = distributed_state(args.device)
    protocol = PROTOCOLS[args.protocol]
    # the local files first: a damaged batch is named before any download of the Inception weights
    samples = load_batch(args.samples, protocol.float_pixels, samples=True)
    reference = load_batch(args.reference, protocol.float_pixels)
    check_resolutions(samples, reference, args.allow_resolution_mismatch)
    network = InceptionFeatures(resolve_weights(args.inception_weights), device, args.allow_nonstandard_weights)
    distances = args.precision_recall_distances
    results = evaluate_batches(
        samples, reference, network, protocol, args.batch_size, state, not args.no_progress, distances
    )
    record = evaluation_record(
        protocol, network, samples, reference, results, args.batch_size, distances, args.allow_resolution_mismatch
    )
    if not state.is_main_process:
        return
    text = json.dumps(record, indent=2)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_text_atomically(args.output, text + "\n")
    else:
        print(text)
    print(summary_line(record))
