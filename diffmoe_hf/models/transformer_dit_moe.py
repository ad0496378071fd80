"""DiT-MoE: DiT with softmax-routed SwiGLU experts (Fei et al. 2024, "Scaling Diffusion Transformers to 16 Billion
Parameters"; original code feizc/DiT-MoE, `models.py`).

Not to be confused with Diff-MoE (Cheng et al., `SpatialTemporalMoETransformer2DModel`) or DiffMoE (Shi et al.,
`DynamicTokenMoETransformer2DModel`).

Differences from diffusers' `DiTTransformer2DModel`, all deliberate (they are what the released checkpoints compute):
- the timestep is embedded with DiT's original frequencies (see `TimestepClassEmbedding`) and never rescaled: DDPM
  models take the integer DDPM index 0..999, rectified-flow models the raw flow time in [0, 1] (1 = noise);
- every block's feed-forward is a MoE layer: softmax top-k routing whose weights are the raw probabilities (not
  renormalised), SwiGLU experts, plus a shared SwiGLU expert of width 2D;
- the XL/G checkpoints (trained with flash attention) have an affine LayerNorm on each head's queries and keys
  (`qk_norm="layer_norm"`). The original casts the normalised q/k to float16 before attention, which only rounds them
  in a float32 run; this port does not (the fixtures' reference outputs are computed without that rounding too);
- the output keeps 2C channels (`learn_sigma=True` upstream): DDPM models predict [eps, variance interpolation], RF
  models predict the velocity `noise - data` in the first C channels (the upper half is untrained).
The original's `pretraining_tp` (tensor-parallel slicing of the expert matmuls) only changes float summation order and
is not reproduced.
"""

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .blocks import AdaLNZeroTransformerBlock, PatchOutputLayer
from .embeddings import TimestepClassEmbedding
from .initialization import initialize_dit, initialize_softmax_routers
from .modeling_common import DiTForwardMixin
from .moe import SoftmaxTopKRouter, SwiGLUTokenChoiceMoE
from .presets import preset_config
from .validation import check_model_config


# `DiT_models` of feizc/DiT-MoE: depth, width and heads of each named architecture (width D = heads * head dim), keyed
# by the paper's names (its released models are e.g. "DiT-MoE-XL/2-8E2A": this architecture, 8 experts, 2 active).
# The expert widths are the original's: routed experts int(mlp_ratio * D) with mlp_ratio 4, the shared expert 2D.
DIT_MOE_PRESETS = {
    "DiT-MoE-S/2":   dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2,
                          moe_intermediate_size=1536, shared_expert_intermediate_size=768),
    "DiT-MoE-S/4":   dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=4,
                          moe_intermediate_size=1536, shared_expert_intermediate_size=768),
    "DiT-MoE-S/8":   dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=8,
                          moe_intermediate_size=1536, shared_expert_intermediate_size=768),
    "DiT-MoE-B/2":   dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2,
                          moe_intermediate_size=3072, shared_expert_intermediate_size=1536),
    "DiT-MoE-B/4":   dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=4,
                          moe_intermediate_size=3072, shared_expert_intermediate_size=1536),
    "DiT-MoE-B/8":   dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=8,
                          moe_intermediate_size=3072, shared_expert_intermediate_size=1536),
    "DiT-MoE-L/2":   dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=2,
                          moe_intermediate_size=4096, shared_expert_intermediate_size=2048),
    "DiT-MoE-L/4":   dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=4,
                          moe_intermediate_size=4096, shared_expert_intermediate_size=2048),
    "DiT-MoE-L/8":   dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=8,
                          moe_intermediate_size=4096, shared_expert_intermediate_size=2048),
    "DiT-MoE-XL/2":  dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2,
                          moe_intermediate_size=4608, shared_expert_intermediate_size=2304),
    "DiT-MoE-XL/4":  dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=4,
                          moe_intermediate_size=4608, shared_expert_intermediate_size=2304),
    "DiT-MoE-XL/8":  dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=8,
                          moe_intermediate_size=4608, shared_expert_intermediate_size=2304),
    "DiT-MoE-G/2":   dict(num_layers=40, num_attention_heads=16, attention_head_dim=88, patch_size=2,
                          moe_intermediate_size=5632, shared_expert_intermediate_size=2816),
}  # fmt: skip
# the original names, which checkpoints record in `args.model` (Diff-MoE of Cheng et al. uses the same names for
# other architectures)
DIT_MOE_PRESET_ALIASES = {"DiT-" + key.removeprefix("DiT-MoE-"): key for key in DIT_MOE_PRESETS}
QK_NORMS = (None, "layer_norm")


