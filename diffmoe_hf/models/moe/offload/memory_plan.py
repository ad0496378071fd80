"""What each expert-offload tier keeps in memory, computed from a model's parameter shapes (works on a model on the
meta device, i.e. before any weight is loaded), and the budget check built on it."""

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.experts import GroupedExperts


EXPERT_OFFLOAD_TIERS = ("none", "cpu", "disk", "int8", "fp8")
"""Where the routed experts' weights live: `none` (resident, as loaded), `cpu` (host RAM, streamed to a CUDA device
per projection), `disk` (safetensors files in an offload folder, memory-mapped per projection while it runs), `int8`
(resident, int8 weight-only, torchao), `fp8` (resident, stored as float8_e4m3fn, upcast per projection)."""

GIB = 1024**3


def expert_linears_by_bank(model: nn.Module) -> dict[str, list[tuple[str, nn.Linear]]]:
    """
    Bank name -> (qualified name, module) of every `nn.Linear` inside that routed-expert bank (`GroupedExperts`) of
    `model`, in module order: the weights a tier moves. Routers, shared experts, attention, norms and embeddings are
    not in it.
    """
    return {
        bank_name: [
            (name, module) for name, module in bank.named_modules(prefix=bank_name) if isinstance(module, nn.Linear)
        ]
        for bank_name, bank in model.named_modules()
        if isinstance(bank, GroupedExperts)
    }


def expert_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every (qualified name, module) of `expert_linears_by_bank`, flattened."""
    return [pair for linears in expert_linears_by_bank(model).values() for pair in linears]


def _bytes(tensors, dtype: torch.dtype) -> int:
    return sum(tensor.numel() for tensor in tensors) * dtype.itemsize


@dataclass(frozen=True)
class ExpertMemoryPlan:
    """
    Weight memory of a model under an expert-offload tier, in bytes (weights only: activations come on top).

    Attributes:
        tier: one of `EXPERT_OFFLOAD_TIERS`.
        resident_bytes: the weights that always stay on the compute device (every parameter that is not a routed
            expert's), in the compute dtype.
        expert_bytes: the routed experts' weights in the compute dtype (what `none` keeps resident).
        tier_resident_bytes: what the experts take on the compute device under the tier: all of them (`none`), in
            one byte per weight plus scales or biases (`int8`, `fp8`), or the largest expert projection, held only
            while it runs (`cpu`, `disk`).
        stored_bytes: what the tier stores elsewhere: host RAM (`cpu`) or the offload folder (`disk`, in the
            stored dtype); 0 for the others.
    """

    tier: str
    resident_bytes: int
    expert_bytes: int
    tier_resident_bytes: int
    stored_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Weights on the compute device at most: `resident_bytes + tier_resident_bytes`."""
        return self.resident_bytes + self.tier_resident_bytes

    def describe(self) -> str:
        return (
            f"tier {self.tier}: {self.peak_bytes / GIB:.2f} GiB of weights resident at most (non-expert "
            f"{self.resident_bytes / GIB:.2f} GiB + routed experts {self.tier_resident_bytes / GIB:.2f} GiB of "
            f"{self.expert_bytes / GIB:.2f} GiB)"
        )


def plan_expert_offload(
    model: nn.Module, tier: str, dtype: torch.dtype | None = None, stored_dtype: torch.dtype | None = None
) -> ExpertMemoryPlan:
    """
    The `ExpertMemoryPlan` of `model` under `tier`.

    Args:
        model: a model with expert banks; its parameters may be on the meta device.
        tier: one of `EXPERT_OFFLOAD_TIERS` (checked by the caller).
        dtype: the compute dtype (default: the dtype of the model's first parameter).
        stored_dtype: the dtype the `disk` tier writes (default: `dtype`).
    """
    dtype = dtype or next(model.parameters()).dtype
    linears = [module for _, module in expert_linears(model)]
    expert_ids = {id(p) for module in linears for p in module.parameters()}
    expert_parameters = [p for module in linears for p in module.parameters()]
    resident = _bytes((p for p in model.parameters() if id(p) not in expert_ids), dtype)
    experts = _bytes(expert_parameters, dtype)
    largest = max((_bytes(module.parameters(), dtype) for module in linears), default=0)
    weights = sum(module.weight.numel() for module in linears)
    biases = sum(module.bias.numel() for module in linears if module.bias is not None)
    stored = 0
    if tier == "none":
        on_device = experts
    elif tier == "int8":  # a byte per weight, a scale per output row (torchao's per-row scheme), biases as they are
        on_device = weights + (sum(module.out_features for module in linears) + biases) * dtype.itemsize
    elif tier == "fp8":  # a byte per weight and bias, and one projection upcast while it runs
        on_device = weights + biases + largest
    else:  # cpu, disk: one projection at a time
        on_device = largest
        stored = experts if tier == "cpu" else _bytes(expert_parameters, stored_dtype or dtype)
    return ExpertMemoryPlan(tier, resident, experts, on_device, stored)


def check_memory_budget(plan: ExpertMemoryPlan, budget_bytes: int) -> None:
    """Raises a `ValueError` naming the numbers if the plan's resident weights exceed `budget_bytes`."""
    if plan.resident_bytes > budget_bytes:
        raise ValueError(
            f"memory_budget {budget_bytes / GIB:.2f} GiB cannot be met: the non-expert weights alone (attention, norms, "
            f"embeddings, routers, shared experts) take {plan.resident_bytes / GIB:.2f} GiB, whatever the expert tier."
        )
    if plan.peak_bytes > budget_bytes:
        raise ValueError(
            f"memory_budget {budget_bytes / GIB:.2f} GiB cannot be met by {plan.describe()}; the disk tier keeps only "
            "one expert projection resident."
        )
