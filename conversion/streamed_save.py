"""Writing a converted transformer shard by shard, casting each tensor to its saved dtype only when its shard is
written, so that converting never holds a cast copy of the model.

The converted model adopts the checkpoint's tensors as they are (memory-mapped from a `torch.save` zip file, in the
checkpoint's dtype; `state_dict_utils.load_converted_state_dict`). `save_transformer_streamed` writes it in the layout
diffusers' `ModelMixin.save_pretrained` writes (`config.json`, `diffusion_pytorch_model.safetensors` or numbered
shards with a `.safetensors.index.json`), in the saved dtype (routers, `_keep_in_fp32_modules`, stay float32): at any
time it holds the cast tensors of one shard, so peak memory is about one shard plus the largest tensor, whatever the
size of the model. (`finite_weights.check_finite_after_cast` casts one tensor at a time too.)
"""

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from .hub_folder import shard_size_bytes


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def saved_dtype(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype `tensor` (state-dict key `name`) is saved in: float32 inside `_keep_in_fp32_modules` (routers),
    `dtype` for other floating-point tensors, its own dtype otherwise."""
    if not tensor.is_floating_point():
        return tensor.dtype
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return torch.float32 if keep.intersection(name.split(".")[:-1]) else dtype


def _shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """The keys in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def save_transformer_streamed(
    model: nn.Module, save_directory: str, dtype: torch.dtype, max_shard_size: int | str = "5GB"
) -> None:
    """
    Writes `model` (its config and its state dict cast to `dtype`, see `saved_dtype`) into `save_directory` as
    diffusers' `save_pretrained(safe_serialization=True, max_shard_size=...)` lays it out, one shard in memory at a
    time.
    """
    os.makedirs(save_directory, exist_ok=True)
    model.save_config(save_directory)
    tensors = model.state_dict()
    dtypes = {name: saved_dtype(model, name, tensor, dtype) for name, tensor in tensors.items()}
    sizes = {name: tensor.numel() * dtypes[name].itemsize for name, tensor in tensors.items()}
    shards = _shards(sizes, shard_size_bytes(max_shard_size))
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        filename = WEIGHTS_NAME
        if len(shards) > 1:
            filename = WEIGHTS_NAME.replace(".safetensors", f"-{number:05d}-of-{len(shards):05d}.safetensors")
        shard = {name: tensors[name].to(dtypes[name]).contiguous() for name in names}
        save_file(shard, os.path.join(save_directory, filename), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(names, filename))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(save_directory, INDEX_NAME), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)


def save_pipeline_transformer_streamed(model: nn.Module, dtype: torch.dtype) -> None:
    """
    Makes the pipeline's `save_pretrained` write `model` (its transformer) with `save_transformer_streamed` in
    `dtype`: diffusers saves each component through the component's own `save_pretrained`, which this replaces on
    this one object.
    """

    def save_pretrained(save_directory, safe_serialization: bool = True, max_shard_size="5GB", **kwargs) -> None:
        save_transformer_streamed(model, save_directory, dtype, max_shard_size)

    model.save_pretrained = save_pretrained
