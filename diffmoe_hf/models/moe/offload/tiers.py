"""`enable_expert_offload`: puts the routed experts of a model into a memory tier; every other weight stays resident.

Each tier acts on the `nn.Linear`s inside the model's expert banks (`memory_plan.expert_linears`) and leaves hooks or
quantized weights there, so the expert backends run `"modules"` for those banks by themselves (a fast backend steps
aside whenever a projection is hooked or its weight is not a plain tensor of the rows' dtype and device; see
`layers.expert_backends`): the computation is each expert module's own, never a read of stale or quantized storage.

- `cpu`: diffusers' leaf-level group offloading of each expert projection (`apply_group_offloading`), host RAM to the
  CUDA device the model is on, through a side stream with pinned memory.
- `disk`: one safetensors file per bank in the offload folder, memory-mapped per projection (`mapped_experts`).
- `int8`: torchao int8 weight-only quantization (`Int8WeightOnlyConfig`: per-row symmetric scales).
- `fp8`: diffusers' layerwise casting (`apply_layerwise_casting_hook`): weights stored as float8_e4m3fn, upcast to
  the compute dtype for each call.
"""

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable

import torch
from torch import nn

from diffmoe_hf.atomic_files import existing_folder_for, why_not_writable

from .mapped_experts import offload_linears_to_file
from .memory_plan import (
    EXPERT_OFFLOAD_TIERS,
    GIB,
    ExpertMemoryPlan,
    check_memory_budget,
    expert_linears,
    expert_linears_by_bank,
    plan_expert_offload,
)


def check_tier_available(tier: str) -> None:
    """
    Raises a `ValueError` for an unknown tier, and an `ImportError` or `ValueError` for a tier this machine or the
    installed libraries cannot provide (`cpu` without CUDA, `int8` without torchao, `fp8` without float8 in torch).
    """
    if tier not in EXPERT_OFFLOAD_TIERS:
        raise ValueError(f"Unknown expert offload tier {tier!r}; choose one of {', '.join(EXPERT_OFFLOAD_TIERS)}.")
    if tier == "cpu" and not torch.cuda.is_available():
        raise ValueError(
            "Expert offload tier 'cpu' keeps the experts in host RAM and streams them to a CUDA GPU, but this machine "
            "has no CUDA device (torch.cuda.is_available() is False). On a CPU use 'disk', 'int8' or 'fp8'."
        )
    if tier == "int8":
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            raise ImportError("Expert offload tier 'int8' needs torchao (pip install torchao).") from None
    if tier == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(
            f"Expert offload tier 'fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks."
        )


def check_offload_dir(offload_dir: str, needed_bytes: int) -> None:
    """Raises a `ValueError` if `offload_dir` (created if missing) does not accept new files or has less free space
    than `needed_bytes` (the experts in their stored dtype)."""
    problem = why_not_writable(offload_dir)
    if problem is not None:
        raise ValueError(f"offload_dir {offload_dir}: {problem}.")
    existing = existing_folder_for(offload_dir)
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ValueError(
            f"offload_dir {offload_dir} has {free / GIB:.2f} GiB free but the experts need {needed_bytes / GIB:.2f} "
            "GiB there; choose a folder on a larger disk."
        )


def check_expert_offload(
    model: nn.Module,
    tier: str,
    offload_dir: str | None = None,
    memory_budget: int | None = None,
    dtype: torch.dtype | None = None,
    stored_dtype: torch.dtype | None = None,
) -> ExpertMemoryPlan:
    """
    Every check of `enable_expert_offload`, on a model that may be on the meta device (e.g. built from its config
    before loading): the tier, the offload folder, the budget. Returns the plan.

    Args:
        memory_budget: bytes of weights the compute device may hold at most (`ExpertMemoryPlan.peak_bytes`).
        dtype, stored_dtype: see `plan_expert_offload`.
    """
    check_tier_available(tier)
    if offload_dir is not None and tier != "disk":
        raise ValueError(f"offload_dir is the folder of the 'disk' tier; tier {tier!r} does not use one.")
    if not expert_linears(model):
        raise ValueError(f"{type(model).__name__} has no routed experts to offload.")
    plan = plan_expert_offload(model, tier, dtype, stored_dtype)
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
        check_memory_budget(plan, memory_budget)
    if tier == "disk":
        check_offload_dir(offload_dir or tempfile.gettempdir(), plan.stored_bytes)
    return plan


