"""How an expert bank runs its experts: a registry of expert backends, each one function with one signature, the one
place that picks the default, and the one rule that decides when a backend may read the experts' weights directly.

A backend is a function registered under a name:

    @register_expert_backend("my_kernel", reads_weights=True)
    def run_my_kernel(bank, rows, segments, **expert_inputs):
        ...  # -> (R, D) each row's expert output

It receives the bank (a `GroupedExperts`), the (R, D) rows sorted by expert, their `ExpertSegments` (the token and
expert of each row and the (E,) segment end offsets, i.e. the rows per expert) and the bank's per-call inputs (e.g.
the per-sample conditioning of Diff-MoE, Cheng et al.), and returns each row's expert output in the same row order.
What differs between bank kinds it reads from the bank's small description, never from the bank's type:

- `bank.forward_projected(rows, segments, project, **expert_inputs)`: the experts' computation (activations,
  modulation, residual) with every expert projection left to `project(hidden, *paths)`, which the backend provides:
  (R, in) rows sorted by expert -> (R, sum out) the projections at `paths` (e.g. `"gate_proj", "up_proj"`) of each
  row's expert, concatenated. `expert_parameters` and `stacked_expert_parameters` read the weights.
- `bank.projection_paths`: every projection (`nn.Linear`) of an expert that `project` may be asked for.
- `bank.row_arguments(segments, **expert_inputs)`: the per-row tensors that calling expert module e on its rows
  takes after them (none for SwiGLU and GELU experts; per-row conditioning for Diff-MoE's modulated experts).

So adding a backend is that one function and its registration, in any module: no bank, layer or model changes.
Since a backend gets the routing itself (segments and counts, not pre-split chunks) and the per-row arguments, a
backend may also move rows, e.g. expert parallelism exchanging each expert's rows with the rank holding it and
running `forward_projected` there on the rows it received.

Built-in backends (the `expert_backend` of a bank, set for a whole model with `set_expert_backend`):

- `"modules"`: each expert module is called on its segment of rows. Always correct: every hook on the modules runs
  (diffusers' layerwise casting and group offloading, accelerate's device hooks), and wrapped or quantized
  projections (LoRA, torchao) compute as they would anywhere else. One call per expert and projection.
- `"segment_linear"`: one GEMM per (expert, projection) on the experts' own weights, all of them as one MKL grouped
  GEMM for float32 on x86 CPUs (`segment_linear` in `ops.grouped_gemm`), else one `torch.mm` each. No copy of the
  weights.
- `"grouped_mm"`: one `F.grouped_mm` per projection over the experts' weights stacked into (E, out, in) tensors,
  stacked on every call (no cache, so in-place updates, `.to()` and offloading are always seen). Has a real grouped
  kernel on CUDA for bfloat16; elsewhere it loops over the experts.
- `"auto"` (the default, a name rather than a function): `"grouped_mm"` for bfloat16 rows on CUDA where
  `F.grouped_mm` exists, else `"segment_linear"`.

A backend registered with `reads_weights=True` (`"segment_linear"`, `"grouped_mm"`) reads the projections' weights
without calling the modules, so it is valid only while that gives what calling the modules would compute. Whatever
such a backend is requested, a bank runs `"modules"` instead whenever one of its projections is not a plain
`nn.Linear` (a LoRA wrapper, a subclass), carries a hook (diffusers `HookRegistry`, accelerate,
`register_forward_(pre_)hook`, global module hooks), or has a weight that is a tensor subclass (torchao's quantized
weights), on another device than the rows (offloaded, meta) or of another dtype (stored in a lower precision).

The check is O(experts) cheap attribute reads per call and traces under `torch.compile(fullgraph=True)`; a compiled
graph is guarded on what it read, so wrapping a projection (LoRA), registering a diffusers or accelerate hook or
changing a weight's dtype or device after compilation recompiles. Like every `torch.compile`d module, it does not see
plain `register_forward_(pre_)hook` hooks added after compilation (`torch._dynamo.config.skip_nnmodule_hook_guards`).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from ..ops.grouped_gemm import grouped_linear, segment_linear
from ..ops.routing_layout import ExpertSegments


class ExpertBackend(NamedTuple):
    """
    A registered backend.

    Attributes:
        run: `run(bank, rows, segments, **expert_inputs)` -> (R, D), see the module docstring.
        reads_weights: whether `run` reads the projections' weights instead of calling the modules (then the bank
            runs `"modules"` wherever that would not compute the same, see `resolve_expert_backend`).
    """

    run: Callable[..., torch.Tensor]
    reads_weights: bool


EXPERT_BACKENDS: dict[str, ExpertBackend] = {}
"""The registered backends by name (`register_expert_backend` adds to it); `"auto"` is not one of them."""


def register_expert_backend(name: str, *, reads_weights: bool) -> Callable[[Callable], Callable]:
    """
    Decorator registering `run(bank, rows, segments, **expert_inputs)` as the expert backend `name`.

    Args:
        name: what `set_expert_backend` and a bank's `expert_backend` take; not `"auto"` nor a registered name.
        reads_weights: whether the function reads the projections' weights directly (see `ExpertBackend`).
    """
    if name == "auto" or name in EXPERT_BACKENDS:
        raise ValueError(f"The expert backend name {name!r} is taken.")

    def register(run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        EXPERT_BACKENDS[name] = ExpertBackend(run, reads_weights)
        return run

    return register


def expert_backend_names() -> tuple[str, ...]:
    """`"auto"` and every registered backend, in registration order."""
    return ("auto", *EXPERT_BACKENDS)


def check_expert_backend(backend: str) -> str:
    """Returns `backend` if it names an expert backend, else raises a `ValueError` listing them."""
    if backend != "auto" and backend not in EXPERT_BACKENDS:
        raise ValueError(f"Unknown expert backend {backend!r}; choose one of {', '.join(expert_backend_names())}.")
    return backend


def default_expert_backend(rows: torch.Tensor) -> str:
    """The fast backend `"auto"` resolves to for these (R, D) rows (see the module docstring)."""
    if rows.device.type == "cuda" and rows.dtype == torch.bfloat16 and hasattr(F, "grouped_mm"):
        return "grouped_mm"
    return "segment_linear"


def _global_module_hooks() -> bool:
    """Whether hooks registered for every module (`nn.modules.module.register_module_forward_hook` and kin) exist."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def _plain_tensor(tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> bool:
    """A parameter a fast backend may use as is: no tensor subclass, the rows' dtype and device."""
    if tensor is None:
        return True
    return type(tensor) in (nn.Parameter, torch.Tensor) and tensor.dtype == dtype and tensor.device == device


