"""The Diff-MoE MoE layer (Cheng et al., "Diffusion Transformer with Time-Aware and Space-Adaptive Experts"; not
DiffMoE of Shi et al.): SwiGLU experts with their own low-rank adaLN conditioning and a residual inside each expert,
a per-sample recalibration of the experts' hidden channels, softmax top-k routing and the shared grouped dispatch."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moe import ExpertSegments, GroupedExperts, SoftmaxTopKRouter, segments_from_topk, swiglu_activation


class LowRankModulation(nn.Module):
    """
    `linear_2(relu(linear_1(c)))`: the concatenated (shift, scale, gate), each (…, D). Unlike DiT's adaLN there is no
    SiLU on the conditioning and the first projection has no bias.

    Args:
        dim (`int`): Width D of the conditioning vector and of the modulated tokens.
        modulation_rank (`int`): Bottleneck width r (64 in every Diff-MoE model).
    """

    def __init__(self, *, dim: int, modulation_rank: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, modulation_rank, bias=False)
        self.act = nn.ReLU()
        self.linear_2 = nn.Linear(modulation_rank, 3 * dim)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        """(…, D) conditioning -> (…, 3D) `[shift | scale | gate]`."""
        return self.linear_2(self.act(self.linear_1(conditioning)))


class ModulatedSwiGLU(nn.Module):
    """
    One Diff-MoE expert, (…, D) tokens -> (…, D):

        shift, scale, gate = modulation(c)
        h = norm(x) * (1 + scale) + shift                      (LayerNorm without affine, eps 1e-6)
        out = x + gate * down_proj(silu(gate_proj(h)) * up_proj(h) * channel_weights)

    The residual `x + …` is part of the expert, so a MoE layer built from these returns (sum of weights) * x plus the
    weighted updates. `channel_weights` (the layer's global recalibration) is used by routed experts only.

    Args:
        dim (`int`): Token width D.
        intermediate_size (`int`): Hidden width of the SwiGLU.
        modulation_rank (`int`): Bottleneck of the expert's own adaLN.
    """

    def __init__(self, *, dim: int, intermediate_size: int, modulation_rank: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = LowRankModulation(dim=dim, modulation_rank=modulation_rank)
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, conditioning: torch.Tensor, channel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (…, D) tokens.
            conditioning: (…, D) conditioning vectors, broadcastable against `hidden_states`.
            channel_weights: (…, intermediate_size) multipliers of the hidden channels, or `None`.
        """
        shift, scale, gate = self.modulation(conditioning).chunk(3, dim=-1)
        modulated = self.norm(hidden_states) * (1 + scale) + shift
        intermediate = F.silu(self.gate_proj(modulated)) * self.up_proj(modulated)
        if channel_weights is not None:
            intermediate = intermediate * channel_weights
        return hidden_states + gate * self.down_proj(intermediate)


class ModulatedSwiGLUExperts(GroupedExperts):
    """
    E `ModulatedSwiGLU` experts (`experts.{e}.gate_proj/up_proj/down_proj/modulation`), run through the bank's
    expert backend like every bank. Each row takes the conditioning and channel weights of its sample
    (`segments.token_index // tokens_per_sample`): the `"modules"` backend calls each expert module with them
    (`row_arguments`), and `forward_projected` (what a fast backend runs):

    - computes the E experts' modulations once per (sample, expert) by calling each expert's `modulation` module on
      the (B, D) conditioning (so its hooks and wrappers run), then gathers them per row;
    - asks for the gate and up projections together (one `[gate | up]` output), then the down projection.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): E.
        intermediate_size (`int`): Hidden width of each expert.
        modulation_rank (`int`): Bottleneck of each expert's adaLN.
    """

    projection_paths = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, *, dim: int, num_experts: int, intermediate_size: int, modulation_rank: int):
        expert = dict(dim=dim, intermediate_size=intermediate_size, modulation_rank=modulation_rank)
        super().__init__(lambda: ModulatedSwiGLU(**expert), num_experts)

    def row_arguments(
        self,
        segments: ExpertSegments,
        conditioning: torch.Tensor,
        channel_weights: torch.Tensor,
        tokens_per_sample: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            segments: the layout of the routed rows (`token_index` indexes the flattened (B * tokens_per_sample)
                tokens).
            conditioning: (B, D) per-sample conditioning vectors, or (R, D) per row when `tokens_per_sample` is
                `None`.
            channel_weights: (B, intermediate_size) per-sample recalibration of the hidden channels (per row when
                `tokens_per_sample` is `None`).
            tokens_per_sample: tokens of one sample in the flattened token pool, or `None` for per-row inputs (the
                form `rows_only_expert_inputs` gives).

        Returns:
            (R, D) conditioning and (R, intermediate_size) channel weights of each row's sample.
        """
        if tokens_per_sample is None:
            return conditioning, channel_weights
        sample_index = segments.token_index // tokens_per_sample
        return conditioning[sample_index], channel_weights[sample_index]

    def rows_only_expert_inputs(
        self,
        segments: ExpertSegments,
        conditioning: torch.Tensor,
        channel_weights: torch.Tensor,
        tokens_per_sample: int | None,
    ) -> dict:
        """Each row's conditioning and channel weights (`row_arguments`), with `tokens_per_sample=None`."""
        conditioning, channel_weights = self.row_arguments(
            segments, conditioning=conditioning, channel_weights=channel_weights, tokens_per_sample=tokens_per_sample
        )
        return dict(conditioning=conditioning, channel_weights=channel_weights, tokens_per_sample=None)

    def _row_modulation(
        self, segments: ExpertSegments, conditioning: torch.Tensor, sample_index: torch.Tensor | None
    ) -> torch.Tensor:
        """
        (R, 3D) `[shift | 1 + scale | gate]` of each row's expert on its conditioning: (B, D) per sample with the
        (R,) `sample_index` of each row, or (R, D) per row when `sample_index` is `None`.
        """
        if sample_index is None:  # per-row conditioning: each expert's modulation on its own segment
            chunks = zip(self, conditioning.split(segments.sizes()))
            shift, scale, gate = torch.cat([expert.modulation(chunk) for expert, chunk in chunks]).chunk(3, dim=-1)
            return torch.cat([shift, 1 + scale, gate], dim=-1)
        # modulation of every expert for every sample: (B, E, 3D), then one row per routed token
        modulation = torch.stack([expert.modulation(conditioning) for expert in self], dim=1)
        shift, scale, gate = modulation.chunk(3, dim=-1)
        # `1 + scale` on the small (B, E, D) table, then one gather of all three per routed row
        return torch.cat([shift, 1 + scale, gate], dim=-1)[sample_index, segments.expert_index]

    def forward_projected(
        self,
        rows: torch.Tensor,
        segments: ExpertSegments,
        project: Callable[..., torch.Tensor],
        conditioning: torch.Tensor,
        channel_weights: torch.Tensor,
        tokens_per_sample: int | None,
    ) -> torch.Tensor:
        """(R, D) routed rows sorted by expert -> (R, D) each row's expert output (residual included); the other
        arguments as in `row_arguments`."""
        sample_index = None if tokens_per_sample is None else segments.token_index // tokens_per_sample
        shift, scale, gate = self._row_modulation(segments, conditioning, sample_index).chunk(3, dim=-1)
        modulated = torch.addcmul(shift, F.layer_norm(rows, rows.shape[-1:], eps=1e-6), scale)  # each expert's `norm`
        intermediate = swiglu_activation(project(modulated, "gate_proj", "up_proj"))
        row_channel_weights = (
            channel_weights if sample_index is None else channel_weights.index_select(0, sample_index)
        )
        if torch.is_grad_enabled():
            intermediate = intermediate * row_channel_weights
        else:  # inference: in place, in the (new) projection output
            intermediate = intermediate.mul_(row_channel_weights)
        return torch.addcmul(rows, gate, project(intermediate, "down_proj"))


class SpatialTemporalMoE(nn.Module):
    """
    Diff-MoE feed-forward, (B, N, D) tokens + (B, D) conditioning -> (B, N, D):

        channel_weights = sigmoid(W2 relu(W1 mean_tokens(x)))                  (B, I), one per sample
        out = sum_j w_j * expert_{e_j}(x, c, channel_weights) + shared_expert(x, c)

    with (e_j, w_j) the k most probable experts of `softmax(x @ W_router.T)` and their raw probabilities (not
    renormalised). Every expert adds its input (see `ModulatedSwiGLU`), so the output carries
    `(sum_j w_j + [shared]) * x`, exactly as the original.

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): Routed experts E.
        num_experts_per_tok (`int`): k.
        intermediate_size (`int`): Hidden width I of each routed expert (and of the recalibration output).
        shared_expert_intermediate_size (`int`): Hidden width of the shared expert; 0 for none.
        modulation_rank (`int`): Bottleneck of the experts' adaLN and of the recalibration.
        aux_loss_alpha (`float`): Weight of the router's load-balancing loss (training mode only).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        intermediate_size: int,
        shared_expert_intermediate_size: int = 0,
        modulation_rank: int = 64,
        aux_loss_alpha: float = 0.01,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.router = SoftmaxTopKRouter(
            dim=dim, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, aux_loss_alpha=aux_loss_alpha
        )
        self.recalibration = nn.Sequential(
            nn.Linear(dim, modulation_rank, bias=False),
            nn.ReLU(),
            nn.Linear(modulation_rank, intermediate_size, bias=False),
            nn.Sigmoid(),
        )
        self.experts = ModulatedSwiGLUExperts(
            dim=dim, num_experts=num_experts, intermediate_size=intermediate_size, modulation_rank=modulation_rank
        )
        self.shared_experts = None
        if shared_expert_intermediate_size > 0:
            self.shared_experts = ModulatedSwiGLU(
                dim=dim, intermediate_size=shared_expert_intermediate_size, modulation_rank=modulation_rank
            )

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, N, D) modulated tokens.
            conditioning: (B, D) block conditioning (timestep + class embedding, without SiLU).

        Returns:
            (B, N, D). Routing and recalibration are per token / per sample, so a sample's output does not depend on
            the rest of the batch.
        """
        num_tokens, dim = hidden_states.shape[1:]
        tokens = hidden_states.reshape(-1, dim)
        channel_weights = self.recalibration(hidden_states.mean(dim=1))
        expert_ids, expert_weights = self.router(tokens)
        segments = segments_from_topk(expert_ids, expert_weights, self.num_experts)
        routed = self.experts.forward_routed(
            tokens,
            segments,
            conditioning=conditioning,
            channel_weights=channel_weights,
            tokens_per_sample=num_tokens,
        )
        routed = routed.to(hidden_states.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states, conditioning.unsqueeze(1))
        return routed
