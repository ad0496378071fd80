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
from diffusers.models.modeling_utils import ModelMixin

from .attention import rotary_tables
from .blocks import PatchOutputLayer, adaln_zero_blocks
from .embeddings import TimestepClassEmbedding
from .initialization import initialize_dit, initialize_sigmoid_routers
from .modeling_common import DiTForwardMixin, resolve_moe_layers
from .moe import DeepSeekMoE
from .presets import preset_config
from .validation import check_model_config


# The seven released models (yaml configs of yhlleo/EfficientMoE, DSMoE/config/). All: 256px ImageNet (latent 32x32x4),
# patch 2, learned-sigma output (8 channels), rope 2d, LayerNorm, MoE on odd layers, one shared expert as wide as a
# routed one.
DSMOE_PRESETS = {
    "DSMoE-S-E16": dict(num_layers=10, num_attention_heads=6, attention_head_dim=64, num_experts=16,
                        num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.0,
                        moe_intermediate_size=768, shared_expert_intermediate_size=768),
    "DSMoE-S-E48": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, num_experts=48,
                        num_experts_per_tok=5, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                        moe_intermediate_size=128, shared_expert_intermediate_size=128),
    "DSMoE-B-E16": dict(num_layers=10, num_attention_heads=12, attention_head_dim=64, num_experts=16,
                        num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.0,
                        moe_intermediate_size=1536, shared_expert_intermediate_size=1536),
    "DSMoE-B-E48": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, num_experts=48,
                        num_experts_per_tok=5, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                        moe_intermediate_size=256, shared_expert_intermediate_size=256),
    "DSMoE-L-E16": dict(num_layers=20, num_attention_heads=16, attention_head_dim=64, num_experts=16,
                        num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.0,
                        moe_intermediate_size=2048, shared_expert_intermediate_size=2048),
    "DSMoE-L-E48": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=48,
                        num_experts_per_tok=5, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                        moe_intermediate_size=448, shared_expert_intermediate_size=448),
    "DSMoE-3B-E16": dict(num_layers=30, num_attention_heads=16, attention_head_dim=72, num_experts=16,
                         num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.0,
                         moe_intermediate_size=2880, shared_expert_intermediate_size=2880),
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
            learned-sigma head). `None` means `in_channels`; the config records the number.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width is their product.
        mlp_ratio (`float`): Hidden width of the dense (non-MoE) layers' SiLU MLP, as a multiple of the hidden width.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode.
        positional_embedding (`str`): `"rope_2d"` (released models), `"rope_1d"` or `"sincos"` (fixed 2-D sin-cos
            added to the patch tokens).
        norm_type (`str`): `"layer_norm"` or `"rms_norm"` for the block norms (the output layer always uses LayerNorm).
        moe_layers (`str` or `list[int]`): The MoE blocks: `"odd"` (released models), `"all"`, `"none"` or a list of
            block indices; the config records the list.
        num_experts (`int`): Routed experts per MoE layer.
        num_experts_per_tok (`int`): Experts each token is sent to (k).
        moe_intermediate_size (`int`): Hidden width of each SwiGLU expert.
        n_group (`int`), topk_group (`int`): Group-limited routing: experts form `n_group` groups and each token may
            only use experts of its `topk_group` best groups.
        routed_scaling_factor (`float`): Scale on the routed experts' weights.
        shared_expert_intermediate_size (`int`): Hidden width of each MoE layer's shared SwiGLU expert (upstream's
            `n_shared_experts` experts of width `moe_intermediate_size` fused into one; the released models have one).
            0 removes it, and each MoE layer adds its input instead (as upstream without shared experts).
        formulation (`str`): Meaning of the timestep input and output; see `diffmoe_hf.formulations`.
    """

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
        moe_layers: str | list[int] = "odd",
        num_experts: int = 16,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 768,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 2.0,
        shared_expert_intermediate_size: int = 768,
        formulation: str = "rf-noise-at-0",
    ):
        super().__init__()
        check_model_config(self.config)
        if positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"positional_embedding={positional_embedding!r}; expected one of {POSITIONAL_EMBEDDINGS}."
            )
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        moe_layers = resolve_moe_layers(moe_layers, num_layers)
        self.register_to_config(out_channels=self.out_channels, moe_layers=moe_layers)

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type="sincos" if positional_embedding == "sincos" else None,
        )
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob)

        self.transformer_blocks = adaln_zero_blocks(
            num_layers,
            moe_layers,
            dense_feed_forward=lambda: FeedForward(
                dim, inner_dim=int(dim * mlp_ratio), activation_fn="linear-silu", bias=True
            ),
            moe_feed_forward=lambda: DeepSeekMoE(
                dim=dim,
                num_experts=num_experts,
                num_experts_per_tok=num_experts_per_tok,
                intermediate_size=moe_intermediate_size,
                n_group=n_group,
                topk_group=topk_group,
                routed_scaling_factor=routed_scaling_factor,
                shared_expert_intermediate_size=shared_expert_intermediate_size,
            ),
            dim=dim,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            norm_type=norm_type,
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels, norm_type="layer_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DSMoETransformer2DModel":
        """A randomly initialised model with the architecture of a released checkpoint (see `DSMOE_PRESETS`)."""
        return cls(**{**preset_config("DSMoE (Liu et al. 2025)", DSMOE_PRESETS, name, _RELEASED_COMMON), **overrides})

    def _initialize_family_weights(self) -> None:
        """
        DSMoE (yhlleo/EfficientMoE `DSMoE/models/models_DSMoE.py`, `DiT.initialize_weights` with `init_MoeMLP=False`
        as in every released config): the DiT init (fused q/k/v; the dense SiLU MLPs, experts and shared expert are
        plain Linears), routers kaiming-normal with a zero correction bias, RMSNorm gains 1.
        """
        initialize_dit(self)
        initialize_sigmoid_routers(self)

    def block_inputs(self, tokens: torch.Tensor, height: int, width: int) -> tuple:
        """The rotary tables of the (height / p) x (width / p) token grid, unless the model adds sin-cos positions."""
        if self.config.positional_embedding == "sincos":
            return (None,)
        patch = self.config.patch_size
        rotary_emb = rotary_tables(
            self.config.positional_embedding,
            self.config.attention_head_dim,
            height // patch,
            width // patch,
            device=tokens.device,
        )
        return (rotary_emb,)
