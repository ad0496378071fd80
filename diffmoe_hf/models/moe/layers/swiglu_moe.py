"""The token-choice MoE feed-forward over SwiGLU experts that DSMoE, JiTMoE and DiT-MoE share; each family's layer
only picks its router and what the layer adds when it has no shared expert."""

import torch
from torch import nn

from ..ops.routing_layout import segments_from_topk
from .experts import SwiGLU, SwiGLUExperts


class SwiGLUTokenChoiceMoE(nn.Module):
    """
    `router` sends each of the B*N tokens to k of E SwiGLU experts; each token's expert outputs are summed with the
    router's weights, then a shared SwiGLU expert every token passes through is added unweighted. Without a shared
    expert the layer adds its own input if `adds_input_without_shared_experts` (DSMoE, JiTMoE), else nothing
    (DiT-MoE).

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): Routed experts E.
        intermediate_size (`int`): Hidden width of each routed expert.
        router (`nn.Module`): (S, D) tokens -> (expert_ids (S, k), expert_weights (S, k)), e.g. `SoftmaxTopKRouter`.
        shared_expert_intermediate_size (`int`): Hidden width of the shared expert; 0 for none.
        bias (`bool`): Biases on the expert projections.
    """

    adds_input_without_shared_experts: bool = False

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        intermediate_size: int,
        router: nn.Module,
        shared_expert_intermediate_size: int = 0,
        bias: bool = False,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.router = router
        self.experts = SwiGLUExperts(dim=dim, num_experts=num_experts, intermediate_size=intermediate_size, bias=bias)
        self.shared_experts = None
        if shared_expert_intermediate_size > 0:
            self.shared_experts = SwiGLU(dim=dim, intermediate_size=shared_expert_intermediate_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D). Routing is per token, so each sample's output is independent of the batch."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        expert_ids, expert_weights = self.router(tokens)
        routed = self.experts.forward_routed(tokens, segments_from_topk(expert_ids, expert_weights, self.num_experts))
        routed = routed.to(hidden_states.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            return routed + self.shared_experts(hidden_states)
        return routed + hidden_states if self.adds_input_without_shared_experts else routed
