"""Token-choice routers. Each returns `(expert_ids (S, k) int64, expert_weights (S, k) float32)` for S tokens, so a
`register_forward_hook` on a router sees every routing decision (used by the routing view and the parity tests). In
training mode they report their statistics (and loss) to the open `MoECollector`, never onto the module.

A router's `statistics_group` (default `None`: this process's tokens) is the process group whose tokens its
training statistics and load-balancing loss describe; expert parallelism sets it to all ranks, so that they are the
global batch's (`diffmoe_hf.parallel`)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..collector import active_moe_collector
from ..ops.rank_reductions import summed_over_ranks, token_mean_over_ranks


def assignments_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(S, k) expert ids -> (E,) int64 number of (token, expert) assignments per expert (no host synchronisation)."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


class SigmoidGroupLimitedRouter(nn.Module):
    """
    DeepSeek-V3 routing (DSMoE, JiTMoE), computed in float32 whatever the model dtype.

    1. `s = sigmoid(x @ W.T)`; choice scores `s_c = s + e_score_correction_bias`.
    2. Experts form `n_group` equal groups; a group's score is the sum of its two best `s_c`; only the `topk_group`
       best groups stay eligible, and experts of the other groups get a choice score of 0.0 (not -inf, as upstream).
    3. The k experts with the highest remaining choice scores are taken; their weights are the un-biased `s`,
       normalised to sum to 1 when k > 1 (not for k == 1), then multiplied by `routed_scaling_factor`.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E, divisible by `n_group` with at least two experts per group.
        num_experts_per_tok (`int`): k.
        n_group (`int`), topk_group (`int`): Group-limited selection (`topk_group == n_group` disables it).
        routed_scaling_factor (`float`): Scale on the routed weights.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        if num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(
                f"num_experts={num_experts} must split into n_group={n_group} groups of at least 2 experts."
            )
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be between 1 and n_group={n_group}.")
        if not 1 <= num_experts_per_tok <= num_experts * topk_group // n_group:
            raise ValueError(
                f"num_experts_per_tok={num_experts_per_tok} must be between 1 and the {num_experts * topk_group // n_group}"
                " experts of the kept groups."
            )
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.statistics_group = None
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_normal_(self.weight)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, D) tokens -> (expert_ids (S, k), expert_weights (S, k) float32)."""
        scores = F.linear(hidden_states.float(), self.weight.float()).sigmoid()
        choice_scores = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            grouped = choice_scores.unflatten(-1, (self.n_group, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            kept_groups = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept_groups, True)
            choice_scores = grouped.masked_fill(~group_mask.unsqueeze(-1), 0.0).flatten(-2)
        expert_ids = choice_scores.topk(self.top_k, dim=-1).indices
        expert_weights = scores.gather(-1, expert_ids)
        if self.top_k > 1:
            expert_weights = expert_weights / (expert_weights.sum(dim=-1, keepdim=True) + 1e-20)
        collector = active_moe_collector() if self.training else None
        if collector is not None:
            assignments = summed_over_ranks(
                assignments_per_expert(expert_ids, self.num_experts), self.statistics_group
            )
            collector.add_statistics(self, tokens_per_expert=assignments)
        return expert_ids, expert_weights * self.routed_scaling_factor


class SoftmaxTopKRouter(nn.Module):
    """
    Softmax top-k routing (DiT-MoE, Diff-MoE of Cheng et al.), computed in float32: `p = softmax(x @ W.T)` over the E experts, the k
    most probable experts are taken, and their weights are the raw probabilities (they do not sum to 1) unless
    `normalize_weights`.

    In training mode it also computes the load-balancing loss of the original code,
    `aux_loss = alpha * sum_e P_e * f_e` over the S tokens of the call, with `P_e` the mean probability of expert e and
    `f_e = E * (assignments to e) / (S * k)`, and reports it with the assignments per expert (`tokens_per_expert`) to
    the open `MoECollector`: the model returns the sum of its layers' losses as `output.aux_loss`, for the training
    loop to add to its objective.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        num_experts_per_tok (`int`): k.
        aux_loss_alpha (`float`): alpha above (0.01 upstream; 0 disables the loss).
        normalize_weights (`bool`): Renormalise the k weights to sum to 1.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        aux_loss_alpha: float = 0.01,
        normalize_weights: bool = False,
    ):
        super().__init__()
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok={num_experts_per_tok} must be between 1 and {num_experts}.")
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.aux_loss_alpha = aux_loss_alpha
        self.normalize_weights = normalize_weights
        self.statistics_group = None
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, D) tokens -> (expert_ids (S, k), expert_weights (S, k) float32)."""
        probs = F.linear(hidden_states.float(), self.weight.float()).softmax(dim=-1)
        expert_weights, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.normalize_weights:
            expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        if self.training:
            assignments = summed_over_ranks(
                assignments_per_expert(expert_ids, self.num_experts), self.statistics_group
            )
            # computed whether or not a collector is open, so that a recomputation under gradient checkpointing
            # records the same autograd graph as the forward it replays
            aux_loss = None
            if self.aux_loss_alpha > 0:
                assigned = expert_ids.numel() if self.statistics_group is None else assignments.sum()
                load = assignments.to(probs.dtype) * self.num_experts / assigned
                aux_loss = self.aux_loss_alpha * (token_mean_over_ranks(probs, self.statistics_group) * load).sum()
            collector = active_moe_collector()
            if collector is not None:
                collector.add_statistics(self, tokens_per_expert=assignments)
                if aux_loss is not None:
                    collector.add_aux_loss(aux_loss)
        return expert_ids, expert_weights
