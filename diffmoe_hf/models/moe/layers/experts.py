"""Expert banks: a `ModuleList` of per-expert modules (checkpoint- and LoRA-friendly `nn.Linear`s) that can also
run all experts at once on expert-sorted rows, through the bank's expert backend (see `expert_backends`)."""

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from ..ops.grouped_gemm import grouped_linear, segment_linear
from ..ops.routing_layout import ExpertSegments, combine_segments
from .expert_backends import check_expert_backend, resolve_expert_backend


class SwiGLU(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`, (…, D) -> (…, D), hidden width `intermediate_size`."""

    def __init__(self, *, dim: int, intermediate_size: int, bias: bool = False):
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


def _submodule(module: nn.Module, path: list[str]) -> nn.Module:
    """`module.get_submodule(".".join(path))`; in eager mode through the `_modules` dicts (cheap enough to run per
    call), under `torch.compile` through attribute lookups (which it guards on, so that wrapping a projection later,
    e.g. with LoRA, recompiles)."""
    compiling = torch.compiler.is_compiling()
    for name in path:
        module = getattr(module, name) if compiling else module._modules[name]
    return module


class GroupedExperts(nn.ModuleList):
    """
    E experts stored as `experts.{e}.<module>` (state-dict and LoRA friendly). `forward_grouped` runs expert e on the
    e-th segment of expert-sorted rows, through the bank's `expert_backend` (see `expert_backends`): this base class has only
    the `"modules"` backend (each expert module called on its segment); subclasses add the fast backends for
    experts made of `nn.Linear` projections, and fall back to `"modules"` whenever reading the projections' weights
    directly would not give what calling them computes.

    Attributes:
        expert_backend (`str`): `"auto"` (default), `"modules"`, `"segment_linear"` or `"grouped_mm"`; set it for a
            whole model with `set_expert_backend`.
    """

    expert_backend: str = "auto"

    def forward_routed(self, tokens: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
        """
        Runs the experts on the routed tokens and sums each token's weighted expert outputs: the rows of
        `segments.token_index` are gathered once, each expert runs on its contiguous segment (`forward_grouped`), and
        the outputs are scaled by `segments.weights` and added back onto their tokens with one `index_add_`.

        Args:
            tokens: (S, D) token pool.
            segments: the routing sorted by expert (`segments_from_topk`, or a family's own selection).
            expert_inputs: extra per-call inputs of `forward_grouped` (e.g. the per-sample conditioning of Diff-MoE, Cheng et al., which
                the bank gathers per row through `segments.token_index`).

        Returns:
            (S, D) weighted sum of each token's expert outputs (zero for tokens no expert took).
        """
        rows = tokens.index_select(0, segments.token_index)
        expert_out = self.forward_grouped(rows, segments, **expert_inputs)  # a new tensor
        return combine_segments(expert_out, segments, tokens.shape[0], scale_in_place=not torch.is_grad_enabled())

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        """(R, D) rows sorted by expert -> (R, D) outputs of each row's expert."""
        return self._forward_modules(rows, segments)

    def _forward_modules(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        chunks = rows.split(segments.sizes())
        return torch.cat([expert(chunk) for expert, chunk in zip(self, chunks)], dim=0)


def set_expert_backend(module: nn.Module, backend: str) -> None:
    """
    Sets the `expert_backend` of every expert bank in `module` (a model or a layer).

    Args:
        backend: `"auto"`, `"modules"`, `"segment_linear"` or `"grouped_mm"` (see `diffmoe_hf.models.moe.layers.expert_backends`).
    """
    check_expert_backend(backend)
    for submodule in module.modules():
        if isinstance(submodule, GroupedExperts):
            submodule.expert_backend = backend


class StackedLinearExperts(GroupedExperts):
    """
    A `GroupedExperts` bank whose experts are made of `nn.Linear` projections (at the sub-module paths
    `_linear_paths`), with the three backends: `"segment_linear"` (the experts' own weights, one GEMM per expert and
    projection), `"grouped_mm"` (weights stacked per call into (E, out, in) tensors, one grouped GEMM per projection)
    and `"modules"`. `backend(rows)` says which one a call runs.

    Subclasses set `_linear_paths` and implement `_forward_segment_linear` and `_forward_grouped_mm`.
    """

    _linear_paths: tuple[str, ...] = ()

    def projections(self, *paths: str) -> list[nn.Module]:
        """The modules at `paths` (default: `_linear_paths`) of every expert, expert-major."""
        names = [path.split(".") for path in paths or self._linear_paths]
        return [_submodule(expert, path) for expert in self for path in names]

    def backend(self, rows: torch.Tensor) -> str:
        """The backend a call on these (R, D) rows runs (`resolve_expert_backend` of `expert_backend`)."""
        return resolve_expert_backend(self.expert_backend, self.projections(), rows)

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        backend = self.backend(rows)
        if backend == "segment_linear":
            return self._forward_segment_linear(rows, segments)
        if backend == "grouped_mm":
            return self._forward_grouped_mm(rows, segments)
        return self._forward_modules(rows, segments)

    def _forward_segment_linear(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        raise NotImplementedError

    def _forward_grouped_mm(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        raise NotImplementedError

    def own_parameters(self, name: str, *paths: str) -> list[torch.Tensor]:
        """Parameter `name` ("weight" or "bias") of the projections at `paths`, expert-major, for `segment_linear`
        (an empty list when they have no bias)."""
        if torch.compiler.is_compiling():
            tensors = [getattr(linear, name) for linear in self.projections(*paths)]
        else:
            tensors = [linear._parameters[name] for linear in self.projections(*paths)]
        return [] if tensors[0] is None else tensors

    def stacked(self, name: str, *paths: str) -> torch.Tensor | None:
        """(E, sum out, in) weights or (E, sum out) biases of the projections at `paths`, concatenated per expert and
        stacked (a new tensor), or `None` when they have no bias."""
        tensors = self.own_parameters(name, *paths)
        if not tensors:
            return None
        return torch.stack([torch.cat(tensors[e : e + len(paths)]) for e in range(0, len(tensors), len(paths))])

    def project_with_own_weights(self, rows: torch.Tensor, segments: ExpertSegments, *paths: str) -> torch.Tensor:
        """The projections at `paths` of each row's expert, concatenated, from the experts' own weights."""
        weights, biases = self.own_parameters("weight", *paths), self.own_parameters("bias", *paths)
        return segment_linear(rows, weights, biases, segments.offsets)

    def project_with_stacked_weights(self, rows: torch.Tensor, segments: ExpertSegments, *paths: str) -> torch.Tensor:
        """The projections at `paths` of each row's expert, concatenated, as one grouped GEMM over stacked weights."""
        return grouped_linear(rows, self.stacked("weight", *paths), segments, self.stacked("bias", *paths))


class SwiGLUExperts(StackedLinearExperts):
    """
    E SwiGLU experts (`experts.{e}.gate_proj/up_proj/down_proj`). With a fast backend the gate and up projections
    of all experts run as one grouped GEMM into a `[gate | up]` output, then the down projection as a second one.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width of each expert.
        bias (`bool`): Whether the projections have biases (JiTMoE) or not (DSMoE).
    """

    _linear_paths = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, *, dim: int, num_experts: int, intermediate_size: int, bias: bool = False):
        super().__init__([SwiGLU(dim=dim, intermediate_size=intermediate_size, bias=bias) for _ in range(num_experts)])

    def _forward_segment_linear(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        gate_up = self.project_with_own_weights(rows, segments, "gate_proj", "up_proj")  # (R, 2I) as [gate | up]
        return self.project_with_own_weights(swiglu_activation(gate_up), segments, "down_proj")

    def _forward_grouped_mm(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        gate_up = self.project_with_stacked_weights(rows, segments, "gate_proj", "up_proj")
        return self.project_with_stacked_weights(swiglu_activation(gate_up), segments, "down_proj")


class GeluMLPExperts(StackedLinearExperts):
    """
    E GELU-tanh MLPs with biases, `Linear(D, I) -> GELU(tanh) -> Linear(I, D)`, each a diffusers
    `FeedForward(activation_fn="gelu-approximate")` (`experts.{e}.net.0.proj`, `experts.{e}.net.2`; DiffMoE of Shi et al.). With a
    fast backend both projections run as grouped GEMMs with per-expert biases.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width I of each expert.
    """

    _linear_paths = ("net.0.proj", "net.2")

    def __init__(self, *, dim: int, num_experts: int, intermediate_size: int):
        super().__init__(
            [
                FeedForward(dim, inner_dim=intermediate_size, activation_fn="gelu-approximate", bias=True)
                for _ in range(num_experts)
            ]
        )

    def _forward_segment_linear(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        hidden = gelu_tanh_activation(self.project_with_own_weights(rows, segments, "net.0.proj"))
        return self.project_with_own_weights(hidden, segments, "net.2")

    def _forward_grouped_mm(self, rows: torch.Tensor, segments: ExpertSegments) -> torch.Tensor:
        hidden = gelu_tanh_activation(self.project_with_stacked_weights(rows, segments, "net.0.proj"))
        return self.project_with_stacked_weights(hidden, segments, "net.2")
