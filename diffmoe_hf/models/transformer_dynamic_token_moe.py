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

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .blocks import PatchOutputLayer, adaln_zero_blocks
from .dynamic_token_moe_layer import DynamicTokenMoE, update_capacity_thresholds
from .embeddings import TimestepClassEmbedding
from .initialization import initialize_dit
from .modeling_common import DiTForwardMixin, resolve_moe_layers
from .moe import MoECollector
from .presets import preset_config
from .validation import check_model_config


# The DiffMoE configs of yhlleo/EfficientMoE (DSMoE/config/000_DiffMoE_*_Flow.yaml). All: 256px ImageNet (latent
# 32x32x4), patch 2, learned-sigma output (8 channels), mlp_ratio 4 (experts as wide as the dense MLPs, 4D), capacity
# 1, MoE on odd layers, no shared expert. "DiffMoE-L-E16" is what 000_DiffMoE_L_E16_Flow.yaml defines: 8 experts, the
# same model as "DiffMoE-L-E8".
DYNAMIC_TOKEN_MOE_PRESETS = {
    "DiffMoE-S-E16": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, num_experts=16,
                          moe_intermediate_size=1536),
    "DiffMoE-B-E16": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, num_experts=16,
                          moe_intermediate_size=3072),
    "DiffMoE-L-E16": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=8,
                          moe_intermediate_size=4096),
    "DiffMoE-L-E8": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, num_experts=8,
                         moe_intermediate_size=4096),
}  # fmt: skip
_RELEASED_COMMON = dict(
    sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_classes=1000, mlp_ratio=4.0, capacity=1.0
)


