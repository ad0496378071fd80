"""The benchmarked models: entries of the registered families (`diffmoe_hf.families`; DSMoE twice, E16 and E48), their
MoE feed-forward layer, and the dense models of equal activated FLOPs they are compared with.

Dense equivalents:
- layer: a dense SwiGLU (GELU-tanh MLP for DiffMoE of Shi et al., whose experts are
  MLPs) whose hidden width is the activated width
  of the MoE layer: k * expert width + shared width (DiffMoE: capacity * expert width, the average a token gets);
- full model: diffusers' `DiTTransformer2DModel` with the MoE model's width, depth, heads, patch size and token grid,
  whose blocks' feed-forward width is set so its forward FLOPs equal the MoE model's (counted with
  `torch.utils.flop_counter.FlopCounterMode`, which counts what actually runs: routers, expert GEMMs, attention).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention import FeedForward
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from diffmoe_hf.families import get_family
from diffmoe_hf.models.dynamic_token_moe_layer import DynamicTokenMoE, update_capacity_thresholds
from diffmoe_hf.models.moe import GeluMLPExperts, MoECollector, SwiGLU
from diffmoe_hf.models.spatial_temporal_moe_layer import SpatialTemporalMoE


@register_flop_formula(torch.ops.diffmoe_hf.segment_mm)
def _segment_mm_flops(rows_shape, weight_shape, offsets_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * rows_shape[0] * rows_shape[1] * weight_shape[1]


@register_flop_formula(torch.ops.diffmoe_hf.segment_linear)
def _segment_linear_flops(rows_shape, weight_shapes, bias_shapes, offsets_shape, *args, out_shape=None, **kwargs):
    num_parts = len(weight_shapes) // offsets_shape[0]
    return 2 * rows_shape[0] * rows_shape[1] * sum(shape[0] for shape in weight_shapes[:num_parts])


@dataclass
class Benchmarked:
    """
    A benchmarked model of a registered family (`diffmoe_hf.families`): its presets per size, and for `--quick` runs
    the family's tiny configuration, or `tiny` where the entry benchmarks another expert layout of the family.
    """

    name: str
    family: str
    presets: dict[str, str]
    tiny_variant: str | None = None
    tiny: dict | None = None

    def build(self, size: str) -> nn.Module:
        family = get_family(self.family)
        torch.manual_seed(0)
        if size == "tiny":
            return family.model_class(**(self.tiny or family.tiny_config(self.tiny_variant))).eval()
        return family.model_class.from_preset(self.presets[size]).eval()


BENCHMARKED = {
    entry.name: entry
    for entry in (
        Benchmarked("dsmoe", "dsmoe", {"S": "DSMoE-S-E16", "B": "DSMoE-B-E16"}),
        Benchmarked(
            "dsmoe-e48",
            "dsmoe",
            {"S": "DSMoE-S-E48", "B": "DSMoE-B-E48"},
            tiny=get_family("dsmoe").tiny_config(num_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1),
        ),
        # JiTMoE exists in B, L and H only (pixel space, 256 patches + 32 class tokens): not in the S runs
        Benchmarked("jitmoe", "jit", {"B": "JiTMoE-B/16-E16"}, tiny_variant="jitmoe"),
        Benchmarked("dit-moe", "dit-moe", {"S": "DiT-MoE-S/2", "B": "DiT-MoE-B/2"}),
        Benchmarked("dynamic-token-moe", "dynamic-token-moe", {"S": "DiffMoE-S-E16", "B": "DiffMoE-B-E16"}),
        Benchmarked("spatial-temporal-moe", "spatial-temporal-moe", {"S": "Diff-MoE-S/2", "B": "Diff-MoE-B/2"}),
    )
}


def model_inputs(model: nn.Module, batch_size: int, device, dtype) -> dict:
    """Random inputs of a forward call: latents (or images), timesteps in the model's time range, class labels."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    return dict(
        hidden_states=torch.randn(shape, generator=generator).to(device, dtype),
        timestep=torch.rand(batch_size, generator=generator).to(device),
        class_labels=torch.randint(0, config.num_classes, (batch_size,), generator=generator).to(device),
    )


