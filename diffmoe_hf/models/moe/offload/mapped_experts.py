"""The `disk` tier: a bank's expert weights live in a safetensors file and are memory-mapped while a projection runs.

`offload_linears_to_file` writes the parameters of some `nn.Linear`s into one safetensors file and replaces each
parameter's data by an empty placeholder of its dtype and device. A forward pre-hook on each linear maps its tensors
from the file (`safetensors.safe_open`: the tensors are views of a private file mapping, so reading them costs page
cache, not anonymous memory) and casts them to the placeholder's dtype and device, which follow `.to()` calls on the
model (a cast or a device copy is a temporary of one projection); a forward hook puts the placeholders back, which
drops the mapping. So at most one projection's weights are held at a time, on every device, and `model.to(dtype)` or
`model.to(device)` cost nothing for offloaded experts. A state-dict hook returns the mapped tensors, so
`save_pretrained` of an offloaded model writes its real weights.

diffusers' own disk offload (`apply_group_offloading(..., offload_to_disk_path=...)`) is not used for this tier:
between calls it keeps a full-size `torch.empty_like` placeholder per tensor (memory that a cast by `.to(dtype)`
touches) and loads files back in the dtype they were written in, so a model stored in bfloat16 and computed in
float32 would need all experts in float32 in memory.
"""

import functools
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device)


class MappedLinearWeights:
    """
    The hooks of one offloaded linear: its parameters `names` are the tensors `keys` of `path`.

    Attributes:
        path: the safetensors file.
        keys: parameter name ("weight", "bias") -> tensor name in the file.
    """

    def __init__(self, path: str, keys: dict[str, str]):
        self.path = path
        self.keys = keys

    def load(self, module: nn.Module, *args) -> None:
        """Forward pre-hook: maps the tensors in, in the placeholders' dtype and device."""
        with safe_open(self.path, framework="pt", device="cpu") as weights:
            for name, key in self.keys.items():
                parameter = module._parameters[name]
                parameter.data = weights.get_tensor(key).to(parameter.device, parameter.dtype)

    def release(self, module: nn.Module, *args) -> None:
        """Forward hook: back to empty placeholders (drops the mapping)."""
        for name in self.keys:
            parameter = module._parameters[name]
            parameter.data = _placeholder(parameter)

    def state_dict_hook(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        """`state_dict()` gives the mapped tensors, in the placeholders' dtype, instead of the placeholders."""
        with safe_open(self.path, framework="pt", device="cpu") as weights:
            for name, key in self.keys.items():
                if prefix + name in state_dict:
                    placeholder = module._parameters[name]
                    state_dict[prefix + name] = weights.get_tensor(key).to(placeholder.device, placeholder.dtype)


def offload_linears_to_file(linears: list[tuple[str, nn.Linear]], path: str) -> None:
    """
    Writes the parameters of `linears` ((name, module) pairs; names unique) into the safetensors file `path`
    (written under a temporary name, then renamed) in their current dtype, and offloads them to it (see the module
    docstring). The linears' parameters must hold real data (not the meta device).
    """
    tensors = {}
    for name, linear in linears:
        for parameter_name, parameter in linear.named_parameters(recurse=False):
            if parameter.is_meta:
                raise ValueError(f"{name}.{parameter_name} is on the meta device; load the weights before offloading.")
            tensors[f"{name}.{parameter_name}"] = parameter.detach().to("cpu").contiguous()
    partial = f"{path}.partial"
    save_file(tensors, partial)
    os.replace(partial, path)
    del tensors
    for name, linear in linears:
        mapped = MappedLinearWeights(path, {p: f"{name}.{p}" for p, _ in linear.named_parameters(recurse=False)})
        mapped.release(linear)
        linear.register_forward_pre_hook(mapped.load)
        linear.register_forward_hook(mapped.release)
        # a partial: the hook registry marks the callable with an attribute, which bound methods do not take
        linear.register_state_dict_post_hook(functools.partial(MappedLinearWeights.state_dict_hook, mapped))
