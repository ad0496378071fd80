"""Expert banks: a `ModuleList` of per-expert modules (checkpoint- and LoRA-friendly `nn.Linear`s) that can also
run all experts at once on expert-sorted rows."""

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import ExpertSegments, grouped_linear


class SwiGLU(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`, (…, D) -> (…, D), hidden width `intermediate_size`."""

    def __init__(self, dim: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class GroupedExperts(nn.ModuleList):
    """
    E experts stored as `experts.{e}.<module>` (state-dict and LoRA friendly). `forward_grouped` runs expert e on the
    e-th segment of expert-sorted rows. This base version calls the modules one segment at a time; subclasses add a
    grouped-GEMM path over stacked weights for plain (un-wrapped) `nn.Linear` experts.
    """

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        """(R, D) rows sorted by expert -> (R, D) outputs of each row's expert."""
        chunks = rows.split(segments.sizes())
        return torch.cat([expert(chunk) for expert, chunk in zip(self, chunks)], dim=0)


class _StackedWeightCache:
    """
    Stacked copies of the experts' weights for inference, rebuilt when a source tensor changes (its version counter,
    storage, dtype or device), so in-place updates, `.to()` and `load_state_dict` are picked up.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, tensors: list[torch.Tensor], build):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if key != self.key:
            self.key, self.value = key, build()
        return self.value


class SwiGLUExperts(GroupedExperts):
    """
    E SwiGLU experts (`experts.{e}.gate_proj/up_proj/down_proj`). Gate and up projections run as one fused grouped
    GEMM over the stacked `[gate; up]` weights, then the down projection as a second one.

    Args:
        num_experts (`int`): E.
        dim (`int`): Token width D.
        intermediate_size (`int`): Hidden width of each expert.
        bias (`bool`): Whether the projections have biases (JiTMoE) or not (DSMoE).
    """

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, bias: bool = False):
        super().__init__([SwiGLU(dim, intermediate_size, bias=bias) for _ in range(num_experts)])
        self.bias = bias
        self._stacked = _StackedWeightCache()

    def _plain_linears(self) -> bool:
        return all(
            type(getattr(expert, name)) is nn.Linear for expert in self for name in ("gate_proj", "up_proj", "down_proj")
        )

    def _stack(self) -> dict[str, torch.Tensor | None]:
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        down = torch.stack([e.down_proj.weight for e in self])
        stacked = {"gate_up": gate_up, "down": down, "gate_up_bias": None, "down_bias": None}
        if self.bias:
            stacked["gate_up_bias"] = torch.stack([torch.cat([e.gate_proj.bias, e.up_proj.bias]) for e in self])
            stacked["down_bias"] = torch.stack([e.down_proj.bias for e in self])
        return stacked

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        if not self._plain_linears():
            return super().forward_grouped(rows, segments)
        stacked = self._stacked.get(list(self.parameters()), self._stack)
        gate, up = grouped_linear(rows, stacked["gate_up"], segments, stacked["gate_up_bias"]).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, stacked["down"], segments, stacked["down_bias"])
