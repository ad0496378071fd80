"""DiffMoE's dynamic-token-selection MoE layer (Shi et al. 2025): expert-choice routing over the batch's token pool,
with a capacity predictor that decides at inference how many tokens each expert takes."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from .moe import ExpertSegments, GeluMLPExperts, segments_from_expert_choice


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
    follow an exponential moving average (decay `ema_decay`) of the k-th largest predicted probability per expert,
    averaged over data-parallel ranks when `torch.distributed` is initialised.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        ema_decay (`float`): Decay of the threshold average (0.95 upstream).
    """

    def __init__(self, dim: int, num_experts: int, ema_decay: float = 0.95):
        super().__init__()
        self.linear_1 = Float32Linear(dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = Float32Linear(dim, num_experts)
        self.register_buffer("expert_threshold", torch.zeros(num_experts))
        self.register_buffer("ema_decay", torch.tensor([ema_decay]))

    def forward(
        self, hidden_states: torch.Tensor, train_tokens_per_expert: int | None = None, count_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        (S, D) tokens -> (S, E) float32 logits. The steps that use the thresholds run here too, inside the module's
        call, so that hooks which onload its buffers for the call (group offloading) cover them:

        Args:
            train_tokens_per_expert: k of a training step: the thresholds move towards the k-th largest predicted
                probability of each expert (`update_threshold`).
            count_tokens: also return the (E,) int64 number of tokens each expert takes at inference
                (`tokens_per_expert`).
        """
        logits = self.linear_2(self.act(self.linear_1(hidden_states)))
        if train_tokens_per_expert is not None:
            self.update_threshold(logits, train_tokens_per_expert)
        return (logits, self.tokens_per_expert(logits)) if count_tokens else logits

    def tokens_per_expert(self, logits: torch.Tensor) -> torch.Tensor:
        """(S, E) logits -> (E,) int64 number of tokens each expert takes at inference."""
        return (logits.sigmoid() > self.expert_threshold.float()).sum(0)

    @torch.no_grad()
    def update_threshold(self, logits: torch.Tensor, tokens_per_expert: int) -> None:
        """Moves each threshold towards the `tokens_per_expert`-th largest predicted probability of its expert."""
        quantile = logits.sigmoid().topk(tokens_per_expert, dim=0).values[-1]
        decay = self.ema_decay.float()
        threshold = self.expert_threshold.float() * decay + (1 - decay) * quantile
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(threshold, op=dist.ReduceOp.SUM)
            threshold /= dist.get_world_size()
        self.expert_threshold.copy_(threshold)


class DynamicTokenMoE(nn.Module):
    """
    DiffMoE feed-forward: E GELU-tanh experts that choose their tokens from the pool of all B*N tokens of the call.
    Not to be confused with Diff-MoE (Cheng et al.), whose experts are chosen per token.

    Gate scores are `softmax(x @ gate.weight.T)` over the experts (float32); a token's output is the sum, over the
    experts that took it, of `score * expert(x)`, without renormalisation. Tokens no expert took get 0 (the block's
    residual still applies). Shared experts, if any, add `shared_experts(x)` for every token.

    - Training: each expert takes its `int(S / E * capacity)` best-scoring tokens of the pool. The capacity
      predictor learns to predict these choices (binary cross-entropy on its logits, of the detached input), and the
      thresholds are updated (see `CapacityPredictor`).
    - Inference: the capacity predictor sets how many tokens k_e each expert takes (counted over the whole pool), the
      gate decides which: expert e takes its k_e best-scoring tokens, not necessarily those that passed the
      threshold.

    So both modes route over the whole batch: a sample's output depends on the other samples of the call.

    Training routes a fixed number of tokens per expert, so its selection needs no host synchronisation. At inference
    the number of routed rows depends on the data: compacting the selection reads it on the host once per layer in
    eager mode (the original code does so once per expert); `torch.compile(fullgraph=True)` traces it with a
    data-dependent size.

    Attributes:
        tokens_per_expert: (E,) int64 tokens each expert took in the last forward (`None` before the first).
        selection: the (token, expert) pairs of the last forward as `ExpertSegments` (`token_index` into the B*N
            flattened tokens, `expert_index`, detached gate `weights`), for inspecting the routing (`None` before the
            first).
        aux_loss: in training mode, `capacity_loss_weight * BCEWithLogits(capacity logits, chosen)` of the last
            forward (`None` in eval mode); `moe_aux_loss(model)` sums it over a model.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width of each expert.
        capacity (`float`): Training capacity factor (1 upstream): each expert takes `S / E * capacity` tokens.
        shared_expert_intermediate_size (`int`): Hidden width of the shared GELU-tanh MLP every token passes through
            (upstream: 8 * dim when it has shared experts); 0 for none.
        capacity_loss_weight (`float`): Weight of the capacity-predictor loss in `aux_loss`.
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
        self.gate = Float32Linear(dim, num_experts, bias=False)
        self.capacity_predictor = CapacityPredictor(dim, num_experts)
        self.experts = GeluMLPExperts(dim=dim, num_experts=num_experts, intermediate_size=intermediate_size)
        self.shared_experts = None
        if shared_expert_intermediate_size > 0:
            self.shared_experts = FeedForward(
                dim, inner_dim=shared_expert_intermediate_size, activation_fn="gelu-approximate", bias=True
            )
        self.tokens_per_expert = None
        self.selection = None
        self.aux_loss = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); routing runs over all B*N tokens together."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = self.gate(tokens).softmax(dim=-1).t()  # (E, S)
        if self.training:
            segments = self._select_for_training(tokens, scores)
        else:
            segments = self._select_for_inference(tokens, scores)
        self.selection = segments._replace(weights=segments.weights.detach())
        routed = self.experts.forward_routed(tokens, segments).to(hidden_states.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed

    def _select_for_inference(self, tokens: torch.Tensor, scores: torch.Tensor) -> ExpertSegments:
        """(S, D) tokens, (E, S) gate scores -> expert e's k_e best-scoring tokens, k_e by the capacity predictor."""
        self.aux_loss = None
        _, self.tokens_per_expert = self.capacity_predictor(tokens.detach(), count_tokens=True)
        weights, token_ids = scores.sort(dim=-1, descending=True)
        return segments_from_expert_choice(token_ids, weights, self.tokens_per_expert)

    def _select_for_training(self, tokens: torch.Tensor, scores: torch.Tensor) -> ExpertSegments:
        """Expert-choice top-k; also sets `aux_loss` and updates the capacity predictor's thresholds."""
        num_tokens = scores.shape[1]
        k = int(num_tokens / self.num_experts * self.capacity)
        if not 1 <= k <= num_tokens:
            raise ValueError(
                f"Training routes int({num_tokens} tokens / {self.num_experts} experts * capacity {self.capacity}) = "
                f"{k} tokens per expert; it must be between 1 and the {num_tokens} tokens of the batch."
            )
        capacity_logits = self.capacity_predictor(tokens.detach(), train_tokens_per_expert=k)  # (S, E)
        weights, token_ids = scores.topk(k, dim=-1)  # (E, k)
        chosen = torch.zeros_like(capacity_logits).scatter_(0, token_ids.t(), 1.0)  # (S, E)
        bce = F.binary_cross_entropy_with_logits(capacity_logits, chosen)
        self.aux_loss = self.capacity_loss_weight * bce
        self.tokens_per_expert = torch.full((self.num_experts,), k, dtype=torch.int64, device=scores.device)
        return segments_from_expert_choice(token_ids, weights)
