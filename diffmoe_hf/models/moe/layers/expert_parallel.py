"""The `"expert_parallel"` expert backend: each rank of an expert-parallel group holds a contiguous block of every
bank's experts (`expert_placement`), and a bank's rows travel to the rank holding their expert and back.

For a bank whose `expert_parallel_group` is set (`diffmoe_hf.parallel.enable_expert_parallel` does it), one call:

1. the (E,) rows per expert are exchanged (`all_to_all_single`), so every rank knows how many rows it sends to and
   receives from each rank, and for which of its experts;
2. the rows, and the bank's per-row inputs (`rows_only_expert_inputs`: e.g. the per-sample conditioning and channel
   weights of Diff-MoE's modulated experts, Cheng et al.), go to their experts' ranks with the differentiable
   `all_to_all_single_autograd` of `torch.distributed._functional_collectives` (gradients flow back the same way);
3. the received rows are sorted by local expert and run through the fast backend `"auto"` resolves to (or
   `"modules"` where LoRA, hooks, quantized or offloaded weights require it, as on one process);
4. the outputs return to the rows' ranks, in the order the rows left (a second exchange).

The routing weights stay with the tokens (the bank's caller applies them), so only activations travel: for R routed
rows of width D on a rank, 2 R D values leave it per layer (forward), plus the per-row inputs. Without a group
(a single process) the backend runs `"auto"` on its own experts and costs nothing more.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch import nn

from ..ops.routing_layout import ExpertSegments
from .expert_backends import EXPERT_BACKENDS, register_expert_backend, resolve_expert_backend


def _exchanged_counts(segments: ExpertSegments, group: dist.ProcessGroup) -> torch.Tensor:
    """(E,) rows per expert of this rank -> (K, E/K) int64: the rows each rank sends to this rank's experts."""
    counts = torch.diff(segments.offsets, prepend=segments.offsets.new_zeros(1)).to(torch.int64)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received.view(dist.get_world_size(group), -1)


def _exchange(tensor: torch.Tensor, send_sizes: list[int], receive_sizes: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of the rows of `tensor`: `send_sizes[j]` leading rows go to rank j in turn."""
    return functional_collectives.all_to_all_single_autograd(tensor.contiguous(), receive_sizes, send_sizes, group)


def _local_segments(received_counts: torch.Tensor) -> tuple[torch.Tensor, ExpertSegments]:
    """
    (K, E/K) rows received per (source rank, local expert), in arrival order (source-major) -> the permutation that
    sorts the received rows by local expert (stable: each expert's rows keep their source order), and the
    `ExpertSegments` of the sorted rows (each row its own token; `expert_index` the bank's local expert position).
    """
    num_sources, num_local = received_counts.shape
    local_expert = torch.arange(num_local, device=received_counts.device).repeat(num_sources)
    arrival_expert = local_expert.repeat_interleave(received_counts.reshape(-1))
    order = torch.argsort(arrival_expert, stable=True)
    offsets = torch.cumsum(received_counts.sum(0), 0).to(torch.int32)
    token_index = torch.arange(order.numel(), device=order.device)
    return order, ExpertSegments(token_index, arrival_expert[order], None, offsets)


@register_expert_backend("expert_parallel", reads_weights=False)
def run_expert_parallel(
    bank: nn.Module, rows: torch.Tensor, segments: ExpertSegments, **expert_inputs
) -> torch.Tensor:
    """Sends each row to the rank of its expert, runs the local experts there, and brings the outputs back."""
    group = bank.expert_parallel_group
    if group is None:
        return EXPERT_BACKENDS[resolve_expert_backend("auto", bank.projections(), rows)].run(
            bank, rows, segments, **expert_inputs
        )
    received_counts = _exchanged_counts(segments, group)
    counts = torch.diff(segments.offsets, prepend=segments.offsets.new_zeros(1))
    send_sizes = counts.view(received_counts.shape[0], -1).sum(1).tolist()
    receive_sizes = received_counts.sum(1).tolist()
    row_inputs = bank.rows_only_expert_inputs(segments, **expert_inputs)
    order, local_segments = _local_segments(received_counts)

    def arrive(tensor: torch.Tensor) -> torch.Tensor:
        return _exchange(tensor, send_sizes, receive_sizes, group).index_select(0, order)

    local_rows = arrive(rows)
    local_inputs = {
        name: arrive(value) if isinstance(value, torch.Tensor) else value for name, value in row_inputs.items()
    }
    backend = resolve_expert_backend("auto", bank.projections(), local_rows)
    local_out = EXPERT_BACKENDS[backend].run(bank, local_rows, local_segments, **local_inputs)
    arrival_out = local_out.index_select(0, torch.argsort(order))  # back in arrival order
    return _exchange(arrival_out, receive_sizes, send_sizes, group)
