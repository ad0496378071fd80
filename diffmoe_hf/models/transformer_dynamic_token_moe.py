"""DiffMoE: DiT with dynamic token selection (Shi et al. 2025, "DiffMoE: Dynamic Token Selection for Scalable
Diffusion Transformers"; original code KwaiVGI/DiffMoE `models/models_DiffMoE.py`, also the DiffMoE baselines of
yhlleo/EfficientMoE). This is NOT Diff-MoE (Cheng et al., kunncheng/Diff-MoE; `SpatialTemporalMoETransformer2DModel`).

Differences from diffusers' `DiTTransformer2DModel`, all deliberate (they are what the original checkpoints compute):
- the timestep is the flow time in [0, 1] with 0 = noise, embedded with DiT's original frequencies (see
  `TimestepClassEmbedding`);
- the MoE layers route over the token pool of the whole call (`DynamicTokenMoE`), so a sample's output depends on the
  other samples in the batch;
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

from .blocks import AdaLNZeroMoETransformerBlock, AdaLNZeroTransformerBlock, PatchOutputLayer
from .embeddings import TimestepClassEmbedding
from .modeling_common import DiTForwardMixin, preset_config
from .moe import DynamicTokenMoE


# The DiffMoE configs of yhlleo/EfficientMoE (DSMoE/config/000_DiffMoE_*_Flow.yaml). All: 256px ImageNet (latent
# 32x32x4), patch 2, learned-sigma output (8 channels), mlp_ratio 4, capacity 1, MoE on odd layers, no shared expert.
# "DiffMoE-L-E16" is what 000_DiffMoE_L_E16_Flow.yaml defines: 8 experts, the same model as "DiffMoE-L-E8".
DYNAMIC_TOKEN_MOE_PRESETS = {
    "DiffMoE-S-E16": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, num_experts=16),
    "DiffMoE-B-E16": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, num_experts=16),
    "DiffMoE-L-E16": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=8),
    "DiffMoE-L-E8": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=8),
}
_RELEASED_COMMON = dict(
    sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_classes=1000, mlp_ratio=4.0, capacity=1.0
)


class DynamicTokenMoETransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    DiffMoE transformer (Shi et al. 2025, dynamic token selection) for class-conditional latent flow matching. Not
    Diff-MoE (Cheng et al.).

    **Batch dependence.** Every MoE layer routes over the pool of all tokens of the call: at inference its capacity
    predictor sets how many tokens of the whole batch each expert processes, and the gate picks which. A sample's
    output therefore changes with what else is in the batch (the original model behaves the same way). To reproduce
    the original sampler, call the model with the same batch composition: `ClassConditionalMoEPipeline` runs the
    conditional and the unconditional batch as two separate calls for this model (`routing_depends_on_batch`).
    The number of tokens each expert took in the last call is in `transformer_blocks[i].ff.tokens_per_expert`.

    **Training.** In `train()` mode each MoE layer uses expert-choice top-k over the batch with the capacity factor,
    stores its capacity-predictor loss in `ff.aux_loss` (sum it over the model with
    `diffmoe_hf.models.moe.moe_aux_loss` and add it to the diffusion loss), and updates its `expert_threshold` buffer
    (averaged over ranks when `torch.distributed` is initialised). With gradient checkpointing the layer's forward
    is recomputed in the backward pass, which applies the threshold update a second time.

    Args:
        sample_size (`int`): Side of the square latent the model was trained on.
        patch_size (`int`): Patch side p.
        in_channels (`int`): Latent channels C.
        out_channels (`int`, *optional*): Output channels; the original models have 2C (the upper half is an untrained
            learned-sigma head). Defaults to `in_channels`.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width is their product.
        mlp_ratio (`float`): Hidden width of the dense GELU-tanh MLPs and of every expert, as a multiple of the
            hidden width.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode.
        moe_layers (`list[int]`, *optional*): Indices of the MoE blocks; defaults to the odd blocks.
        num_experts (`int`): Experts per MoE layer.
        capacity (`float`): Training capacity factor: each expert takes `tokens / num_experts * capacity` tokens.
        num_shared_experts (`int`): Shared GELU-tanh MLPs (hidden width 8x the hidden width each) added for every
            token.
        capacity_loss_weight (`float`): Weight of the capacity-predictor loss in each layer's `aux_loss`.
        formulation (`str`): Meaning of the timestep input and output; see `diffmoe_hf.formulations`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    _repeated_blocks = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "embedding", "gate", "capacity_predictor"]
    _keep_in_fp32_modules = ["gate", "capacity_predictor"]
    # Routing is over the token pool of the whole call: cond and uncond must be separate transformer calls.
    routing_depends_on_batch = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 12,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        moe_layers: list[int] | None = None,
        num_experts: int = 16,
        capacity: float = 1.0,
        num_shared_experts: int = 0,
        capacity_loss_weight: float = 1.0,
        formulation: str = "rf-noise-at-0",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        moe_layers = list(range(1, num_layers, 2)) if moe_layers is None else list(moe_layers)
        if any(not 0 <= i < num_layers for i in moe_layers):
            raise ValueError(f"moe_layers={moe_layers} must index blocks 0..{num_layers - 1}.")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be at least 1.")

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type="sincos",
        )
        self.embedding = TimestepClassEmbedding(num_classes, dim, class_dropout_prob)
        hidden = int(dim * mlp_ratio)

        def feed_forward(index):
            if index in moe_layers:
                return DynamicTokenMoE(
                    dim,
                    num_experts=num_experts,
                    intermediate_size=hidden,
                    capacity=capacity,
                    num_shared_experts=num_shared_experts,
                    capacity_loss_weight=capacity_loss_weight,
                )
            return FeedForward(dim, inner_dim=hidden, activation_fn="gelu-approximate", bias=True)

        def _block_class(index):
            return AdaLNZeroMoETransformerBlock if index in moe_layers else AdaLNZeroTransformerBlock

        self.transformer_blocks = nn.ModuleList(
            [_block_class(i)(dim, num_attention_heads, attention_head_dim, feed_forward(i)) for i in range(num_layers)]
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DynamicTokenMoETransformer2DModel":
        """A randomly initialised model with the architecture of an EfficientMoE DiffMoE config (`DYNAMIC_TOKEN_MOE_PRESETS`)."""
        return cls(**{**preset_config("DiffMoE", DYNAMIC_TOKEN_MOE_PRESETS, name, _RELEASED_COMMON), **overrides})

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
            hidden_states: (B, C, H, W) noisy latents. The MoE layers route over all B samples together.
            timestep: (B,) or scalar flow time in [0, 1], 0 = pure noise, 1 = data (unscaled).
            class_labels: (B,) int64 class ids; `num_classes` is the null class.
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: Whether to return a `Transformer2DModelOutput`.

        Returns:
            (B, out_channels, H, W); the first C channels are the velocity `data - noise`.
        """
        tokens, conditioning, _, _ = self.embed_inputs(hidden_states, timestep, class_labels)
        height, width = hidden_states.shape[-2:]

        for block in self.transformer_blocks:
            tokens = self.run_block(block, tokens, conditioning)

        return self.patch_output(tokens, conditioning, height, width, self.out_channels, return_dict)
