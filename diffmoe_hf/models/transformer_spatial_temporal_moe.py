"""Diff-MoE: "Diffusion Transformer with Time-Aware and Space-Adaptive Experts" (Cheng et al.; original code
kunncheng/Diff-MoE, `models.py`). Not to be confused with DiffMoE (Shi et al., KwaiVGI/DiffMoE, dynamic token
selection), which is `DynamicTokenMoETransformer2DModel`.

Differences from diffusers' `DiTTransformer2DModel`, all deliberate (they are what the original models compute):
- no absolute position embedding: the original keeps an all-zero `pos_embed` parameter (the converter checks that it
  is zero and drops it); positions come from a 2-D rotary embedding in attention whose channel pairs alternate between
  the column and the row (`rope_2d_alternating`);
- after attention, a 5x5 depthwise convolution of the token grid feeds the MoE branch's norm only (it is not added to
  the residual stream);
- the feed-forward is a softmax top-k MoE whose experts carry their own low-rank adaLN and residual, with a
  per-sample recalibration of the routed experts' hidden channels (see `SpatialTemporalMoE`);
- the timestep is the unscaled DDPM index (0..999) or rectified-flow time in [0, 1] (1 = noise), embedded with DiT's
  original frequencies; the output keeps 2C channels (learned sigma).
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import RotaryTables, rotary_tables
from .blocks import AdaLNZeroTransformerBlock, PatchOutputLayer, modulate
from .embeddings import TimestepClassEmbedding
from .initialization import initialize_dit, initialize_softmax_routers, torch_default_conv
from .modeling_common import DiTForwardMixin
from .presets import preset_config
from .spatial_temporal_moe_layer import SpatialTemporalMoE
from .validation import check_model_config


def _preset(num_layers: int, dim: int, heads: int, patch_size: int, intermediate_size: int, shared: int) -> dict:
    return dict(
        num_layers=num_layers,
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        patch_size=patch_size,
        moe_intermediate_size=intermediate_size,
        shared_expert_intermediate_size=shared,
    )


# The `DiT_models` table of the original `models.py` (depth, hidden size, heads, patch). Hidden widths are stored
# explicitly: the original computes int(mlp_ratio * D) (mlp_ratio 4, or 5/3 for the _v2 presets, which also have a
# shared expert of width D instead of 2D). The /4 and /8 presets differ from /2 only in the patch size.
# Keys are the paper's name plus the original size name ("Diff-MoE-XL/2" is `DiT_models["DiT-XL/2"]`); the original
# names, which checkpoints record in `args.model` and which DiT-MoE uses for other architectures, are aliases.
SPATIAL_TEMPORAL_MOE_PRESETS = {
    **{f"Diff-MoE-XL/{p}": _preset(28, 1152, 16, p, 4608, 2304) for p in (2, 4, 8)},
    **{f"Diff-MoE-L/{p}": _preset(24, 1024, 16, p, 4096, 2048) for p in (2, 4, 8)},
    **{f"Diff-MoE-B/{p}": _preset(12, 768, 12, p, 3072, 1536) for p in (2, 4, 8)},
    **{f"Diff-MoE-S/{p}": _preset(12, 384, 6, p, 1536, 768) for p in (2, 4, 8)},
    "Diff-MoE-T/2": _preset(12, 256, 4, 2, 1024, 512),
    "Diff-MoE-G/2": _preset(40, 1408, 16, 2, 5632, 2816),
    "Diff-MoE-S/2_v2": _preset(12, 384, 6, 2, 640, 384),
    "Diff-MoE-B/2_v2": _preset(12, 768, 12, 2, 1280, 768),
    "Diff-MoE-L/2_v2": _preset(24, 1024, 16, 2, 1706, 1024),
}
SPATIAL_TEMPORAL_MOE_PRESET_ALIASES = {
    "DiT-" + key.removeprefix("Diff-MoE-"): key for key in SPATIAL_TEMPORAL_MOE_PRESETS
}
# what the original scripts use with every preset: 256px ImageNet latents (32x32x4), learned sigma, 8 experts, top-2
_PRESET_COMMON = dict(
    sample_size=32, in_channels=4, out_channels=8, num_classes=1000, num_experts=8, num_experts_per_tok=2
)


class SpatialTemporalMoEBlock(AdaLNZeroTransformerBlock):
    """
    Diff-MoE block (`DiTBlock_SpatialTemporalMoE`): the adaLN-Zero DiT block with 2-D rotary attention, whose MoE
    branch reads a depthwise-convolved copy of the tokens and the block conditioning:

        x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
        u = depthwise_conv5x5(x on its token grid)
        x = x + gate_mlp * ff(modulate(norm2(u), shift_mlp, scale_mlp), c)

    Args:
        dim (`int`): Token width D.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape.
        feed_forward (`SpatialTemporalMoE`): The MoE layer.
    """

    def __init__(
        self, *, dim: int, num_attention_heads: int, attention_head_dim: int, feed_forward: SpatialTemporalMoE
    ):
        super().__init__(
            dim=dim,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            feed_forward=feed_forward,
            norm_type="layer_norm",
        )
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        conditioning: torch.Tensor,
        rotary_emb: RotaryTables,
        grid_size: tuple[int, int],
    ) -> torch.Tensor:
        """(B, N, D) tokens in raster order over a `grid_size` = (rows, cols) grid, (B, D) conditioning -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(conditioning)
        attn_input = modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.attn(attn_input, rotary_emb=rotary_emb)
        grid = hidden_states.transpose(1, 2).unflatten(-1, grid_size)
        convolved = self.depthwise_conv(grid).flatten(2).transpose(1, 2)
        ff_input = modulate(self.norm2(convolved), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(ff_input, conditioning)


class SpatialTemporalMoETransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    Diff-MoE transformer (Cheng et al.) for class-conditional latent diffusion; see the module docstring. This is NOT
    DiffMoE (Shi et al., `DynamicTokenMoETransformer2DModel`).

    Args:
        sample_size (`int`): Side of the square latent the model was trained on (the original runs only this size).
        patch_size (`int`): Patch side p.
        in_channels (`int`): Latent channels C.
        out_channels (`int`, *optional*): Output channels; the original models have 2C (epsilon or velocity, then the
            learned-variance values). `None` means `in_channels`; the config records the number.
        num_layers (`int`): Number of blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width D is their
            product. The head dim must be divisible by 4 (2-D rotary embedding).
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode.
        num_experts (`int`): Routed experts per block.
        num_experts_per_tok (`int`): Experts each token is sent to (k).
        moe_intermediate_size (`int`): Hidden width of each routed expert (original: int(mlp_ratio * D)).
        shared_expert_intermediate_size (`int`): Hidden width of the shared expert (original: n_shared_experts * D);
            0 for models without one.
        modulation_rank (`int`): Bottleneck of the experts' adaLN and of the channel recalibration (64 upstream).
        aux_loss_alpha (`float`): Weight of the routers' load-balancing loss, computed in training mode and returned
            summed over the layers as the output's `aux_loss`.
        formulation (`str`): Meaning of the timestep input and output (`"ddpm-learned-sigma"` or `"rf-noise-at-1"`);
            see `diffmoe_hf.formulations`.
    """

    _no_split_modules = ["SpatialTemporalMoEBlock"]
    _repeated_blocks = ["SpatialTemporalMoEBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 4608,
        shared_expert_intermediate_size: int = 2304,
        modulation_rank: int = 64,
        aux_loss_alpha: float = 0.01,
        formulation: str = "ddpm-learned-sigma",
    ):
        super().__init__()
        check_model_config(self.config)
        if attention_head_dim % 4:
            raise ValueError(f"attention_head_dim={attention_head_dim} must be divisible by 4 (2-D rotary embedding).")
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.register_to_config(out_channels=self.out_channels)
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type=None,
        )
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                SpatialTemporalMoEBlock(
                    dim=dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    feed_forward=SpatialTemporalMoE(
                        dim=dim,
                        num_experts=num_experts,
                        num_experts_per_tok=num_experts_per_tok,
                        intermediate_size=moe_intermediate_size,
                        shared_expert_intermediate_size=shared_expert_intermediate_size,
                        modulation_rank=modulation_rank,
                        aux_loss_alpha=aux_loss_alpha,
                    ),
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels, norm_type="layer_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpatialTemporalMoETransformer2DModel":
        """
        A randomly initialised model with the architecture of an original `DiT_models` preset (see
        `SPATIAL_TEMPORAL_MOE_PRESETS`, e.g. `"Diff-MoE-XL/2"`; the original names such as `"DiT-XL/2"` are aliases),
        256px ImageNet latents and 8 experts, top-2, unless overridden (e.g. `num_experts=16`).
        """
        config = preset_config(
            "SpatialTemporalMoE (Diff-MoE, Cheng et al.)",
            SPATIAL_TEMPORAL_MOE_PRESETS,
            name,
            _PRESET_COMMON,
            aliases=SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
        )
        return cls(**{**config, **overrides})

    def _initialize_family_weights(self) -> None:
        """
        Diff-MoE of Cheng et al. (kunncheng/Diff-MoE `models.py`, `DiT.initialize_weights`): the DiT init, which runs
        after the experts set their own adaLN (kaiming-uniform bottleneck, zeroed output) and so replaces it by
        Xavier-uniform weights and zero biases: only the block-level adaLN and the output layer start at zero. The
        recalibration (`se`) Linears are Xavier too; routers are kaiming-uniform (`MoEGate.reset_parameters`); the 5x5
        depthwise convolutions keep PyTorch's default init.
        """
        initialize_dit(self)
        initialize_softmax_routers(self)
        for block in self.transformer_blocks:
            torch_default_conv(block.depthwise_conv)

    def block_inputs(self, tokens: torch.Tensor, height: int, width: int) -> tuple:
        """The 2-D rotary tables of the token grid and the grid's (rows, cols), for `SpatialTemporalMoEBlock`."""
        grid_size = (height // self.config.patch_size, width // self.config.patch_size)
        rotary_emb = rotary_tables(
            "rope_2d_alternating", self.config.attention_head_dim, *grid_size, device=tokens.device
        )
        return rotary_emb, grid_size
