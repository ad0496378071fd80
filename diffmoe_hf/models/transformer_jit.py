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

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from packaging import version
from torch import nn

from .attention import RotaryTables, pad_rotary_tables, rotary_tables
from .blocks import PatchOutputLayer, adaln_zero_blocks
from .embeddings import TimestepClassEmbedding
from .initialization import flattened_conv_xavier, fused_xavier, initialize_dit, initialize_sigmoid_routers
from .modeling_common import DiTForwardMixin, resolve_moe_layers
from .moe import DeepSeekMoE, SwiGLU
from .presets import preset_config
from .validation import check_model_config


_E16 = dict(num_experts=16, num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.5)

# `JiT_models` of yhlleo/EfficientMoE `JiTMoE/model_jit.py`. All: 256px RGB, ImageNet-1k, mlp_ratio 4, 32 in-context
# class tokens. The MoE models are keyed by the names of the paper and the Hub releases ("JiTMoE-B/16-E16", MoE on odd
# blocks, one shared expert as wide as a routed one); the dense JiT models by their original names.
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
                            in_context_start=4, moe_layers=[1, 3, 5, 7, 9], moe_intermediate_size=1536,
                            shared_expert_intermediate_size=1536, **_E16),
    "JiTMoE-L/16-E16": dict(num_layers=20, num_attention_heads=16, patch_size=16, bottleneck_dim=128,
                            in_context_start=8, moe_layers=list(range(1, 20, 2)), moe_intermediate_size=2048,
                            shared_expert_intermediate_size=2048, **_E16),
    "JiTMoE-H/16-E16": dict(num_layers=28, num_attention_heads=16, patch_size=16, bottleneck_dim=256,
                            in_context_start=10, attention_head_dim=80, moe_layers=list(range(1, 28, 2)),
                            moe_intermediate_size=2048, shared_expert_intermediate_size=2048, **_E16),
}  # fmt: skip
# the names the original code records in a checkpoint's `args.model`, and the Hub releases' spelling without "/"
JIT_PRESET_ALIASES = {
    "JiT-B/16-E16": "JiTMoE-B/16-E16",
    "JiT-L/16-E16": "JiTMoE-L/16-E16",
    "JiT-H/16-E16": "JiTMoE-H/16-E16",
    "JiTMoE-B16-E16": "JiTMoE-B/16-E16",
    "JiTMoE-L16-E16": "JiTMoE-L/16-E16",
}
_RELEASED_COMMON = dict(
    sample_size=256, in_channels=3, num_classes=1000, mlp_ratio=4.0, attention_head_dim=64, in_context_len=32
)


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
    `PatchEmbed`), which exists for `sample_size` x `sample_size` images only.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.sample_size = sample_size
        self.patch_proj = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False)
        self.hidden_proj = nn.Conv2d(bottleneck_dim, embed_dim, 1)
        grid = sample_size // patch_size
        pos_embed = get_2d_sincos_pos_embed(embed_dim, grid, base_size=grid, output_type="pt")
        self.register_buffer("pos_embed", pos_embed.float().unsqueeze(0), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> (B, T, D) tokens; raises `ValueError` for images of another size."""
        height, width = images.shape[-2:]
        if (height, width) != (self.sample_size, self.sample_size):
            raise ValueError(
                f"JiT models take {self.sample_size}x{self.sample_size} images (fixed position embedding), got "
                f"{height}x{width}."
            )
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
        shared_expert_intermediate_size (`int`): Hidden width of each MoE layer's shared SwiGLU expert (upstream's
            `n_shared_experts` experts of width `moe_intermediate_size` fused into one; the released models have one).
            0 removes it, and each MoE layer adds its input instead.
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
        shared_expert_intermediate_size: int = 1536,
        noise_scale: float = 1.0,
        t_eps: float = 0.05,
        formulation: str = "jit-xpred",
    ):
        super().__init__()
        check_model_config(self.config)
        dim = num_attention_heads * attention_head_dim
        moe_layers = resolve_moe_layers(moe_layers, num_layers)
        self.register_to_config(moe_layers=moe_layers)
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
        self.out_channels = in_channels  # x-prediction: the clean image
        self.proj_out = PatchOutputLayer(dim, patch_size, in_channels, norm_type="rms_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "JiTTransformer2DModel":
        """A randomly initialised model with a released architecture (see `JIT_PRESETS`, `JIT_PRESET_ALIASES`)."""
        return cls(**{**jit_preset_config(name), **overrides})

    def _initialize_family_weights(self) -> None:
        """
        JiT / JiTMoE (yhlleo/EfficientMoE `JiTMoE/model_jit.py`, `JiT.initialize_weights`; `JiTMoE/moe.py`): the DiT
        init with both bottleneck convolutions Xavier-initialised as flattened Linears (the 1x1 one with a zero bias),
        the SwiGLU `w12` (dense layers, experts, shared expert) fused over gate and up, the in-context position
        embedding N(0, 0.02²), RMSNorm and q/k-norm gains 1.

        Deliberate difference: the original router weight is `torch.empty` and never initialised (whatever memory
        held); here it gets DSMoE's kaiming-normal init (same router, same repository), with a zero correction bias.
        """
        initialize_dit(self)
        for module in self.modules():
            if isinstance(module, SwiGLU):
                fused_xavier(module.gate_proj, module.up_proj)
        flattened_conv_xavier(self.pos_embed.patch_proj)
        flattened_conv_xavier(self.pos_embed.hidden_proj)
        if self.in_context_pos_embed is not None:
            nn.init.normal_(self.in_context_pos_embed, std=0.02)
        initialize_sigmoid_routers(self)

    def enable_cache(self, config) -> None:
        """
        Enables a diffusers cache (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`, ...); see
        `diffusers.models.cache_utils.CacheMixin.enable_cache`.

        Raises:
            ValueError: for a cache that cannot handle class tokens joining after the first block
                (`in_context_start > 0`): FirstBlockCache (it subtracts block outputs of different token counts), and
                MagCache before diffusers 0.42 (which first matched the residual to the image tokens).
        """
        if self.config.in_context_len and self.config.in_context_start:
            refused = isinstance(config, FirstBlockCacheConfig)
            refused |= isinstance(config, MagCacheConfig) and version.parse(diffusers.__version__) < version.parse(
                "0.42.0"
            )
            if refused:
                raise ValueError(
                    f"{type(config).__name__} (diffusers {diffusers.__version__}) cannot run on this "
                    f"{type(self).__name__}: it prepends {self.config.in_context_len} class tokens before block "
                    f"{self.config.in_context_start}, so its first and last blocks return different token counts. Use "
                    "TaylorSeerCacheConfig (or MagCacheConfig with diffusers >= 0.42) instead."
                )
        super().enable_cache(config)

    def block_inputs(self, tokens: torch.Tensor, height: int, width: int) -> tuple:
        """The interleaved 2-D rotary tables of the (height / p) x (width / p) image token grid."""
        patch = self.config.patch_size
        image_rotary = rotary_tables(
            "rope_2d_interleaved", self.config.attention_head_dim, height // patch, width // patch, tokens.device
        )
        return (image_rotary,)

    def run_blocks(
        self, tokens: torch.Tensor, conditioning: torch.Tensor, label_embedding: torch.Tensor, block_inputs: tuple
    ) -> torch.Tensor:
        """
        The blocks, with the L = `in_context_len` class tokens (the (B, D) label embedding plus the learned
        in-context position embedding, identity rotations) prepended before block `in_context_start` and dropped
        after the last block: (B, N, D) image tokens -> (B, N, D).
        """
        num_prefix, start = self.config.in_context_len, self.config.in_context_start
        if not num_prefix:
            return super().run_blocks(tokens, conditioning, label_embedding, block_inputs)
        (image_rotary,) = block_inputs
        rotary_emb = image_rotary
        for index, block in enumerate(self.transformer_blocks):
            if index == start:
                class_tokens = label_embedding.unsqueeze(1) + self.in_context_pos_embed.to(label_embedding.dtype)
                tokens = torch.cat([class_tokens, tokens], dim=1)
                rotary_emb = pad_rotary_tables(image_rotary, num_prefix)
            if start > 0:
                _token_count_varies(tokens, rotary_emb)
            tokens = self.run_block(block, tokens, conditioning, rotary_emb)
        return tokens[:, num_prefix:]