def enable_expert_offload(
    model: nn.Module,
    tier: str,
    offload_dir: str | None = None,
    memory_budget: int | None = None,
    materialize_bank: Callable[[str, nn.Module], None] | None = None,
) -> ExpertMemoryPlan:
    """
    Puts the routed experts of `model` into `tier` (see the module docstring); everything else stays where it is.

    Call it once, after the model has its compute dtype. `cpu` moves every other weight to the CUDA device (the
    model's, else the current one) and keeps the experts in host RAM; diffusers' `.to(device)` then leaves the model
    where it is (group offloading is active). `disk` follows later `.to()` calls; `int8` and `fp8` keep the
    dtype they were enabled in. All inputs are checked before anything changes.

    Args:
        tier: one of `EXPERT_OFFLOAD_TIERS`.
        offload_dir: the `disk` tier's folder (one `<bank>.safetensors` per expert bank; default: a new temporary
            folder, removed when the model is garbage collected). Must be writable with room for the experts.
        memory_budget: bytes of weights the compute device may hold at most; a tier that cannot meet it (or
            non-expert weights alone exceeding it) is a `ValueError` naming the numbers.
        materialize_bank: called as `materialize_bank(name, bank)` on each expert bank right before the tier takes
            it, bank after bank, for a model built on the meta device whose experts are created (or read) one bank
            at a time, so that they never are in memory all at once (`disk`, `int8` and `fp8` tiers).

    Returns:
        The `ExpertMemoryPlan` of the model under the tier.
    """
    if getattr(model, "_expert_offload_tier", "none") != "none":
        raise ValueError(
            f"Expert offload is already enabled (tier {model._expert_offload_tier!r}); load the model again."
        )
    plan = check_expert_offload(model, tier, offload_dir, memory_budget)
    if materialize_bank is not None and tier in ("none", "cpu"):
        raise ValueError(f"materialize_bank serves the disk, int8 and fp8 tiers, not {tier!r}.")
    if tier == "cpu":
        device = next(model.parameters()).device
        device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        offload_banks_to_host(model, device)
        move_resident_weights(model, device)
    elif tier != "none":
        if tier == "disk" and offload_dir is None:
            offload_dir = tempfile.mkdtemp(prefix="diffmoe-experts-")
            weakref.finalize(model, shutil.rmtree, offload_dir, ignore_errors=True)
        banks = expert_linears_by_bank(model)
        for name, bank in model.named_modules():  # bank after bank: one bank's copy at a time
            if name in banks:
                if materialize_bank is not None:
                    materialize_bank(name, bank)
                _offload_bank(tier, name, banks[name], offload_dir)
    model._expert_offload_tier = tier
    return plan


def _offload_bank(tier: str, name: str, linears: list[tuple[str, nn.Linear]], offload_dir: str | None) -> None:
    """Puts the linears of the expert bank `name` into the `disk`, `int8` or `fp8` tier."""
    if tier == "disk":
        os.makedirs(offload_dir, exist_ok=True)
        offload_linears_to_file(linears, os.path.join(offload_dir, f"{name}.safetensors"))
    elif tier == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for _, linear in linears:
            quantize_(linear, Int8WeightOnlyConfig())
    else:
        from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

        for _, linear in linears:
            apply_layerwise_casting_hook(linear, torch.float8_e4m3fn, linear.weight.dtype, non_blocking=False)


def offload_banks_to_host(model: nn.Module, device: torch.device) -> None:
    """The `cpu` tier's machinery: diffusers' leaf-level group offloading on every expert bank of `model` (each
    projection a group, stored in host RAM and onloaded to `device` when it is called; through a side stream with
    pinned memory when `device` is CUDA). Routers, shared experts and the rest are not touched."""
    from diffusers.hooks import apply_group_offloading

    from ..layers.experts import GroupedExperts

    for bank in model.modules():
        if isinstance(bank, GroupedExperts):
            use_stream = device.type == "cuda"
            apply_group_offloading(bank, onload_device=device, offload_type="leaf_level", use_stream=use_stream)


def _resident_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `model` that is not a routed expert's."""
    experts = {id(tensor) for _, linear in expert_linears(model) for tensor in linear.parameters()}
    return [tensor for tensor in [*model.parameters(), *model.buffers()] if id(tensor) not in experts]


def cast_resident_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts every floating-point parameter and buffer of `model` that is not a routed expert's to `dtype` (in place;
    the experts keep their dtype until a tier takes them)."""
    for tensor in _resident_tensors(model):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)


def move_resident_weights(model: nn.Module, device: torch.device) -> None:
    """Moves every parameter and buffer of `model` that is not a routed expert's to `device` (in place)."""
    for tensor in _resident_tensors(model):
        tensor.data = tensor.data.to(device)
