"""Expert banks: a `ModuleList` of per-expert modules (checkpoint- and LoRA-friendly `nn.Linear`s) that can also
run all experts at once on expert-sorted rows."""

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from .dispatch import ExpertSegments, grouped_linear, segment_linear, uses_stacked_weights


class SwiGLU(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`, (…, D) -> (…, D), hidden width `intermediate_size`."""

    def __init__(self, dim: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def swiglu_activation(gate_up: torch.Tensor) -> torch.Tensor:
    """
    `silu(gate) * up` of a (R, 2I) `[gate | up]` projection -> (R, I).

    When `gate_up` records no gradient (inference) the result is computed in place in its gate half and returned as
    that (row stride 2I) view, which the down projection's GEMM reads as is: no (R, I) temporaries are allocated.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if gate_up.requires_grad:
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


def gelu_tanh_activation(hidden: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) of a new (R, I) projection, in place when it records no gradient (inference)."""
    if hidden.requires_grad:
        return F.gelu(hidden, approximate="tanh")
    return torch.ops.aten.gelu_(hidden, approximate="tanh")


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


class StackedLinearExperts(GroupedExperts):
    """
    A `GroupedExperts` bank whose experts are made of `nn.Linear` projections (at the sub-module paths
    `_linear_paths`). Where `F.grouped_mm` has a grouped kernel (CUDA) they run as grouped GEMMs over stacked weights,
    cached for inference (`_StackedWeightCache`); elsewhere (CPU) `segment_linear` runs one GEMM per expert and
    projection, on each expert's own weights when gradients are recorded (no stacking copy per training step). When
    any projection is wrapped (e.g. by a LoRA layer) the bank falls back to calling the expert modules one segment at
    a time.

    Subclasses set `_linear_paths`, build their stacked tensors in `_stack()` and use them in `forward_grouped`.
    """

    _linear_paths: tuple[str, ...] = ()

    def __init__(self, experts: list[nn.Module]):
        super().__init__(experts)
        self._stacked = _StackedWeightCache()

    def _plain_linears(self) -> bool:
        return all(type(expert.get_submodule(path)) is nn.Linear for expert in self for path in self._linear_paths)

    def _stack(self) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def stacked_weights(self) -> dict[str, torch.Tensor | None]:
        """The `_stack()` tensors, cached while the weights do not change and no gradient is recorded."""
        return self._stacked.get(list(self.parameters()), self._stack)

    def own_parameters(self, name: str, *paths: str) -> list[torch.Tensor]:
        """Parameter `name` ("weight" or "bias") of the projections at `paths`, expert-major, for `segment_linear`
        (an empty list when they have no bias)."""
        tensors = [getattr(expert.get_submodule(path), name) for expert in self for path in paths]
        return [] if tensors[0] is None else tensors

    def segment_linear(self, rows: torch.Tensor, segments: ExpertSegments, *paths: str) -> torch.Tensor:
        """The projections at `paths` of each row's expert, concatenated, from the experts' own weights."""
        weights, biases = self.own_parameters("weight", *paths), self.own_parameters("bias", *paths)
        return segment_linear(rows, weights, biases, segments.offsets)


class SwiGLUExperts(StackedLinearExperts):
    """
    E SwiGLU experts (`experts.{e}.gate_proj/up_proj/down_proj`). Gate and up projections run as one fused grouped
    GEMM over the stacked `[gate; up]` weights, then the down projection as a second one.

    Args:
        num_experts (`int`): E.
        dim (`int`): Token width D.
        intermediate_size (`int`): Hidden width of each expert.
        bias (`bool`): Whether the projections have biases (JiTMoE) or not (DSMoE).
    """

    _linear_paths = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, bias: bool = False):
        super().__init__([SwiGLU(dim, intermediate_size, bias=bias) for _ in range(num_experts)])
        self.bias = bias

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
        if not uses_stacked_weights(rows):
            if torch.is_grad_enabled():  # the experts' own weights: no stacking copy per training step
                gate_up = self.segment_linear(rows, segments, "gate_proj", "up_proj")
            else:  # inference: gate and up as one GEMM per expert, over the cached stacked `[gate; up]` weights
                stacked = self.stacked_weights()
                biases = [] if stacked["gate_up_bias"] is None else list(stacked["gate_up_bias"].unbind(0))
                gate_up = segment_linear(rows, list(stacked["gate_up"].unbind(0)), biases, segments.offsets)
            return self.segment_linear(swiglu_activation(gate_up), segments, "down_proj")
        stacked = self.stacked_weights()
        gate, up = grouped_linear(rows, stacked["gate_up"], segments, stacked["gate_up_bias"]).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, stacked["down"], segments, stacked["down_bias"])


class GeluMLPExperts(StackedLinearExperts):
    """
    E GELU-tanh MLPs with biases, `Linear(D, I) -> GELU(tanh) -> Linear(I, D)`, each a diffusers
    `FeedForward(activation_fn="gelu-approximate")` (`experts.{e}.net.0.proj`, `experts.{e}.net.2`; DiffMoE). Both
    projections run as grouped GEMMs with per-expert biases.

    Args:
        num_experts (`int`): E.
        dim (`int`): Token width D.
        intermediate_size (`int`): Hidden width I of each expert.
    """

    _linear_paths = ("net.0.proj", "net.2")

    def __init__(self, num_experts: int, dim: int, intermediate_size: int):
        super().__init__(
            [
                FeedForward(dim, inner_dim=intermediate_size, activation_fn="gelu-approximate", bias=True)
                for _ in range(num_experts)
            ]
        )

    def _stack(self) -> dict[str, torch.Tensor]:
        return {
            "fc1": torch.stack([e.net[0].proj.weight for e in self]),
            "fc1_bias": torch.stack([e.net[0].proj.bias for e in self]),
            "fc2": torch.stack([e.net[2].weight for e in self]),
            "fc2_bias": torch.stack([e.net[2].bias for e in self]),
        }

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        if not self._plain_linears():
            return super().forward_grouped(rows, segments)
        if not uses_stacked_weights(rows):
            hidden = gelu_tanh_activation(self.segment_linear(rows, segments, "net.0.proj"))
            return self.segment_linear(hidden, segments, "net.2")
        stacked = self.stacked_weights()
        hidden = F.gelu(grouped_linear(rows, stacked["fc1"], segments, stacked["fc1_bias"]), approximate="tanh")
        return grouped_linear(hidden, stacked["fc2"], segments, stacked["fc2_bias"])
