"""Models of a real size with random weights, built without ever holding all their weights: the model is created on
the meta device, its non-expert weights are drawn in memory (they stay resident in every tier), and each expert bank
is drawn right before an expert-offload tier takes it (`enable_expert_offload(..., materialize_bank=...)`), so host
memory holds at most one bank besides the resident weights."""

import math

import torch
from torch import nn

from diffmoe_hf.conversion.low_memory import init_empty_model
from diffmoe_hf.models.moe.offload import enable_expert_offload, expert_linears


def _random_(parameter: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """In place, in the parameter's dtype (no temporaries): uniform with variance 1/fan_in for matrices (unit-scale
    activations), 1 for norm gains, N(0, 0.1^2) for the rest."""
    if parameter.dim() >= 2:
        bound = math.sqrt(3 / parameter[0].numel())
        parameter.data.uniform_(-bound, bound, generator=generator)
    elif "norm" in name:
        parameter.data.fill_(1.0)
    else:
        parameter.data.normal_(0.0, 0.1, generator=generator)


def _materialize(module: nn.Module, prefix: str, dtype: torch.dtype, generator: torch.Generator, skip=()) -> None:
    """Gives every meta parameter of `module` (except those in `skip`) random values in `dtype` on the CPU."""
    for name, submodule in module.named_modules(prefix=prefix):
        for parameter_name, parameter in list(submodule.named_parameters(recurse=False)):
            if parameter.is_meta and id(parameter) not in skip:
                data = torch.empty(parameter.shape, dtype=dtype)
                submodule._parameters[parameter_name] = nn.Parameter(data, requires_grad=False)
                _random_(submodule._parameters[parameter_name], f"{name}.{parameter_name}", generator)


def streamed_model(
    model_cls: type[nn.Module],
    config: dict,
    tier: str,
    offload_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    stored_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> nn.Module:
    """
    `model_cls(**config)` with random weights in `dtype`, its routed experts in `tier` (`disk`, `int8`, `fp8` or
    `none`), built bank after bank (see the module docstring).

    Args:
        stored_dtype: the dtype the experts are drawn in and the disk tier stores (default `dtype`); the model is
            cast to `dtype` afterwards, which for offloaded experts costs nothing (each projection is cast when it
            runs).
    """
    stored_dtype = stored_dtype or dtype
    generator = torch.Generator().manual_seed(seed)
    model = init_empty_model(model_cls, **config).eval()
    experts = {id(p) for _, linear in expert_linears(model) for p in linear.parameters()}
    _materialize(model, "", dtype, generator, skip=experts)

    def materialize_bank(name: str, bank: nn.Module) -> None:
        _materialize(bank, name, stored_dtype, generator)

    if tier == "none":
        for name, bank in model.named_modules():
            if any(id(p) in experts for p in bank.parameters(recurse=False)):
                materialize_bank(name, bank)
    else:
        enable_expert_offload(model, tier, offload_dir, materialize_bank=materialize_bank)
    return model.to(dtype) if stored_dtype != dtype else model