class SoftmaxTopKMoE(SwiGLUTokenChoiceMoE):
    """
    MoE feed-forward with softmax top-k routing (DiT-MoE's `SparseMoeBlock`): a `SoftmaxTopKRouter` sends each token
    to k of E SwiGLU experts, whose outputs are weighted by the raw router probabilities (not renormalised unless
    `normalize_weights`), and an optional shared SwiGLU expert that every token passes through is added unweighted.
    There is no residual inside the layer.

    In training mode the router reports its load-balancing loss to the call's `MoECollector` (the model returns it as
    `output.aux_loss`).

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): Routed experts E.
        num_experts_per_tok (`int`): Experts per token k.
        intermediate_size (`int`): Hidden width of each routed expert.
        shared_expert_intermediate_size (`int`): Hidden width of the shared expert; 0 for none.
        aux_loss_alpha (`float`): Weight of the load-balancing loss (0 disables it).
        normalize_weights (`bool`): Renormalise each token's k weights to sum to 1.
        bias (`bool`): Biases on the expert projections.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        intermediate_size: int,
        shared_expert_intermediate_size: int = 0,
        aux_loss_alpha: float = 0.01,
        normalize_weights: bool = False,
        bias: bool = False,
    ):
        router = SoftmaxTopKRouter(
            dim=dim,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            aux_loss_alpha=aux_loss_alpha,
            normalize_weights=normalize_weights,
        )
        super().__init__(
            router=router,
            dim=dim,
            num_experts=num_experts,
            intermediate_size=intermediate_size,
            shared_expert_intermediate_size=shared_expert_intermediate_size,
            bias=bias,
        )


class DiTMoETransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    DiT-MoE transformer (Fei et al.) for class-conditional latent diffusion (DDPM with learned sigma, or rectified
    flow). It is neither Diff-MoE (Cheng et al.) nor DiffMoE (Shi et al.).

    Args:
        sample_size (`int`): Side of the square latent the model was trained on (`image_size // 8`).
        patch_size (`int`): Patch side p.
        in_channels (`int`): Latent channels C.
        out_channels (`int`, *optional*): Output channels; the released models have 2C (learned sigma). `None` means
            `in_channels`; the config records the number.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width D is their product.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode (the null row exists only when it is > 0).
        num_experts (`int`): Routed experts E per block.
        num_experts_per_tok (`int`): Experts each token is sent to (k).
        moe_intermediate_size (`int`): Hidden width of each routed SwiGLU expert (upstream: 4D, `mlp_ratio` 4).
        shared_expert_intermediate_size (`int`): Hidden width of the shared SwiGLU expert (upstream: 2D). 0 removes
            it.
        qk_norm (`str`, *optional*): `None` (timm attention layout: DiT-MoE S/B) or `"layer_norm"` (affine
            per-head LayerNorm on q and k, eps 1e-6: the flash-attention layout of the XL/G checkpoints).
        aux_loss_alpha (`float`): Weight of the load-balancing loss computed in training mode and returned summed
            over the layers as the output's `aux_loss`; 0.01 upstream.
        formulation (`str`): Meaning of the timestep input and output (`"ddpm-learned-sigma"` or `"rf-noise-at-1"`);
            see `diffmoe_hf.formulations`.
    """

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
        qk_norm: str | None = None,
        aux_loss_alpha: float = 0.01,
        formulation: str = "ddpm-learned-sigma",
    ):
        super().__init__()
        check_model_config(self.config)
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}; expected one of {QK_NORMS}.")
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.register_to_config(out_channels=self.out_channels)

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type="sincos",
        )
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                AdaLNZeroTransformerBlock(
                    dim=dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    feed_forward=SoftmaxTopKMoE(
                        dim=dim,
                        num_experts=num_experts,
                        num_experts_per_tok=num_experts_per_tok,
                        intermediate_size=moe_intermediate_size,
                        shared_expert_intermediate_size=shared_expert_intermediate_size,
                        aux_loss_alpha=aux_loss_alpha,
                    ),
                    norm_type="layer_norm",
                    qk_norm=qk_norm,
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels, norm_type="layer_norm")
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTMoETransformer2DModel":
        """
        A randomly initialised model with one of the original architectures (`DIT_MOE_PRESETS`, e.g. `"DiT-MoE-G/2"`;
        the original names such as `"DiT-G/2"` are aliases) and the original defaults (256px ImageNet latents, 8
        experts, 2 per token, learned-sigma output); `overrides` replace any config field, e.g. `num_experts=16,
        qk_norm="layer_norm"`.
        """
        config = {
            **preset_config(
                "DiTMoE (DiT-MoE, Fei et al. 2024)", DIT_MOE_PRESETS, name, aliases=DIT_MOE_PRESET_ALIASES
            ),
            **overrides,
        }
        config.setdefault("out_channels", 2 * config.get("in_channels", 4))
        return cls(**config)

    def _initialize_family_weights(self) -> None:
        """
        DiT-MoE (feizc/DiT-MoE `models.py`, `DiT.initialize_weights`): the DiT init (experts and shared expert are
        plain Linears, q/k/v fused in both the timm and the flash layout, q/k LayerNorm gains 1 and biases 0), routers
        kaiming-uniform (`MoEGate.reset_parameters`, not reached by the Linear walk).
        """
        initialize_dit(self)
        initialize_softmax_routers(self)
