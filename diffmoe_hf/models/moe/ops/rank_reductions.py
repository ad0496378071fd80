"""Routing quantities reduced over the ranks of a process group, for MoE layers whose statistics and auxiliary losses
must describe the global batch of all ranks (expert parallelism sets a layer's `statistics_group`). With
`group=None` every function computes the single-process value of its own input, as before."""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives


def summed_over_ranks(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(E,) per-rank counts (e.g. assignments per expert) -> their sum over the ranks of `group` (no gradient)."""
    if group is None:
        return counts
    total = counts.clone()
    dist.all_reduce(total, group=group)
    return total


def _differentiable_sum(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`value` summed over the ranks of `group`, in rank order (the same bits on every rank), with its gradient: every
    rank's value is gathered (`all_gather_single_autograd`, whose backward sums each rank's upstream gradients)."""
    gathered = functional_collectives.all_gather_single_autograd(value.unsqueeze(0), gather_dim=0, group=group)
    return gathered.sum(0)


def token_mean_over_ranks(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """
    (S, E) per-token values of this rank -> (E,) their mean over the tokens of every rank of `group`, with its
    gradient: the backward of the sum over ranks sums every rank's upstream gradient, so after data-parallel gradient
    averaging each rank's parameters get exactly the gradient of the global mean.
    """
    if group is None:
        return values.mean(0)
    sums = torch.cat([values.sum(0), values.new_full((1,), values.shape[0])])
    sums = _differentiable_sum(sums, group)
    return sums[:-1] / sums[-1]


def mean_over_ranks(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A per-rank scalar or tensor (e.g. a loss over this rank's tokens) -> its mean over the ranks of `group`, with
    its gradient (each rank's own term keeps gradient 1 after data-parallel averaging, as without the mean)."""
    if group is None:
        return value
    return _differentiable_sum(value, group) / dist.get_world_size(group)