def calibrate_capacity(model: nn.Module, inputs: dict | Callable[[], object]) -> None:
    """
    Sets the capacity thresholds of DiffMoE (Shi et al.) as training would (each expert expects tokens / E tokens): a
    randomly initialised predictor has threshold 0, which sends every token to every expert at inference. `inputs` are
    the model's keyword inputs, or a closure calling `model` on the data to calibrate on. No-op for the other families.
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicTokenMoE)]
    if not layers:
        return
    decays = [layer.capacity_predictor.ema_decay.clone() for layer in layers]
    for layer in layers:
        layer.capacity_predictor.ema_decay.zero_()  # take this batch's quantile as the threshold
    model.train()
    with torch.no_grad(), MoECollector() as collector:  # a bare layer reports here; a model moves its own thresholds
        inputs() if callable(inputs) else model(**inputs)
    model.eval()
    update_capacity_thresholds(
        [(layer.capacity_predictor, stats["capacity_quantile"]) for layer, stats in collector.statistics.items()]
    )
    for layer, decay in zip(layers, decays):
        layer.capacity_predictor.ema_decay.copy_(decay)


def first_moe_layer(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "num_experts"):
            return module
    raise ValueError(f"{type(model).__name__} has no MoE layer.")


def layer_call(layer: nn.Module, tokens: torch.Tensor, conditioning: torch.Tensor) -> Callable[[], torch.Tensor]:
    """
    A closure running the MoE layer on (B, N, D) tokens (the Diff-MoE layer of Cheng et al. also reads the (B, D)
    conditioning).
    """
    if isinstance(layer, SpatialTemporalMoE):
        return lambda: layer(tokens, conditioning)
    return lambda: layer(tokens)


def dense_equivalent_layer(layer: nn.Module) -> tuple[nn.Module, int]:
    """The dense feed-forward with the MoE layer's activated hidden width, and that width."""
    experts = layer.experts
    if isinstance(experts, GeluMLPExperts):  # DiffMoE: each expert takes tokens * capacity / E tokens
        dim, width = experts[0].net[0].proj.in_features, round(layer.capacity * experts[0].net[2].in_features)
        if layer.shared_experts is not None:
            width += layer.shared_experts.net[2].in_features
        return FeedForward(dim, inner_dim=width, activation_fn="gelu-approximate", bias=True), width
    dim, width = experts[0].gate_proj.in_features, layer.router.top_k * experts[0].down_proj.in_features
    if layer.shared_experts is not None:
        width += layer.shared_experts.down_proj.in_features
    return SwiGLU(dim=dim, intermediate_size=width), width


def count_flops(run: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _dense_dit(model: nn.Module, ff_width: int) -> DiTTransformer2DModel:
    config = model.config
    dit = DiTTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=config.in_channels,
        out_channels=getattr(model, "out_channels", config.in_channels),
        num_layers=config.num_layers,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
    )
    dim = config.num_attention_heads * config.attention_head_dim
    for block in dit.transformer_blocks:
        block.ff = FeedForward(dim, inner_dim=ff_width, activation_fn="gelu-approximate", bias=True)
    return dit.eval()


def dense_dit_of_equal_flops(model: nn.Module, moe_flops: int, inputs: dict) -> tuple[nn.Module, int]:
    """
    `DiTTransformer2DModel` with the model's shape whose forward FLOPs on `inputs` match `moe_flops`: FLOPs are
    affine in the blocks' feed-forward width, so two counts give the width (rounded to a multiple of 64).
    """
    dit_inputs = dict(inputs, timestep=(inputs["timestep"] * 999).long().clamp(0, 999))
    dit_inputs["class_labels"] = dit_inputs["class_labels"].clamp(max=model.config.num_classes - 1)
    flops = [count_flops(lambda: _dense_dit(model, width)(**dit_inputs)) for width in (64, 128)]
    per_unit = (flops[1] - flops[0]) / 64
    width = max(64, round((moe_flops - flops[0]) / per_unit / 64) * 64 + 64)
    return _dense_dit(model, width), width, dit_inputs
