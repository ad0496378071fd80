"""`--expert-offload TIER [--offload-dir DIR] [--memory-budget GIB]` of `diffmoe generate` and `diffmoe sample`: the
tier, folder and budget are checked against the model's config (its transformer built on the meta device) before any
weight is loaded, then the pipeline is loaded with the tier applied (see `diffmoe_hf.models.moe.offload`)."""

import argparse
import json
import os

from diffmoe_hf.cli_sampling import CommandError, load_pipeline
from diffmoe_hf.models.moe.offload.memory_plan import EXPERT_OFFLOAD_TIERS, GIB


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _budget_gib(text: str) -> int:
    """argparse type of `--memory-budget`: GiB (a positive number) -> bytes."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB (e.g. 8), got {text!r}")
    return int(value * GIB)


def add_expert_offload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expert-offload",
        choices=EXPERT_OFFLOAD_TIERS,
        default="none",
        help="where the routed experts live while sampling (default none: resident): cpu (host RAM, streamed to the "
        "CUDA GPU), disk (memory-mapped from --offload-dir, one projection in RAM at a time), int8 or fp8 (stored "
        "quantized); every other weight stays on the device",
    )
    parser.add_argument("--offload-dir", help="folder of the disk tier (default: a temporary folder)")
    parser.add_argument(
        "--memory-budget",
        type=_budget_gib,
        metavar="GIB",
        help="refuse to load if the tier would keep more than GIB of weights on the compute device",
    )


def _transformer_folder(source: str) -> str | None:
    folder = os.path.join(source, "transformer")
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _stored_dtype(folder: str):
    """The dtype most of the transformer's weights are stored in (by bytes, in its first safetensors file; routers
    may be float32 in a bfloat16 folder), or `None` if unknown."""
    import math

    import torch
    from safetensors import safe_open

    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        return None
    elements: dict[str, int] = {}
    with safe_open(os.path.join(folder, files[0]), framework="pt") as weights:
        for key in weights.keys():
            tensor = weights.get_slice(key)
            elements[tensor.get_dtype()] = elements.get(tensor.get_dtype(), 0) + math.prod(tensor.get_shape())
    name = _SAFETENSORS_DTYPES.get(max(elements, key=elements.get)) if elements else None
    return getattr(torch, name) if name else None


def _empty_transformer(source: str, folder: str):
    """The transformer of the local model folder `source`, built from its config with every parameter on meta."""
    import importlib

    from diffmoe_hf.conversion.low_memory import init_empty_model

    with open(os.path.join(source, "model_index.json")) as handle:
        module_name, class_name = json.load(handle)["transformer"]
    model_cls = getattr(importlib.import_module(module_name), class_name)
    config = model_cls.load_config(folder)
    return init_empty_model(model_cls.from_config, config=config)


def check_expert_offload_arguments(args, source: str, device, dtype) -> None:
    """Every check of the options before loading: a `cpu` tier on a non-CUDA `--device`, `--offload-dir` without
    the disk tier, and, for a local folder, the tier, folder and budget against the transformer's config."""
    from diffmoe_hf.models.moe.offload import check_expert_offload
    from diffmoe_hf.models.moe.offload.tiers import check_tier_available

    tier = args.expert_offload
    check_tier_available(tier)
    if tier == "cpu" and device.type != "cuda":
        raise CommandError(f"--expert-offload cpu streams the experts to a CUDA GPU; --device is {device}.")
    if args.offload_dir is not None and tier != "disk":
        raise CommandError(f"--offload-dir is the folder of --expert-offload disk, not of {tier}.")
    folder = _transformer_folder(source)
    if folder is not None and (tier != "none" or args.memory_budget is not None):
        stored = _stored_dtype(folder)
        model = _empty_transformer(source, folder)
        check_expert_offload(model, tier, args.offload_dir, args.memory_budget, dtype=dtype, stored_dtype=stored)


def load_pipeline_with_expert_offload(source: str, args, device, dtype, **components):
    """
    The pipeline of `source` on `device` in `dtype`, its routed experts in `args.expert_offload`.

    For `disk` the transformer of a local folder is loaded in its stored dtype (so its weights stay memory-mapped),
    its experts written to the offload folder bank after bank, and only then cast to `dtype`: host memory never holds
    all experts. `int8` and `fp8` computing in float32 from a folder stored in a lower precision (bf16 files) load it
    the same way: the non-expert weights are cast to float32, then each expert bank in turn is cast and quantized, so
    host memory holds one bank in float32 at a time, not the model. `cpu` loads on the CPU and moves every non-expert
    weight to `device`.
    """
    import torch

    from diffmoe_hf.models.moe.offload import enable_expert_offload
    from diffmoe_hf.models.moe.offload.tiers import cast_resident_weights

    tier = args.expert_offload
    folder = _transformer_folder(source)
    stored = _stored_dtype(folder) if folder is not None else None
    upcast = stored is not None and stored != dtype
    quantized_from_storage = tier in ("int8", "fp8") and upcast and dtype == torch.float32
    if (tier == "disk" and upcast) or quantized_from_storage:
        components["torch_dtype"] = {"transformer": stored, "default": dtype}
    elif dtype != torch.float32:
        components["torch_dtype"] = dtype
    pipe = load_pipeline(source, **components)
    if tier == "none":
        return pipe.to(device)
    if tier != "cpu":
        pipe.to(device)
    if quantized_from_storage:
        cast_resident_weights(pipe.transformer, dtype)
        enable_expert_offload(
            pipe.transformer, tier, None, args.memory_budget, materialize_bank=lambda name, bank: bank.to(dtype)
        )
        return pipe
    pipe.enable_expert_offload(tier, args.offload_dir, args.memory_budget)
    if tier == "disk":
        pipe.transformer.to(dtype)
    return pipe
