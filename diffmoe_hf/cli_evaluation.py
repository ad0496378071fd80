"""`diffmoe sample` and `diffmoe evaluate`: argument definitions and runners (the CLI delegates here).

Part of the command-line layer, with `cli.py`: it loads the pipeline and reads a folder's published settings, which
the evaluation library below it (`diffmoe_hf.evaluation`) does not.
"""

import argparse
import json
import os

from diffmoe_hf.atomic_files import write_text_atomically
from diffmoe_hf.cli_sampling import (
    check_sampling_call,
    guidance_channels_argument,
    guidance_scale_argument,
    select_scheduler,
)
from diffmoe_hf.dtypes import DTYPES


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
    parser.add_argument("--output", required=True, help=".npz file to write (ADM format: arr_0 uint8 NHWC)")
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
        help="balanced: each class num-samples/num-classes times (default); random: uniform "
        "labels as DiT's sampling script",
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def distributed_state():
    """`accelerate.PartialState` of this process. CPU processes (`accelerate launch --cpu`, `ACCELERATE_USE_CPU=true`,
    or no GPU) join a gloo group, which `PartialState()` alone would not do (each would run as a single process)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def run_sample(args) -> None:
    import torch

    from diffmoe_hf import ClassConditionalMoEPipeline
    from diffmoe_hf.evaluation.sampling import SampleRun, run_sampling

    state = distributed_state()
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it.")
    dtype = DTYPES[args.dtype]
    components = {}
    if args.vae:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(args.vae, torch_dtype=dtype)
    if dtype != torch.float32:
        components["torch_dtype"] = dtype
    pipe = ClassConditionalMoEPipeline.from_pretrained(args.model, **components).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs, scheduler_name = _sampling_defaults(args.model, args)
    select_scheduler(pipe, scheduler_name)
    check_sampling_call(pipe, call_kwargs)
    local = {
        name: os.path.abspath(path) if path and os.path.isdir(path) else path
        for name, path in (("model", args.model), ("vae", args.vae))
    }
    settings = {**local, "dtype": args.dtype, "scheduler": type(pipe.scheduler).__name__}
    run = SampleRun(
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
    )
    run_sampling(run, state, progress=not args.no_progress)
    if state.is_main_process:
        print(f"Wrote {args.num_samples} samples of {args.model} to {args.output} ({json.dumps(run.record['call'])})")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from diffmoe_hf.evaluation.evaluate import PROTOCOLS

    parser.add_argument("samples", help="sample batch: .npz (ADM format, arr_0) or an image folder")
    parser.add_argument(
        "--reference",
        required=True,
        help="reference batch: .npz (images and/or mu, sigma, mu_s, sigma_s) or an image folder",
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
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    parser.add_argument("--output", help="write the JSON record to this file (default: print it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate(args) -> None:
    from diffmoe_hf.evaluation.evaluate import PROTOCOLS, evaluate_batches, evaluation_record, load_batch, summary_line
    from diffmoe_hf.evaluation.inception import InceptionFeatures, resolve_weights

    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it.")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive.")
    state = distributed_state()
    protocol = PROTOCOLS[args.protocol]
    samples = load_batch(args.samples, protocol.float_pixels, samples=True)
    reference = load_batch(args.reference, protocol.float_pixels)
    network = InceptionFeatures(resolve_weights(args.inception_weights), state.device, args.allow_nonstandard_weights)
    results = evaluate_batches(samples, reference, network, protocol, args.batch_size, state, not args.no_progress)
    record = evaluation_record(protocol, network, samples, reference, results, args.batch_size)
    if not state.is_main_process:
        return
    text = json.dumps(record, indent=2)
    if args.output:
        write_text_atomically(args.output, text + "\n")
    else:
        print(text)
    print(summary_line(record))
