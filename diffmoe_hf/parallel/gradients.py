"""Gradients of an expert-parallel model: the experts' average over their replicas, and the global gradient norm."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .mesh import ExpertParallelMesh
from .model import expert_banks, expert_parameter_names


def _trainable_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    parameters = [parameter for _, bank in expert_banks(model) for parameter in bank.parameters()]
    return [parameter for parameter in parameters if parameter.requires_grad]


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, mesh: ExpertParallelMesh) -> None:
    """
    Averages the expert gradients as data parallelism averages the others: an expert's gradient on its rank already
    sums the contributions of the K ranks of its expert group (the rows came back through the all-to-all), so it is
    summed over its replicas (`mesh.replica_group`) and divided by the number of processes, the mean over every
    rank's loss that DDP takes for the other weights. One all-reduce of all trainable expert gradients together (a
    missing one counts as zeros, so that every replica reduces the same tensors).
    """
    parameters = _trainable_expert_parameters(model)
    if not parameters:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    gradients = [parameter.grad for parameter in parameters]
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    if mesh.world_size > mesh.expert_size:
        dist.all_reduce(flat, group=mesh.replica_group)
    flat /= mesh.world_size
    for gradient, reduced in zip(gradients, flat.split([gradient.numel() for gradient in gradients])):
        gradient.copy_(reduced.view_as(gradient))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, mesh: ExpertParallelMesh, max_norm: float) -> torch.Tensor:
    """
    `torch.nn.utils.clip_grad_norm_` of the whole (global) model, after `reduce_expert_gradients` and the
    data-parallel reduction of the other gradients: the norm adds the non-expert gradients (equal on every rank under
    DDP; under FSDP2 each rank's shards, summed over all ranks) and the expert gradients of every rank of the expert
    group (each holds its own experts), so every rank scales by the same factor. Returns the (float32) total norm.
    """
    experts = set(expert_parameter_names(model))
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    shared = [grad for name, grad in named if name not in experts and not isinstance(grad, DTensor)]
    sharded = [grad.to_local() for name, grad in named if name not in experts and isinstance(grad, DTensor)]
    local = [grad for name, grad in named if name in experts]

    def squares(gradients: list[torch.Tensor]) -> torch.Tensor:
        return sum((gradient.float().square().sum() for gradient in gradients), torch.zeros(()))

    expert_squares = squares(local)
    dist.all_reduce(expert_squares, group=mesh.expert_group)
    sharded_squares = squares(sharded)  # FSDP2 on the rest: each rank holds its shard of every non-expert gradient
    if sharded:
        dist.all_reduce(sharded_squares)
    total = (squares(shared) + sharded_squares + expert_squares).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, gradient in named:
        gradient.mul_(scale.to(gradient.dtype))
    return total
