"""How routed (token, expert) pairs are laid out for the experts: sorted by expert into contiguous segments, and the
weighted expert outputs summed back onto their tokens.

Token-choice routing (each token picks k experts: DSMoE, JiTMoE, DiT-MoE, Diff-MoE of Cheng et al.) and expert-choice routing
(each expert picks its tokens: DiffMoE of Shi et al.) both end in one `ExpertSegments`, so every expert bank runs on the same
layout whichever way the tokens were chosen.
"""

from typing import NamedTuple

import torch


class ExpertSegments(NamedTuple):
    """
    Routed rows sorted by expert.

    Attributes:
        token_index: (R,) int64, the token each row reads and writes.
        expert_index: (R,) int64, the expert of each row (non-decreasing).
        weights: (R,) routing weight of each row, or `None` when the caller weights the rows itself.
        offsets: (E,) int32 end offset of each expert's segment (`offsets[-1] == R`), on the tokens' device.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weights: torch.Tensor | None
    offsets: torch.Tensor

    def sizes(self) -> list[int]:
        """Rows per expert as Python ints (synchronises with the device; fallback paths only)."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()


def segments_from_topk(
    expert_ids: torch.Tensor, expert_weights: torch.Tensor | None, num_experts: int
) -> ExpertSegments:
    """
    Sorts token-choice routing by expert.

    Args:
        expert_ids: (S, k) int64, the k experts chosen by each of S tokens.
        expert_weights: (S, k) weights of those choices, or `None`.
        num_experts: E.
    """
    flat_experts = expert_ids.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_experts.device)
    counts = counts.index_add_(0, flat_experts, torch.ones_like(flat_experts))  # static shape, unlike bincount
    return ExpertSegments(
        token_index=order // expert_ids.shape[1],
        expert_index=flat_experts[order],
        weights=None if expert_weights is None else expert_weights.reshape(-1)[order],
        offsets=torch.cumsum(counts, 0).to(torch.int32),
    )


def segments_from_expert_choice(
    token_ids: torch.Tensor, weights: torch.Tensor, tokens_per_expert: torch.Tensor | None = None
) -> ExpertSegments:
    """
    Lays out expert-choice routing (each expert picks its tokens) as expert segments.

    Args:
        token_ids: (E, K) int64, the tokens each expert ranked best first.
        weights: (E, K) the weight of each (expert, token) choice.
        tokens_per_expert: (E,) int64 number of leading choices expert e keeps (at most K), or `None` to keep all K.
            Variable counts make the number of rows data-dependent: compacting them reads it on the host once.

    Returns:
        `ExpertSegments` with expert e's kept tokens as its segment.
    """
    num_experts, num_choices = token_ids.shape
    expert_ids = torch.arange(num_experts, device=token_ids.device).unsqueeze(1).expand(num_experts, num_choices)
    if tokens_per_expert is None:
        offsets = torch.arange(1, num_experts + 1, device=token_ids.device, dtype=torch.int32) * num_choices
        return ExpertSegments(token_ids.reshape(-1), expert_ids.reshape(-1), weights.reshape(-1), offsets)
    keep = torch.arange(num_choices, device=token_ids.device) < tokens_per_expert.unsqueeze(1)
    return ExpertSegments(
        token_index=token_ids[keep],
        expert_index=expert_ids[keep],
        weights=weights[keep],
        offsets=torch.cumsum(tokens_per_expert, 0).to(torch.int32),
    )


def combine_segments(
    expert_out: torch.Tensor, segments: ExpertSegments, num_tokens: int, scale_in_place: bool = False
) -> torch.Tensor:
    """
    Sums the (R, D) weighted expert outputs back onto their tokens -> (num_tokens, D). With `scale_in_place` the
    routing weights are applied in `expert_out` itself (the caller no longer needs it), saving an (R, D) temporary.
    """
    if segments.weights is not None:
        weights = segments.weights.unsqueeze(-1).to(expert_out.dtype)
        expert_out = expert_out.mul_(weights) if scale_in_place else expert_out * weights
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add_(0, segments.token_index, expert_out)
