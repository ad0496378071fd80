"""Expert banks: a `ModuleList` of per-expert modules (checkpoint- and LoRA-friendly `nn.Linear`s) that can also
run all experts at once on expert-sorted rows, through the bank's expert backend (see `expert_backends`). A bank
describes its experts to the backends (`GroupedExperts`); it does not know which backends exist."""

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from ..ops.routing_layout import ExpertSegments, combine_segments
from .expert_backends import EXPERT_BACKENDS, check_expert_backend, resolve_expert_backend
from .expert_placement import placed_expert_ids


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


class GroupedExperts(nn.ModuleList, ABC):
    """
    E experts stored as `experts.{e}.<module>` (state-dict and LoRA friendly). `forward_grouped` runs expert e on the
    e-th segment of expert-sorted rows through the bank's `expert_backend`, a function of the registry in
    `expert_backends`, which reads what differs between bank kinds from this small description:

    - `projection_paths`: the sub-module paths of every `nn.Linear` projection of an expert, e.g.
      `("gate_proj", "up_proj", "down_proj")`;
    - `forward_projected`: the experts' computation written once, with the projections done by the backend;
    - `row_arguments`: what an expert module takes after its rows, one row per routed row;
    - `rows_only_expert_inputs`: the per-call inputs re-expressed per row, so that rows can run away from their
      tokens (expert parallelism).

    A bank built inside `holding_experts(rank, size)` (`expert_placement`) holds only its expert-parallel block of
    the experts, each under its global name `str(e)`: iterate it (`for expert in bank`, local experts in global
    order), not `bank[i]`. `num_experts` is always the global E, `expert_ids` the global ids held.

    Args:
        build_expert: `() -> nn.Module`, one expert.
        num_experts: E, the experts of the layer.

    Attributes:
        expert_backend (`str`): `"auto"` (default) or a registered backend (`"modules"`, `"segment_linear"`,
            `"grouped_mm"`, ...); an unknown name is a `ValueError` when it is set. Set it for a whole model with
            `set_expert_backend`.
    """

    projection_paths: tuple[str, ...]
    _expert_backend: str = "auto"
    expert_parallel_group: "torch.distributed.ProcessGroup | None" = None
    """The expert-parallel group the `"expert_parallel"` backend exchanges rows over (`diffmoe_hf.parallel`)."""

    def __init__(self, build_expert: Callable[[], nn.Module], num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.expert_ids = placed_expert_ids(num_experts)
        for expert_id in self.expert_ids:
            self.add_module(str(expert_id), build_expert())

    @property
    def expert_backend(self) -> str:
        return self._expert_backend

    @expert_backend.setter
    def expert_backend(self, backend: str) -> None:
        self._expert_backend = check_expert_backend(backend)

    def projections(self, *paths: str) -> list[nn.Module]:
        """The modules at `paths` (default: `projection_paths`) of every expert, expert-major."""
        names = [path.split(".") for path in paths or self.projection_paths]
        return [_submodule(expert, path) for expert in self for path in names]

    def backend(self, rows: torch.Tensor) -> str:
        """The backend a call on these (R, D) rows runs (`resolve_expert_backend` of `expert_backend`)."""
        return resolve_expert_backend(self.expert_backend, self.projections(), rows)

    def forward_routed(self, tokens: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
        """
        Runs the experts on the routed tokens and sums each token's weighted expert outputs: the rows of
        `segments.token_index` are gathered once, each expert runs on its contiguous segment (`forward_grouped`), and
        the outputs are scaled by `segments.weights` and added back onto their tokens with one `index_add_`.

        Args:
            tokens: (S, D) token pool.
            segments: the routing sorted by expert (`segments_from_topk`, or a family's own selection).
            expert_inputs: the bank's extra per-call inputs (e.g. the per-sample conditioning of Diff-MoE, Cheng et
                al., which the bank gathers per row through `segments.token_index`).

        Returns:
            (S, D) weighted sum of each token's expert outputs (zero for tokens no expert took).
        """
        rows = tokens.index_select(0, segments.token_index)
        expert_out = self.forward_grouped(rows, segments, **expert_inputs)  # a new tensor
        return combine_segments(expert_out, segments, tokens.shape[0], scale_in_place=not torch.is_grad_enabled())

    def forward_grouped(self, rows: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
        """(R, D) rows sorted by expert -> (R, D) outputs of each row's expert, by the backend `backend(rows)`."""
        return EXPERT_BACKENDS[self.backend(rows)].run(self, rows, segments, **expert_inputs)

    @abstractmethod
    def forward_projected(
        self, rows: torch.Tensor, segments: ExpertSegments, project: Callable[..., torch.Tensor], **expert_inputs
    ) -> torch.Tensor:
        """
        (R, D) rows sorted by expert -> (R, D) outputs of each row's expert, with every projection computed as
        `project(hidden, *paths)`: (R, in) -> (R, sum out) the projections at `paths` of each row's expert,
        concatenated (a new tensor, which may be modified in place).
        """

    def row_arguments(self, segments: ExpertSegments, **expert_inputs) -> tuple[torch.Tensor, ...]:
        """The (R, ...) tensors an expert module takes after its rows, row r for routed row r (here: none)."""
        return ()

    def rows_only_expert_inputs(self, segments: ExpertSegments, **expert_inputs) -> dict:
        """
        `expert_inputs` re-expressed for the routed rows alone: the keyword inputs of a `forward_grouped` call on the
        same (R, D) rows whose segments have `token_index = arange(R)`. Tensors are (R, ...), row r for routed row r
        (an expert-parallel backend sends them with the rows); other values are passed as they are (here: none).
        """
        return {}


def expert_banks(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """`(module path, bank)` of every expert bank of `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, GroupedExperts)]


def set_expert_backend(module: nn.Module, backend: str) -> None:
    """
    Sets the `expert_backend` of every expert bank in `module` (a model or a layer).

    Args:
        backend: `"auto"` or a registered backend name (see `diffmoe_hf.models.moe.layers.expert_backends`); an
            unknown name is a `ValueError`, also for a module without expert banks.
    """
    check_expert_backend(backend)
    for submodule in module.modules():
        if isinstance(submodule, GroupedExperts):
            submodule.expert_backend = backend


class SwiGLUExperts(GroupedExperts):
    """
    E SwiGLU experts (`experts.{e}.gate_proj/up_proj/down_proj`). The gate and up projections are asked for together
    (one `[gate | up]` output: one grouped GEMM with a fast backend), then the down projection.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width of each expert.
        bias (`bool`): Whether the projections have biases (JiTMoE) or not (DSMoE).
    """

    projection_paths = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, *, dim: int, num_experts: int, intermediate_size: int, bias: bool = False):
        super().__init__(lambda: SwiGLU(dim=dim, intermediate_size=intermediate_size, bias=bias), num_experts)

    def forward_projected(
        self, rows: torch.Tensor, segments: ExpertSegments, project: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        gate_up = project(rows, "gate_proj", "up_proj")  # (R, 2I) as [gate | up]
        return project(swiglu_activation(gate_up), "down_proj")


class GeluMLPExperts(GroupedExperts):
    """
    E GELU-tanh MLPs with biases, `Linear(D, I) -> GELU(tanh) -> Linear(I, D)`, each a diffusers
    `FeedForward(activation_fn="gelu-approximate")` (`experts.{e}.net.0.proj`, `experts.{e}.net.2`; DiffMoE of Shi
    et al.). With a fast backend both projections run as grouped GEMMs with per-expert biases.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width I of each expert.
    """

    projection_paths = ("net.0.proj", "net.2")

    def __init__(self, *, dim: int, num_experts: int, intermediate_size: int):
        super().__init__(
            lambda: FeedForward(dim, inner_dim=intermediate_size, activation_fn="gelu-approximate", bias=True),
            num_experts,
        )

    def forward_projected(
        self, rows: torch.Tensor, segments: ExpertSegments, project: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        return project(gelu_tanh_activation(project(rows, "net.0.proj")), "net.2")
