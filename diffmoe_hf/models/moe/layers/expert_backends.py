"""How an expert bank runs its experts: the expert backends, the one place that picks the default, and the rule that
decides when a fast backend may read the experts' weights directly.

Backends (the `expert_backend` of a bank, set for a whole model with `set_expert_backend`):

- `"modules"`: each expert module is called on its segment of rows. Always correct: every hook on the modules runs
  (diffusers' layerwise casting and group offloading, accelerate's device hooks), and wrapped or quantized
  projections (LoRA, torchao) compute as they would anywhere else. One call per expert and projection.
- `"segment_linear"`: one GEMM per (expert, projection) on the experts' own weights, all of them as one MKL grouped
  GEMM for float32 on x86 CPUs (`segment_linear` in `dispatch`), else one `torch.mm` each. No copy of the weights.
- `"grouped_mm"`: one `F.grouped_mm` per projection over the experts' weights stacked into (E, out, in) tensors,
  stacked on every call (no cache, so in-place updates, `.to()` and offloading are always seen). Has a real grouped
  kernel on CUDA for bfloat16; elsewhere it loops over the experts.
- `"auto"` (the default): `"grouped_mm"` for bfloat16 rows on CUDA where `F.grouped_mm` exists, else
  `"segment_linear"`.

The fast backends (`"segment_linear"`, `"grouped_mm"`) read the projections' weights without calling the modules, so
they are valid only while that gives what calling the modules would compute. Whatever backend is requested, a bank
runs `"modules"` instead whenever one of its projections is not a plain `nn.Linear` (a LoRA wrapper, a subclass),
carries a hook (diffusers `HookRegistry`, accelerate, `register_forward_(pre_)hook`, global module hooks), or has a
weight that is a tensor subclass (torchao's quantized weights), on another device than the rows (offloaded, meta)
or of another dtype (stored in a lower precision).

The check is O(experts) cheap attribute reads per call and traces under `torch.compile(fullgraph=True)`; a compiled
graph is guarded on what it read, so wrapping a projection (LoRA), registering a diffusers or accelerate hook or
changing a weight's dtype or device after compilation recompiles. Like every `torch.compile`d module, it does not see
plain `register_forward_(pre_)hook` hooks added after compilation (`torch._dynamo.config.skip_nnmodule_hook_guards`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks


EXPERT_BACKENDS = ("auto", "modules", "segment_linear", "grouped_mm")


def check_expert_backend(backend: str) -> str:
    """Returns `backend` if it names an expert backend, else raises a `ValueError` listing them."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"Unknown expert backend {backend!r}; choose one of {', '.join(EXPERT_BACKENDS)}.")
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
        projections: every projection module a fast backend would read the weights of (O(experts) checks).
        rows: (R, D) the rows the experts run on (their dtype is the compute dtype).

    Returns:
        `"modules"` if requested or if any projection's weights cannot be read directly (`reads_weights_directly`),
        else the requested fast backend (`default_expert_backend` for `"auto"`).
    """
    check_expert_backend(requested)  # also a name set on a bank directly, not through set_expert_backend
    if requested == "modules" or _global_module_hooks():
        return "modules"
    dtype, device = rows.dtype, rows.device
    if not all(_reads_weights_directly(linear, dtype, device) for linear in projections):
        return "modules"
    return default_expert_backend(rows) if requested == "auto" else requested
