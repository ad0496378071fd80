"""JiT and JiTMoE: pixel-space class-conditional transformers.

JiT is "Just image Transformers" (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"); JiTMoE
is its DeepSeek-style MoE variant from Liu et al. 2025, "Efficient Training of Diffusion Mixture-of-Experts Models:
A Practical Recipe" (original code yhlleo/EfficientMoE, `JiTMoE/model_jit.py`, `JiTMoE/moe.py`). One class covers
both: `moe_layers` lists the blocks whose feed-forward is a MoE layer (none for JiT).

The model works directly on RGB pixels in [-1, 1] (no VAE) and predicts the clean image (x-prediction); the pipeline
turns that into a velocity (see the `jit-xpred` formulation). Differences from the DiT-style families:
- a bottleneck patch embedding (p x p conv to `bottleneck_dim` channels without bias, then a 1x1 conv with bias) plus
  the fixed 2-D sin-cos position embedding;
- RMSNorm block norms, per-head RMSNorm on queries and keys, interleaved 2-D rotary embedding (`rope_2d_interleaved`,
  row angles in the first half of each head, column angles in the second);
- `in_context_len` class tokens (the label embedding plus a learned position embedding) are prepended before block
  `in_context_start`; they get identity rotations and are dropped before the output layer;
- dense layers are SwiGLU MLPs with biases (hidden width `int(int(D * mlp_ratio) * 2 / 3)`), MoE layers use the
  DeepSeek router over SwiGLU experts with biases;
- the output layer uses an RMSNorm and predicts `in_channels` channels.

Deliberate differences from the original code: it runs on any device (the original calls `.cuda()`); attention runs
through diffusers' attention dispatch in the input dtype (the original computes the scores in float32, which only
matters under bf16/fp16); attention/projection/expert dropout (0 in every released training script) is not modelled.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

from .attention import RotaryTables, pad_rotary_tables, rotary_tables
from .blocks import PatchOutputLayer, adaln_zero_blocks
from .embeddings import TimestepClassEmbedding
from .modeling_common import DiTForwardMixin, resolve_moe_layers, returns_moe_outputs, upgrade_legacy_moe_fields
from .moe import DeepSeekMoE, SwiGLU
from .presets import preset_config
from .validation import check_model_inputs


# one shared expert as wide as a routed one (the default `shared_expert_intermediate_size`)
_E16 = dict(num_experts=16, num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.5)

# `JiT_models` of yhlleo/EfficientMoE `JiTMoE/model_jit.py`. All: 256px RGB, ImageNet-1k, mlp_ratio 4, 32 in-context
# class tokens. The MoE models are keyed by the names of the paper and the Hub releases ("JiTMoE-B/16-E16", MoE on odd
# blocks); the dense JiT models by their original names.
JIT_PRESETS = {
    "JiT-B/16": dict(num_layers=12, num_attention_heads=12, patch_size=16, bottleneck_dim=128, in_context_start=4),
    "JiT-B/32": dict(num_layers=12, num_attention_heads=12, patch_size=32, bottleneck_dim=128, in_context_start=4),
    "JiT-L/16": dict(num_layers=24, num_attention_heads=16, patch_size=16, bottleneck_dim=128, in_context_start=8),
    "JiT-L/32": dict(num_layers=24, num_attention_heads=16, patch_size=32, bottleneck_dim=128, in_context_start=8),
    "JiT-H/16": dict(num_layers=32, num_attention_heads=16, patch_size=16, bottleneck_dim=256, in_context_start=10,
                     attention_head_dim=80),
    "JiT-H/32": dict(num_layers=32, num_attention_heads=16, patch_size=32, bottleneck_dim=256, in_context_start=10,
                     attention_head_dim=80),
    "JiTMoE-B/16-E16": dict(num_layers=10, num_attention_heads=12, patch_size=16, bottleneck_dim=128,
                            in_context_start=4, moe_layers=[1, 3, 5, 7, 9], moe_intermediate_size=1536, **_E16),
    "JiTMoE-L/16-E16": dict(num_layers=20, num_attention_heads=16, patch_size=16, bottleneck_dim=128,
                            in_context_start=8, moe_layers=list(range(1, 20, 2)), moe_intermediate_size=2048, **_E16),
    "JiTMoE-H/16-E16": dict(num_layers=28, num_attention_heads=16, patch_size=16, bottleneck_dim=256,
                            in_context_start=10, attention_head_dim=80, moe_layers=list(range(1, 28, 2)),
                            moe_intermediate_size=2048, **_E16),
}  # fmt: skip
# the names the original code records in a checkpoint's `args.model`, and the Hub releases' spelling without "/"
JIT_PRESET_ALIASES = {
    "JiT-B/16-E16": "JiTMoE-B/16-E16",
    "JiT-L/16-E16": "JiTMoE-L/16-E16",
    "JiT-H/16-E16": "JiTMoE-H/16-E16",
    "JiTMoE-B16-E16": "JiTMoE-B/16-E16",
    "JiTMoE-L16-E16": "JiTMoE-L/16-E16",
}
_RELEASED_COMMON = dict(sample_size=256, in_channels=3, num_classes=1000, mlp_ratio=4.0, attention_head_dim=64,
                        in_context_len=32)  # fmt: skip


def jit_preset_config(name: str) -> dict:
    """Constructor arguments of `JiTTransformer2DModel` for a released architecture (a `JIT_PRESETS` key or alias)."""
    return preset_config(
        "JiT / JiTMoE (Li & He 2025; Liu et al. 2025)", JIT_PRESETS, name, _RELEASED_COMMON, aliases=JIT_PRESET_ALIASES
    )


def _token_count_varies(tokens: torch.Tensor, rotary_emb: RotaryTables) -> None:
    """
    Tells `torch.compile` that the token count of a block's inputs varies (the in-context class tokens join after
    the first blocks), so that blocks compiled by `compile_repeated_blocks` get one graph for both counts instead of
    a recompilation at the block where the count changes. Eager-only hint; nothing changes in the computation.
    """
    if torch.compiler.is_compiling():
        return
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    torch._dynamo.maybe_mark_dynamic(rotary_emb.cos, 0)
    torch._dynamo.maybe_mark_dynamic(rotary_emb.sin, 0)


class JiTPatchEmbed(nn.Module):
    """
    Bottleneck patch embedding plus the fixed sin-cos position embedding.

    (B, C, S, S) image -> p x p conv (stride p, no bias) to `bottleneck_dim` channels -> 1x1 conv with bias to D ->
    (B, T, D) tokens in raster order, plus the MAE 2-D sin-cos table (a non-persistent buffer, as in diffusers'
    `PatchEmbed`).
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.patch_proj = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False)
        self.hidden_proj = nn.Conv2d(bottleneck_dim, embed_dim, 1)
        grid = sample_size // patch_size
        pos_embed = get_2d_sincos_pos_embed(embed_dim, grid, base_size=grid, output_type="pt")
        self.register_buffer("pos_embed", pos_embed.float().unsqueeze(0), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.hidden_proj(self.patch_proj(images)).flatten(2).transpose(1, 2)
        # row-major (B, T, D) like every block's output, so compiled blocks see one memory layout
        return (tokens + self.pos_embed.to(tokens.dtype)).contiguous()


class JiTTransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    JiT / JiTMoE transformer: pixel-space x-prediction for class-conditional flow matching (t = 0 noise, 1 data).

    Args:
        sample_size (`int`): Image side S in pixels.
        patch_size (`int`): Patch side p.
        in_channels (`int`): Image channels (3); the output has the same number of channels.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width D is their product
            and the head width must be divisible by 4 (2-D rotary embedding).
        mlp_ratio (`float`): The dense SwiGLU layers have hidden width `int(int(D * mlp_ratio) * 2 / 3)`.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance (its embedding
            row always exists).
        class_dropout_prob (`float`): Probability of replacing a label by the null class in training mode (the
            original `label_drop_prob`, applied in its `Denoiser`); no effect in eval mode.
        bottleneck_dim (`int`): Channels of the bottleneck patch embedding.
        in_context_len (`int`): Number L of in-context class tokens (0 disables them).
        in_context_start (`int`): Index of the first block that sees the class tokens.
        moe_layers (`str` or `list[int]`): The MoE blocks: `"none"` (the dense JiT), `"odd"` (JiTMoE), `"all"` or a
            list of block indices; the config records the list.
        num_experts (`int`), num_experts_per_tok (`int`), moe_intermediate_size (`int`), n_group (`int`),
        topk_group (`int`), routed_scaling_factor (`float`): The MoE layers (see `DeepSeekMoE`); their SwiGLU experts
            have biases and hidden width `moe_intermediate_size`.
        shared_expert_intermediate_size (`int`, *optional*): Hidden width of each MoE layer's shared SwiGLU expert;
            defaults to `moe_intermediate_size` (upstream's one shared expert). 0 removes it, and each MoE layer adds
            its input instead.
        noise_scale (`float`): Standard deviation of the initial noise the model was trained with (sampling
            parameter, read by the pipeline).
        t_eps (`float`): Lower clamp of `1 - t` when the x-prediction is turned into a velocity (read by the
            pipeline).
        formulation (`str`): Meaning of the timestep input and output; see `diffmoe_hf.formulations`.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        moe_layers: str | list[int] = "none",
        num_experts: int = 16,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 1536,
        n_group: int = 2,
        topk_group: int = 2,
        routed_scaling_factor: float = 2.5,
        shared_expert_intermediate_size: int | None = None,
        noise_scale: float = 1.0,
        t_eps: float = 0.05,
        formulation: str = "jit-xpred",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        moe_layers = resolve_moe_layers(moe_layers, num_layers)
        if shared_expert_intermediate_size is None:
            shared_expert_intermediate_size = moe_intermediate_size
        self.register_to_config(moe_layers=moe_layers, shared_expert_intermediate_size=shared_expert_intermediate_size)
        if attention_head_dim % 4:
            raise ValueError(f"attention_head_dim={attention_head_dim} must be divisible by 4 (2-D rotary embedding).")
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} must be a multiple of patch_size={patch_size}.")
        if in_context_len < 0 or (in_context_len > 0 and not 0 <= in_context_start < num_layers):
            raise ValueError(
                f"in_context_start={in_context_start} must index a block 0..{num_layers - 1} when in_context_len > 0 "
                f"(got in_context_len={in_context_len})."
            )

        self.pos_embed = JiTPatchEmbed(sample_size, patch_size, in_channels, bottleneck_dim, dim)
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob, add_null_class=True)
        self.in_context_pos_embed = nn.Parameter(torch.zeros(1, in_context_len, dim)) if in_context_len else None

        self.transformer_blocks = adaln_zero_blocks(
            num_layers,
            moe_layers,
            dense_feed_forward=lambda: SwiGLU(dim=dim, intermediate_size=int(int(dim * mlp_ratio) * 2 / 3), bias=True),
            moe_feed_forward=lambda: DeepSeekMoE(
                dim=dim,
                num_experts=num_experts,
                num_experts_per_tok=num_experts_per_tok,
                intermediate_size=moe_intermediate_size,
                n_group=n_group,
                topk_group=topk_group,
                routed_scaling_factor=routed_scaling_factor,
                shared_expert_intermediate_size=shared_expert_intermediate_size,
                bias=True,
            ),
            dim=dim,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            norm_type="rms_norm",
            qk_norm="rms_norm",
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, in_channels, norm_type="rms_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def upgrade_legacy_config(cls, config: dict) -> dict:
        """Earlier versions: `moe_layers: null` meant the dense JiT, `num_shared_experts` counted shared experts."""
        return upgrade_legacy_moe_fields(
            cls, config, moe_layers_none="none", shared_expert_width="moe_intermediate_size"
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "JiTTransformer2DModel":
        """A randomly initialised model with a released architecture (see `JIT_PRESETS`, `JIT_PRESET_ALIASES`)."""
        return cls(**{**jit_preset_config(name), **overrides})

    def _class_tokens(self, label_embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) label embedding -> (B, L, D) in-context class tokens."""
        return label_embedding.unsqueeze(1) + self.in_context_pos_embed.to(label_embedding.dtype)

    @apply_lora_scale("attention_kwargs")
    @returns_moe_outputs
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.LongTensor,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: (B, C, S, S) noisy images `t * x + (1 - t) * noise` (x in [-1, 1]).
            timestep: (B,) or scalar flow time in [0, 1], 0 = pure noise, 1 = data (unscaled).
            class_labels: (B,) int64 class ids; `num_classes` is the null class.
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: Whether to return a `Transformer2DModelOutput`.

        Returns:
            (B, C, S, S) prediction of the clean image x.
        """
        timestep, class_labels = check_model_inputs(self.config, hidden_states, timestep, class_labels)
        _, _, height, width = hidden_states.shape
        if (height, width) != (self.config.sample_size,) * 2:
            raise ValueError(
                f"JiT models take {self.config.sample_size}x{self.config.sample_size} images (fixed position "
                f"embedding), got {height}x{width}."
            )
        embedding = self.embedding
        label_embedding = embedding.class_embedder(class_labels)  # drops labels in training mode
        time_features = embedding.time_proj(timestep).to(embedding.timestep_embedder.linear_1.weight.dtype)
        conditioning = embedding.timestep_embedder(time_features) + label_embedding

        tokens = self.pos_embed(hidden_states)
        conditioning = conditioning.to(tokens.dtype)
        patch = self.config.patch_size
        image_rotary = rotary_tables(
            "rope_2d_interleaved", self.config.attention_head_dim, height // patch, width // patch, tokens.device
        )
        num_prefix = self.config.in_context_len
        rotary_emb = image_rotary
        for index, block in enumerate(self.transformer_blocks):
            if num_prefix and index == self.config.in_context_start:
                tokens = torch.cat([self._class_tokens(label_embedding.to(tokens.dtype)), tokens], dim=1)
                rotary_emb = pad_rotary_tables(image_rotary, num_prefix)
            if num_prefix and self.config.in_context_start > 0:
                _token_count_varies(tokens, rotary_emb)
            tokens = self.run_block(block, tokens, conditioning, rotary_emb)

        tokens = tokens[:, num_prefix:]
        return self.patch_output(tokens, conditioning, height, width, self.config.in_channels, return_dict)
