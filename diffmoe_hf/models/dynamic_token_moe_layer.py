"""DiffMoE's dynamic-token-selection MoE layer (Shi et al. 2025): expert-choice routing over the batch's token pool,
with a capacity predictor that decides at inference how many tokens each expert takes."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from .moe import ExpertSegments, GeluMLPExperts, active_moe_collector, segments_from_expert_choice
from .moe.ops.rank_reductions import mean_over_ranks, summed_over_ranks


class Float32Linear(nn.Linear):
    """
    An `nn.Linear` that computes in float32 whatever the dtype of its input and parameters (routing scores): (…, in)
    -> (…, out) float32. Being an `nn.Linear` called as a module, hooks and wrappers that act on linears (group
    offloading, LoRA, quantization) see it like any other.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden_states.float(), self.weight.float(), bias)


class CapacityPredictor(nn.Module):
    """
    Predicts, per token and expert, whether the expert would pick the token, and holds the per-expert decision
    thresholds calibrated during training.

    `logits = linear_2(silu(linear_1(x)))`, computed in float32. At inference expert e takes
    `#{tokens with sigmoid(logits[:, e]) > expert_threshold[e]}` tokens (strict `>`). In training the thresholds
    follow an exponential moving average (decay `ema_decay`) of the k-th largest predicted probability per expert;
    the model applies it once per training forward, after its blocks (`update_capacity_thresholds`).

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        ema_decay (`float`): Decay of the threshold average (0.95 upstream).
    """

    def __init__(self, *, dim: int, num_experts: int, ema_decay: float = 0.95):
        super().__init__()
        self.linear_1 = Float32Linear(dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = Float32Linear(dim, num_experts)
        self.register_buffer("expert_threshold", torch.zeros(num_experts))
        self.register_buffer("ema_decay", torch.tensor([ema_decay]))

    def forward(
        self, hidden_states: torch.Tensor, count_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        (S, D) tokens -> (S, E) float32 logits; with `count_tokens`, also the (E,) int64 number of tokens each expert
        takes at inference (`tokens_per_expert`), counted here, inside the module's call, so that hooks which onload
        its buffers for the call (group offloading) cover the thresholds.
        """
        logits = self.linear_2(self.act(self.linear_1(hidden_states)))
        return (logits, self.tokens_per_expert(logits)) if count_tokens else logits

    def tokens_per_expert(self, logits: torch.Tensor) -> torch.Tensor:
        """(S, E) logits -> (E,) int64 number of tokens each expert takes at inference."""
        return (logits.sigmoid() > self.expert_threshold.float()).sum(0)

    @torch.no_grad()
    def moved_thresholds(self, quantile: torch.Tensor) -> torch.Tensor:
        """(E,) target probabilities -> the (E,) float32 thresholds after one EMA step towards them (not stored)."""
        decay = self.ema_decay.float().to(quantile.device)
        return self.expert_threshold.float().to(quantile.device) * decay + (1 - decay) * quantile


def capacity_quantile(logits: torch.Tensor, tokens_per_expert: int) -> torch.Tensor:
    """(S, E) capacity logits -> (E,) float32 `tokens_per_expert`-th largest predicted probability of each expert."""
    return logits.detach().sigmoid().topk(tokens_per_expert, dim=0).values[-1]


@torch.no_grad()
def update_capacity_thresholds(updates: list[tuple[CapacityPredictor, torch.Tensor]]) -> None:
    """
    Moves each predictor's `expert_threshold` one EMA step towards its (E,) quantile, as the original
    (KwaiVGI/DiffMoE) does at every training forward, averaged over the data-parallel ranks when
    `torch.distributed` is initialised.

    The average is taken here, in the model's forward, with one `all_reduce` for all layers: the thresholds are
    buffers, and DDP (`broadcast_buffers=True`, its default) overwrites every rank's buffers with rank 0's at the start
    of each forward. An average deferred to the training loop would have to run on every rank before every next
    forward; any forward without it (a loop that does not know about it, a bare model call) would silently keep rank
    0's thresholds and drop the other ranks' quantiles. Every rank must therefore run the same number of
    training-mode forwards (as DDP requires anyway).

    Args:
        updates: `(capacity predictor, quantile)` pairs of one model call, in the same order on every rank.
    """
    if not updates:
        return
    thresholds = torch.cat([predictor.moved_thresholds(quantile) for predictor, quantile in updates])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(thresholds, op=dist.ReduceOp.SUM)
        thresholds /= dist.get_world_size()
    for (predictor, _), threshold in zip(updates, thresholds.split([q.numel() for _, q in updates])):
        predictor.expert_threshold.copy_(threshold)


class ExpertChoiceRouter(nn.Module):
    """
    DiffMoE's router: softmax gate scores `softmax(x @ weight.T)` over the E experts (float32), then each expert takes
    its best-scoring tokens of the whole pool. Its output, an `ExpertSegments`, is the layer's complete routing, so a
    `register_forward_hook` on the router sees every decision (used by `diffmoe_hf.routing.record_routing`).

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
    """

    def __init__(self, *, dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: int | torch.Tensor) -> ExpertSegments:
        """
        Args:
            tokens: (S, D) the pool of all tokens of the call.
            tokens_per_expert: How many tokens each expert takes: one int k for all (training: top-k per expert,
                no host synchronisation), or an (E,) int64 tensor of counts k_e (inference).

        Returns:
            `ExpertSegments`: expert e's chosen tokens (`token_index` into the S tokens), best first, weighted by their
            gate scores (with their graph).
        """
        scores = F.linear(tokens.float(), self.weight.float()).softmax(dim=-1).t()  # (E, S)
        if isinstance(tokens_per_expert, int):
            weights, token_ids = scores.topk(tokens_per_expert, dim=-1)  # (E, k)
            return segments_from_expert_choice(token_ids, weights)
        weights, token_ids = scores.sort(dim=-1, descending=True)
        return segments_from_expert_choice(token_ids, weights, tokens_per_expert)


class DynamicTokenMoE(nn.Module):
    """
    DiffMoE feed-forward: E GELU-tanh experts that choose their tokens from the pool of all B*N tokens of the call.
    Not to be confused with Diff-MoE (Cheng et al.), whose experts are chosen per token.

    Router scores are `softmax(x @ router.weight.T)` over the experts (float32); a token's output is the sum, over the
    experts that took it, of `score * expert(x)`, without renormalisation. Tokens no expert took get 0 (the block's
    residual still applies). Shared experts, if any, add `shared_experts(x)` for every token.

    - Training: each expert takes its `int(S / E * capacity)` best-scoring tokens of the pool. The capacity
      predictor learns to predict these choices: its loss, `capacity_loss_weight * BCEWithLogits(capacity logits,
      chosen)` on the detached input, goes to the open `MoECollector` (the model returns it in `output.aux_loss`),
      with the statistics `tokens_per_expert` and `capacity_quantile` (the k-th largest predicted probability per
      expert), from which the model moves the thresholds once per call (`update_capacity_thresholds`).
    - Inference: the capacity predictor sets how many tokens k_e each expert takes (counted over the whole pool), the
      router decides which: expert e takes its k_e best-scoring tokens, not necessarily those that passed the
      threshold.

    With a `statistics_group` (expert parallelism sets it to all ranks; default `None`), each rank still selects among
    its own tokens, as a data-parallel run of the original does, and the reported loss and statistics are those of
    all ranks: the mean capacity loss and capacity quantile, the summed tokens per expert.

    So both modes route over the whole batch: a sample's output depends on the other samples of the call. The
    routing of a call is the output of `router` (an `ExpertSegments`); nothing is stored on the module.

    Training routes a fixed number of tokens per expert, so its selection needs no host synchronisation. At inference
    the number of routed rows depends on the data: compacting the selection reads it on the host once per layer in
    eager mode (the original code does so once per expert); `torch.compile(fullgraph=True)` traces it with a
    data-dependent size.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width of each expert.
        capacity (`float`): Training capacity factor (1 upstream): each expert takes `S / E * capacity` tokens.
        shared_expert_intermediate_size (`int`): Hidden width of the shared GELU-tanh MLP every token passes through
            (upstream: 8 * dim when it has shared experts); 0 for none.
        capacity_loss_weight (`float`): Weight of the capacity-predictor loss.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        intermediate_size: int,
        capacity: float = 1.0,
        shared_expert_intermediate_size: int = 0,
        capacity_loss_weight: float = 1.0,
    ):
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be positive.")
        self.num_experts = num_experts
        self.capacity = capacity
        self.capacity_loss_weight = capacity_loss_weight
        self.statistics_group = None
        self.router = ExpertChoiceRouter(dim=dim, num_experts=num_experts)
        self.capacity_predictor = CapacityPredictor(dim=dim, num_experts=num_experts)
        self.experts = GeluMLPExperts(dim=dim, num_experts=num_experts, intermediate_size=intermediate_size)
        self.shared_experts = None
        if shared_expert_intermediate_size > 0:
            self.shared_experts = FeedForward(
                dim, inner_dim=shared_expert_intermediate_size, activation_fn="gelu-approximate", bias=True
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); routing runs over all B*N tokens together."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.training:
            segments = self._route_for_training(tokens)
        else:
            _, tokens_per_expert = self.capacity_predictor(tokens.detach(), count_tokens=True)
            segments = self.router(tokens, tokens_per_expert)
        routed = self.experts.forward_routed(tokens, segments).to(hidden_states.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed

    def _route_for_training(self, tokens: torch.Tensor) -> ExpertSegments:
        """Expert-choice top-k; reports the capacity loss and the threshold targets to the open collector."""
        num_tokens = tokens.shape[0]
        k = int(num_tokens / self.num_experts * self.capacity)
        if not 1 <= k <= num_tokens:
            raise ValueError(
                f"Training routes int({num_tokens} tokens / {self.num_experts} experts * capacity {self.capacity}) = "
                f"{k} tokens per expert; it must be between 1 and the {num_tokens} tokens of the batch."
            )
        segments = self.router(tokens, k)
        capacity_logits = self.capacity_predictor(tokens.detach())  # (S, E)
        chosen = torch.zeros_like(capacity_logits)
        chosen[segments.token_index, segments.expert_index] = 1.0
        # computed whether or not a collector is open, so that a recomputation under gradient checkpointing records
        # the same autograd graph as the forward it replays
        group = self.statistics_group
        capacity_loss = self.capacity_loss_weight * F.binary_cross_entropy_with_logits(capacity_logits, chosen)
        capacity_loss = mean_over_ranks(capacity_loss, group)
        collector = active_moe_collector()
        if collector is not None:
            collector.add_aux_loss(capacity_loss)
            tokens_per_expert = torch.full((self.num_experts,), k, dtype=torch.int64, device=tokens.device)
            collector.add_statistics(
                self,
                tokens_per_expert=summed_over_ranks(tokens_per_expert, group),
                capacity_quantile=mean_over_ranks(capacity_quantile(capacity_logits, k), group),
            )
        return segments