class DynamicTokenMoETransformer2DModel(DiTForwardMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    DiffMoE transformer (Shi et al. 2025, dynamic token selection) for class-conditional latent flow matching. Not
    Diff-MoE (Cheng et al.).

    **Batch dependence.** Every MoE layer routes over the pool of all tokens of the call: at inference its capacity
    predictor sets how many tokens of the whole batch each expert processes, and the router picks which. A sample's
    output therefore changes with what else is in the batch (the original model behaves the same way). To reproduce
    the original sampler, call the model with the same batch composition: `ClassConditionalMoEPipeline` runs the
    conditional and the unconditional batch as two separate calls for this model (`routing_depends_on_batch`).
    Each layer's routing is the output of its `ff.router` (`diffmoe_hf.routing.record_routing` counts it).

    **Training.** In `train()` mode each MoE layer uses expert-choice top-k over the batch with the capacity factor;
    the output carries the sum of the capacity-predictor losses (`output.aux_loss`: add it to the diffusion loss) and
    each layer's `tokens_per_expert` and `capacity_quantile` (`output.moe_statistics`). After its blocks, the forward
    moves every layer's `expert_threshold` buffer one EMA step towards its quantile, exactly once per call (blocks
    recomputed under gradient checkpointing do not update them again), averaged over ranks when `torch.distributed`
    is initialised (see `update_capacity_thresholds`).

    Args:
        sample_size (`int`): Side of the square latent the model was trained on.
        patch_size (`int`): Patch side p.
        in_channels (`int`): Latent channels C.
        out_channels (`int`, *optional*): Output channels; the original models have 2C (the upper half is an untrained
            learned-sigma head). `None` means `in_channels`; the config records the number.
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape; the hidden width is their product.
        mlp_ratio (`float`): Hidden width of the dense GELU-tanh MLPs, as a multiple of the hidden width.
        num_classes (`int`): Number of classes; id `num_classes` is the null class used for guidance.
        class_dropout_prob (`float`): Label dropout in training mode.
        moe_layers (`str` or `list[int]`): The MoE blocks: `"odd"` (the released configs), `"all"`, `"none"` or a
            list of block indices; the config records the list.
        num_experts (`int`): Experts per MoE layer.
        moe_intermediate_size (`int`): Hidden width of each expert (upstream: the dense MLPs' width
            `int(D * mlp_ratio)`).
        capacity (`float`): Training capacity factor: each expert takes `tokens / num_experts * capacity` tokens.
        shared_expert_intermediate_size (`int`): Hidden width of the shared GELU-tanh MLP added for every token
            (upstream: 8x the hidden width when the model has shared experts); 0 for none.
        capacity_loss_weight (`float`): Weight of each layer's capacity-predictor loss in `aux_loss`.
        formulation (`str`): Meaning of the timestep input and output; see `diffmoe_hf.formulations`.
    """

    # Routing is over the token pool of the whole call: cond and uncond must be separate transformer calls.
    routing_depends_on_batch = True
    # the capacity predictor decides, like the router, in float32 whatever the model's dtype
    _skip_layerwise_casting_patterns = [*DiTForwardMixin._skip_layerwise_casting_patterns, "capacity_predictor"]
    _keep_in_fp32_modules = [*DiTForwardMixin._keep_in_fp32_modules, "capacity_predictor"]

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
        moe_layers: str | list[int] = "odd",
        num_experts: int = 16,
        moe_intermediate_size: int = 1536,
        capacity: float = 1.0,
        shared_expert_intermediate_size: int = 0,
        capacity_loss_weight: float = 1.0,
        formulation: str = "rf-noise-at-0",
    ):
        super().__init__()
        check_model_config(self.config)
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        moe_layers = resolve_moe_layers(moe_layers, num_layers)
        self.register_to_config(out_channels=self.out_channels, moe_layers=moe_layers)
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
        self.transformer_blocks = adaln_zero_blocks(
            num_layers,
            moe_layers,
            dense_feed_forward=lambda: FeedForward(
                dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate", bias=True
            ),
            moe_feed_forward=lambda: DynamicTokenMoE(
                dim=dim,
                num_experts=num_experts,
                intermediate_size=moe_intermediate_size,
                capacity=capacity,
                shared_expert_intermediate_size=shared_expert_intermediate_size,
                capacity_loss_weight=capacity_loss_weight,
            ),
            dim=dim,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
        )
        self.proj_out = PatchOutputLayer(dim, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DynamicTokenMoETransformer2DModel":
        """
        A randomly initialised model with the architecture of an EfficientMoE config of DiffMoE (Shi et al.), see
        `DYNAMIC_TOKEN_MOE_PRESETS`.
        """
        return cls(
            **{
                **preset_config(
                    "DynamicTokenMoE (DiffMoE, Shi et al. 2025)", DYNAMIC_TOKEN_MOE_PRESETS, name, _RELEASED_COMMON
                ),
                **overrides,
            }
        )

    def _initialize_family_weights(self) -> None:
        """
        DiffMoE of Shi et al. (KwaiVGI/DiffMoE `models/models_DiffMoE.py`, also yhlleo/EfficientMoE
        `DSMoE/models/models_DiffMoE.py`: `DiT.initialize_weights`): the DiT init (experts, shared expert and the
        capacity predictor are plain Linears), the router N(0, 0.006²) (a bare parameter upstream, which the Linear
        walk does not reach), the capacity thresholds 0.
        """
        initialize_dit(self)
        for module in self.modules():
            if isinstance(module, DynamicTokenMoE):
                nn.init.normal_(module.router.weight, std=0.006)
                nn.init.constant_(module.capacity_predictor.expert_threshold, 0.0)

    def finish_moe_call(self, collector: MoECollector) -> None:
        """
        Moves the capacity thresholds of the layers that ran in training mode, once per call, outside the
        (checkpointed) blocks. With `torch.distributed` initialised this is one `all_reduce` inside the forward: the
        original averages the thresholds over ranks at every training forward, and DDP's buffer broadcast would drop
        an average deferred to the training loop (the reasons are in `update_capacity_thresholds`).
        """
        update_capacity_thresholds(
            [
                (layer.capacity_predictor, statistics["capacity_quantile"])
                for layer, statistics in collector.statistics.items()
                if isinstance(layer, DynamicTokenMoE)
            ]
        )