def reads_weights_directly(linear: nn.Module, rows: torch.Tensor) -> bool:
    """
    Whether reading `linear.weight` / `linear.bias` gives exactly what calling `linear` on `rows` computes: a plain
    `nn.Linear` without hooks whose weight and bias are plain tensors of the rows' dtype on the rows' device.
    """
    return _reads_weights_directly(linear, rows.dtype, rows.device)


def _reads_weights_directly(linear: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    if torch.compiler.is_compiling():  # attribute lookups, which `torch.compile` guards on (unlike `__dict__`)
        return (
            type(linear) is nn.Linear
            and not linear._forward_hooks
            and not linear._forward_pre_hooks
            and not hasattr(linear, "_diffusers_hook")
            and not hasattr(linear, "_hf_hook")
            and _plain_tensor(linear.weight, dtype, device)
            and _plain_tensor(linear.bias, dtype, device)
        )
    # eager: the module's own dicts rather than attribute lookups (this runs for every projection of every expert per
    # call, and a failing `hasattr` on a module costs an exception)
    attributes = linear.__dict__
    parameters = linear._parameters
    return (
        type(linear) is nn.Linear
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
        and "forward" not in attributes  # diffusers' HookRegistry and accelerate replace the bound forward
        and "_diffusers_hook" not in attributes
        and "_hf_hook" not in attributes
        and _plain_tensor(parameters["weight"], dtype, device)
        and _plain_tensor(parameters["bias"], dtype, device)
    )


def resolve_expert_backend(requested: str, projections: list[nn.Module], rows: torch.Tensor) -> str:
    """
    The backend a bank runs for this call.

    Args:
        requested: the bank's `expert_backend`.
        projections: every projection module a backend that reads weights would read (O(experts) checks).
        rows: (R, D) the rows the experts run on (their dtype is the compute dtype).

    Returns:
        The requested backend (`default_expert_backend` for `"auto"`), or `"modules"` if it reads weights and any
        projection's weights cannot be read directly (`reads_weights_directly`) or global module hooks exist.
    """
    name = default_expert_backend(rows) if requested == "auto" else check_expert_backend(requested)
    if not EXPERT_BACKENDS[name].reads_weights:
        return name
    if _global_module_hooks():
        return "modules"
    dtype, device = rows.dtype, rows.device
    if not all(_reads_weights_directly(linear, dtype, device) for linear in projections):
        return "modules"
    return name


def expert_parameters(bank: nn.Module, name: str, paths: tuple[str, ...]) -> list[torch.Tensor]:
    """
    Parameter `name` ("weight" or "bias") of the projections at `paths` of every expert, expert-major (E * P
    tensors, the experts' own), or an empty list when they have no bias.
    """
    if torch.compiler.is_compiling():
        tensors = [getattr(linear, name) for linear in bank.projections(*paths)]
    else:
        tensors = [linear._parameters[name] for linear in bank.projections(*paths)]
    return [] if tensors[0] is None else tensors


def stacked_expert_parameters(bank: nn.Module, name: str, paths: tuple[str, ...]) -> torch.Tensor | None:
    """
    (E, sum out, in) weights or (E, sum out) biases of the projections at `paths`, concatenated per expert and
    stacked (a new tensor), or `None` when they have no bias.
    """
    tensors = expert_parameters(bank, name, paths)
    if not tensors:
        return None
    return torch.stack([torch.cat(tensors[e : e + len(paths)]) for e in range(0, len(tensors), len(paths))])


@register_expert_backend("modules", reads_weights=False)
def run_expert_modules(bank: nn.Module, rows: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
    """Calls expert e on its segment of rows (and of the bank's `row_arguments`)."""
    sizes = segments.sizes()
    arguments = [argument.split(sizes) for argument in bank.row_arguments(segments, **expert_inputs)]
    chunks = zip(bank, rows.split(sizes), *arguments)
    return torch.cat([expert(*inputs) for expert, *inputs in chunks], dim=0)


@register_expert_backend("segment_linear", reads_weights=True)
def run_segment_linear(bank: nn.Module, rows: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
    """Every projection as one `segment_linear` on the experts' own weights."""

    def project(hidden: torch.Tensor, *paths: str) -> torch.Tensor:
        weights, biases = expert_parameters(bank, "weight", paths), expert_parameters(bank, "bias", paths)
        return segment_linear(hidden, weights, biases, segments.offsets)

    return bank.forward_projected(rows, segments, project, **expert_inputs)


@register_expert_backend("grouped_mm", reads_weights=True)
def run_grouped_mm(bank: nn.Module, rows: torch.Tensor, segments: ExpertSegments, **expert_inputs) -> torch.Tensor:
    """Every projection as one grouped GEMM over the experts' weights stacked on this call."""

    def project(hidden: torch.Tensor, *paths: str) -> torch.Tensor:
        weight, bias = stacked_expert_parameters(bank, "weight", paths), stacked_expert_parameters(bank, "bias", paths)
        return grouped_linear(hidden, weight, segments, bias)

    return bank.forward_projected(rows, segments, project, **expert_inputs)
