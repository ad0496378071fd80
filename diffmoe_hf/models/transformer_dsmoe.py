"""DSMoE: DiT with DeepSeek-style experts (Liu et al. 2025, "Efficient Training of Diffusion Mixture-of-Experts
Models: A Practical Recipe"; original code yhlleo/EfficientMoE, `DSMoE/models/models_DSMoE.py`).

Differences from diffusers' `DiTTransformer2DModel`, all deliberate (they are what the released checkpoints compute):
- the timestep is the flow time in [0, 1] with 0 = noise, embedded with DiT's original frequencies (see
  `TimestepClassEmbedding`);
- 1-D or 2-D rotary attention (no absolute position embedding) in the released configs;
- dense layers are SiLU MLPs (not GELU); the MoE layers use a sigmoid router with group-limited top-k, a correction
  bias and routed scaling, SwiGLU experts and a shared SwiGLU expert (or the layer's input when there is none);
- the output keeps 2C channels (`learn_sigma=True` upstream); only the first C are trained (the velocity).
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

from .attention import rotary_tables
from .blocks import AdaLNZeroMoETransformerBlock, AdaLNZeroTransformerBlock, PatchOutputLayer
from .embeddings import TimestepClassEmbedding
from .modeling_common import DiTForwardMixin, preset_config
from .moe import DeepSeekMoE


# The seven released models (yaml configs of yhlleo/EfficientMoE, DSMoE/config/). All: 256px ImageNet (latent 32x32x4),
# patch 2, learned-sigma output (8 channels), rope 2d, LayerNorm, MoE on odd layers, one shared expert.
DSMOE_PRESETS = {
    "DSMoE-S-E16": dict(num_layers=10, num_attention_heads=6, attention_head_dim=64, num_experts=16,
                        moe_intermediate_size=768, n_group=2, topk_group=2, num_experts_per_tok=2,
                        routed_scaling_factor=2.0),
    "DSMoE-S-E48": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, num_experts=48,
                        moe_intermediate_size=128, n_group=1, topk_group=1, num_experts_per_tok=5,
                        routed_scaling_factor=2.5),
    "DSMoE-B-E16": dict(num_layers=10, num_attention_heads=12, attention_head_dim=64, num_experts=16,
                        moe_intermediate_size=1536, n_group=2, topk_group=2, num_experts_per_tok=2,
                        routed_scaling_factor=2.0),
    "DSMoE-B-E48": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, num_experts=48,
                        moe_intermediate_size=256, n_group=1, topk_group=1, num_experts_per_tok=5,
                        routed_scaling_factor=2.5),
    "DSMoE-L-E16": dict(num_layers=20, num_attention_heads=16, attention_head_dim=64, num_experts=16,
                        moe_intermediate_size=2048, n_group=2, topk_group=2, num_experts_per_tok=2,
                        routed_scaling_factor=2.0),
    "DSMoE-L-E48": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=48,
                        moe_intermediate_size=448, n_group=1, topk_group=1, num_experts_per_tok=5,
                        routed_scaling_factor=2.5),
    "DSMoE-3B-E16": dict(num_layers=30, num_attention_heads=16, attention_head_dim=72, num_experts=16,
                         moe_intermediate_size=2880, n_group=2, topk_group=2, num_experts_per_tok=2,
                         routed_scaling_factor=2.0),
}  # fmt: skip
_RELEASED_COMMON = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_classes=1000, mlp_ratio=4.0)

POSITIONAL_EMBEDDINGS = ("rope_2d", "rope_1d", "sincos")


class DSMoETransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    DSMoE transformer for class-conditional latent flow matching.

    Args:
        sample_size (`int`): Side of the square latent the model was trained on.
        patch_size (`int`): Patch side p.
        in_channels (`int`): Latent channels C.
        out_channels (`int`, *optional*): Output channels; the released models have 2C (the upper half is an untrained
            learned-sigma head). Defaults to `in_channels`.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width is their product.
        mlp_ratio (`float`): Hidden width of the dense (non-MoE) layers' SiLU MLP, as a multiple of the hidden width.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode.
        positional_embedding (`str`): `"rope_2d"` (released models), `"rope_1d"` or `"sincos"` (fixed 2-D sin-cos
            added to the patch tokens).
        norm_type (`str`): `"layer_norm"` or `"rms_norm"` for the block norms (the output layer always uses LayerNorm).
        moe_layers (`list[int]`, *optional*): Indices of the MoE blocks; defaults to the odd blocks.
        num_experts (`int`): Routed experts per MoE layer.
        num_experts_per_tok (`int`): Experts each token is sent to (k).
        moe_intermediate_size (`int`): Hidden width of each SwiGLU expert.
        n_group (`int`), topk_group (`int`): Group-limited routing: experts form `n_group` groups and each token may
            only use experts of its `topk_group` best groups.
        routed_scaling_factor (`float`): Scale on the routed experts' weights.
        num_shared_experts (`int`): Shared SwiGLU experts (0 makes each MoE layer add its input instead).
        formulation (`str`): Meaning of the timestep input and output; see `diffmoe_hf.formulations`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    _repeated_blocks = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "embedding", "router"]
    _keep_in_fp32_modules = ["router"]
    # Routing is per token: a sample's output does not depend on the rest of the batch.
    routing_depends_on_batch = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 10,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        positional_embedding: str = "rope_2d",
        norm_type: str = "layer_norm",
        moe_layers: list[int] | None = None,
        num_experts: int = 16,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 768,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 2.0,
        num_shared_experts: int = 1,
        formulation: str = "rf-noise-at-0",
    ):
        super().__init__()
        if positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"positional_embedding={positional_embedding!r}; expected one of {POSITIONAL_EMBEDDINGS}."
            )
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        moe_layers = list(range(1, num_layers, 2)) if moe_layers is None else list(moe_layers)
        if any(not 0 <= i < num_layers for i in moe_layers):
            raise ValueError(f"moe_layers={moe_layers} must index blocks 0..{num_layers - 1}.")

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type="sincos" if positional_embedding == "sincos" else None,
        )
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob)

        def feed_forward(index):
            if index in moe_layers:
                return DeepSeekMoE(
                    dim,
                    num_experts=num_experts,
                    intermediate_size=moe_intermediate_size,
                    num_experts_per_tok=num_experts_per_tok,
                    n_group=n_group,
                    topk_group=topk_group,
                    routed_scaling_factor=routed_scaling_factor,
                    num_shared_experts=num_shared_experts,
                )
            return FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="linear-silu", bias=True)

        def _block_class(index):
            return AdaLNZeroMoETransformerBlock if index in moe_layers else AdaLNZeroTransformerBlock

        self.transformer_blocks = nn.ModuleList(
            [
                _block_class(i)(dim, num_attention_heads, attention_head_dim, feed_forward(i), norm_type)
                for i in range(num_layers)
            ]
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels, norm_type="layer_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DSMoETransformer2DModel":
        """A randomly initialised model with the architecture of a released checkpoint (see `DSMOE_PRESETS`)."""
        return cls(**{**preset_config("DSMoE", DSMOE_PRESETS, name, _RELEASED_COMMON), **overrides})

    @apply_lora_scale("attention_kwargs")
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
            hidden_states: (B, C, H, W) noisy latents.
            timestep: (B,) or scalar flow time in [0, 1], 0 = pure noise, 1 = data (unscaled).
            class_labels: (B,) int64 class ids; `num_classes` is the null class.
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: Whether to return a `Transformer2DModelOutput`.

        Returns:
            (B, out_channels, H, W); the first C channels are the velocity `data - noise`.
        """
        tokens, conditioning, _, _ = self.embed_inputs(hidden_states, timestep, class_labels)
        height, width = hidden_states.shape[-2:]
        rotary_emb = None
        if self.config.positional_embedding != "sincos":
            patch = self.config.patch_size
            rotary_emb = rotary_tables(
                self.config.positional_embedding,
                self.config.attention_head_dim,
                height // patch,
                width // patch,
                device=tokens.device,
            )

        for block in self.transformer_blocks:
            tokens = self.run_block(block, tokens, conditioning, rotary_emb)

        return self.patch_output(tokens, conditioning, height, width, self.out_channels, return_dict)
