"""Refusing weights that are not finite: a converted folder with NaN or infinite weights samples NaN."""

import torch

from diffmoe_hf.dtypes import DTYPES

from .checkpoint_io import WEIGHT_KEYS, CheckpointError
from .streamed_save import saved_dtype


# elements per isfinite() call: bounds the temporary boolean tensor whatever the size of the weights
_CHUNK = 1 << 24
MAX_NAMED = 8


def non_finite_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """`{name: number of NaN / +-inf elements}` of the floating-point tensors that have any, reading each tensor
    once in chunks of 16M elements."""
    counts = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        count = sum(int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(_CHUNK))
        if count:
            counts[name] = count
    return counts


def _tensors(count: int) -> str:
    return f"{count} tensor" if count == 1 else f"{count} tensors"


def _listed(counts: dict[str, int], tensors: dict[str, torch.Tensor]) -> str:
    lines = [f"{name}: {count} of {tensors[name].numel()} values" for name, count in list(counts.items())[:MAX_NAMED]]
    more = [f"... and {len(counts) - MAX_NAMED} more tensors"] if len(counts) > MAX_NAMED else []
    return "\n  " + "\n  ".join(lines + more)


def check_finite_checkpoint(state_dict: dict[str, torch.Tensor], path: str, source: str) -> None:
    """
    Refuses a checkpoint whose selected weights (`source`, e.g. `"ema"`) hold NaN or infinite values, naming the
    tensors (checkpoint names) and how many values of each.

    Raises:
        CheckpointError: before anything is built or written.
    """
    counts = non_finite_counts(state_dict)
    if counts:
        other = "model" if source in WEIGHT_KEYS["ema"] else "ema"
        raise CheckpointError(
            f"{path}: the {source!r} weights hold NaN or infinite values in {_tensors(len(counts))}, so the converted "
            f"model could only sample NaN:{_listed(counts, state_dict)}\n"
            f"Convert a checkpoint saved before training diverged, or its other weights (--weights {other}) if it has them."
        )


def check_finite_after_cast(model: torch.nn.Module, dtype_name: str) -> None:
    """
    Refuses a model whose finite weights would overflow when cast to the saved dtype `dtype_name` (`--dtype fp16`
    holds at most 65504 in magnitude; routers are saved in float32, `streamed_save.saved_dtype`), naming the tensors.
    Casts one tensor at a time, so it holds no cast copy of the model.

    Raises:
        ValueError: before anything is written.
    """
    tensors = model.state_dict()
    counts = {}
    for name, tensor in tensors.items():
        cast = tensor.to(saved_dtype(model, name, tensor, DTYPES[dtype_name]))
        counts.update(non_finite_counts({name: cast}))
    if counts:
        raise ValueError(
            f"--dtype {dtype_name}: values beyond the range of {dtype_name} in {_tensors(len(counts))} would be saved as "
            f"infinite:{_listed(counts, tensors)}\nConvert with --dtype bf16 (float32's range) or fp32."
        )
