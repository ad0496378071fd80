"""FSDP2 on the data axis of expert parallelism: the non-expert weights sharded over all ranks with torch's
`fully_shard`, while every expert stays whole on the rank that holds it (its gradient reduced by
`reduce_expert_gradients`, as with DDP on the rest)."""

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from .model import expert_banks


def shard_non_experts(model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """
    Shards every parameter of an expert-parallel `model` outside its expert banks over all ranks of the default process
    group: one FSDP2 unit per transformer block (all-gathered for that block's forward and backward only) and one for
    the rest; gradients are reduce-scattered (averaged over the ranks, as DDP does). Every rank must call it, after
    LoRA layers are added and dtypes set, before an optimizer or EMA is made of the parameters. Returns `model`.
    """
    experts = {parameter for _, bank in expert_banks(model) for parameter in bank.parameters()}
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in experts})
    fully_shard(model, mesh=mesh, ignored_params=experts)
    return model


def unsharded_class(model: nn.Module) -> type:
    """The class `model` was built as (`fully_shard` gives a sharded module a subclass of it)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
