"""The Diff-MoE MoE layer (Cheng et al., "Diffusion Transformer with Time-Aware and Space-Adaptive Experts"; not
DiffMoE of Shi et al.): SwiGLU experts with their own low-rank adaLN conditioning and a residual inside each expert,
a per-sample recalibration of the experts' hidden channels, softmax top-k routing and the shared grouped dispatch."""

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import ExpertSegments, dispatch, grouped_linear, segment_linear, segments_from_topk, uses_stacked_weights
from .experts import GroupedExperts, _StackedWeightCache, swiglu_activation
from .routers import SoftmaxTopKRouter


class LowRankModulation(nn.Module):
    """
    `linear_2(relu(linear_1(c)))` split into (shift, scale, gate), each (…, D). Unlike DiT's adaLN there is no SiLU
    on the conditioning and the first projection has no bias.

    Args:
        dim (`int`): Width D of the conditioning vector and of the modulated tokens.
        rank (`int`): Bottleneck width r (64 in every Diff-MoE model).
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, rank, bias=False)
        self.act = nn.ReLU()
        self.linear_2 = nn.Linear(rank, 3 * dim)

    def forward(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.linear_2(self.act(self.linear_1(conditioning))).chunk(3, dim=-1)


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
        rank (`int`): Bottleneck of the expert's own adaLN.
    """

    def __init__(self, dim: int, intermediate_size: int, rank: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = LowRankModulation(dim, rank)
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
        shift, scale, gate = self.modulation(conditioning)
        modulated = self.norm(hidden_states) * (1 + scale) + shift
        intermediate = F.silu(self.gate_proj(modulated)) * self.up_proj(modulated)
        if channel_weights is not None:
            intermediate = intermediate * channel_weights
        return hidden_states + gate * self.down_proj(intermediate)


class ModulatedSwiGLUExperts(GroupedExperts):
    """
    E `ModulatedSwiGLU` experts (`experts.{e}.gate_proj/up_proj/down_proj/modulation`). `forward_grouped` takes each
    row's conditioning from its sample (`segments.token_index // tokens_per_sample`):

    - the E experts' modulations are computed once per (sample, expert), then gathered per row;
    - gate and up projections run as one grouped GEMM over the stacked `[gate; up]` weights, the down projection as a
      second one (`grouped_linear`), as in `SwiGLUExperts`; where `F.grouped_mm` has no grouped kernel (CPU),
      `segment_linear` runs each expert's own weights instead.

    Experts whose linears are wrapped (e.g. by LoRA) run one segment at a time through their modules instead.

    Args:
        num_experts (`int`): E.
        dim (`int`): Token width D.
        intermediate_size (`int`): Hidden width of each expert.
        rank (`int`): Bottleneck of each expert's adaLN.
    """

    _LINEARS = ("gate_proj", "up_proj", "down_proj", "modulation.linear_1", "modulation.linear_2")

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, rank: int):
        super().__init__([ModulatedSwiGLU(dim, intermediate_size, rank) for _ in range(num_experts)])
        self._stacked = _StackedWeightCache()

    def _plain_linears(self) -> bool:
        return all(type(expert.get_submodule(name)) is nn.Linear for expert in self for name in self._LINEARS)

    def _stack_modulations(self) -> dict[str, torch.Tensor]:
        return {
            "modulation_1": torch.stack([e.modulation.linear_1.weight for e in self]),
            "modulation_2": torch.stack([e.modulation.linear_2.weight for e in self]),
            "modulation_2_bias": torch.stack([e.modulation.linear_2.bias for e in self]),
        }

    def _stack(self) -> dict[str, torch.Tensor]:
        return {
            "gate_up": torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self]),
            "down": torch.stack([e.down_proj.weight for e in self]),
            **self._stack_modulations(),
        }

    def _projections(self, rows, segments: ExpertSegments, stacked, grouped: bool, *names: str) -> torch.Tensor:
        """The named projections of each row's expert, concatenated: one grouped GEMM over the `stacked` weights
        (`grouped`), else `segment_linear` over the stacked weights' views or, without them, the experts' own."""
        key = "gate_up" if len(names) == 2 else "down"
        if grouped:
            return grouped_linear(rows, stacked[key], segments)
        if stacked is not None:
            weights = list(stacked[key].unbind(0))
        else:
            weights = [getattr(expert, name).weight for expert in self for name in names]
        return segment_linear(rows, weights, [], segments.offsets)

    def forward_grouped(
        self,
        rows: torch.Tensor,
        segments: ExpertSegments,
        conditioning: torch.Tensor,
        channel_weights: torch.Tensor,
        tokens_per_sample: int,
    ) -> torch.Tensor:
        """
        Args:
            rows: (R, D) routed token rows sorted by expert.
            segments: their layout (`token_index` indexes the flattened (B * tokens_per_sample) tokens).
            conditioning: (B, D) per-sample conditioning vectors.
            channel_weights: (B, intermediate_size) per-sample recalibration of the hidden channels.
            tokens_per_sample: tokens of one sample in the flattened token pool.

        Returns:
            (R, D) each row's expert output (residual included).
        """
        sample_index = segments.token_index // tokens_per_sample
        if not self._plain_linears():
            return self._forward_per_expert(rows, segments, conditioning[sample_index], channel_weights[sample_index])
        grouped = uses_stacked_weights(rows)
        # stacked weights: cached for inference; when training without a grouped kernel only the small modulation
        # weights are stacked and the projections read the experts' own weights (no stacking copy per step)
        use_stacked = grouped or not torch.is_grad_enabled()
        stacked = self._stacked.get(list(self.parameters()), self._stack) if use_stacked else None
        modulation_weights = stacked if stacked is not None else self._stack_modulations()
        # modulation of every expert for every sample: (B, E, 3D), then one row per routed token
        bottleneck = F.relu(torch.einsum("bd,erd->ber", conditioning, modulation_weights["modulation_1"]))
        modulation = torch.einsum("ber,efr->bef", bottleneck, modulation_weights["modulation_2"])
        shift, scale, gate = (modulation + modulation_weights["modulation_2_bias"]).chunk(3, dim=-1)
        # `1 + scale` on the small (B, E, D) table, then one gather of all three per routed row
        per_row = torch.cat([shift, 1 + scale, gate], dim=-1)[sample_index, segments.expert_index]
        shift, scale, gate = per_row.chunk(3, dim=-1)
        modulated = torch.addcmul(shift, F.layer_norm(rows, rows.shape[-1:], eps=1e-6), scale)  # each expert's `norm`
        gate_up = self._projections(modulated, segments, stacked, grouped, "gate_proj", "up_proj")
        intermediate = swiglu_activation(gate_up)
        row_channel_weights = channel_weights.index_select(0, sample_index)
        if torch.is_grad_enabled():
            intermediate = intermediate * row_channel_weights
        else:  # inference: in place, in the (new) projection output
            intermediate = intermediate.mul_(row_channel_weights)
        return torch.addcmul(rows, gate, self._projections(intermediate, segments, stacked, grouped, "down_proj"))

    def _forward_per_expert(self, rows, segments, conditioning, channel_weights) -> torch.Tensor:
        sizes = segments.sizes()
        chunks = zip(self, rows.split(sizes), conditioning.split(sizes), channel_weights.split(sizes))
        return torch.cat([expert(x, c, w) for expert, x, c, w in chunks], dim=0)


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
        shared_intermediate_size (`int`, *optional*): Hidden width of the shared expert; `None` for none.
        rank (`int`): Bottleneck of the experts' adaLN and of the recalibration.
        aux_loss_alpha (`float`): Weight of the router's load-balancing loss (training mode only).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        intermediate_size: int,
        shared_intermediate_size: int | None,
        rank: int = 64,
        aux_loss_alpha: float = 0.01,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.router = SoftmaxTopKRouter(dim, num_experts, num_experts_per_tok, aux_loss_alpha=aux_loss_alpha)
        self.recalibration = nn.Sequential(
            nn.Linear(dim, rank, bias=False), nn.ReLU(), nn.Linear(rank, intermediate_size, bias=False), nn.Sigmoid()
        )
        self.experts = ModulatedSwiGLUExperts(num_experts, dim, intermediate_size, rank)
        self.shared_experts = (
            ModulatedSwiGLU(dim, shared_intermediate_size, rank) if shared_intermediate_size is not None else None
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
        routed = dispatch(
            tokens,
            segments,
            self.experts,
            conditioning=conditioning,
            channel_weights=channel_weights,
            tokens_per_sample=num_tokens,
        )
        routed = routed.to(hidden_states.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states, conditioning.unsqueeze(1))
        return routed
