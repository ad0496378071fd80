"""One name per concept across the families: the config fields, the MoE layers' attributes, the shared layers'
keyword-only constructors."""

import inspect

import pytest

from diffmoe_hf import (
    DiTMoETransformer2DModel,
    DSMoETransformer2DModel,
    DynamicTokenMoETransformer2DModel,
    JiTTransformer2DModel,
    SpatialTemporalMoETransformer2DModel,
)
from diffmoe_hf.models.blocks import AdaLNZeroTransformerBlock
from diffmoe_hf.models.dynamic_token_moe_layer import CapacityPredictor, DynamicTokenMoE, ExpertChoiceRouter
from diffmoe_hf.models.modeling_common import resolve_moe_layers
from diffmoe_hf.models.moe import (
    DeepSeekMoE,
    GeluMLPExperts,
    SigmoidGroupLimitedRouter,
    SoftmaxTopKRouter,
    SwiGLU,
    SwiGLUExperts,
    SwiGLUTokenChoiceMoE,
)
from diffmoe_hf.models.spatial_temporal_moe_layer import (
    LowRankModulation,
    ModulatedSwiGLU,
    ModulatedSwiGLUExperts,
    SpatialTemporalMoE,
)
from diffmoe_hf.models.transformer_dit_moe import SoftmaxTopKMoE
from diffmoe_hf.models.transformer_spatial_temporal_moe import SpatialTemporalMoEBlock

from .helpers import tiny_dsmoe
from .test_jit import TINY as JIT_TINY


MODEL_CLASSES = [
    DSMoETransformer2DModel,
    JiTTransformer2DModel,
    DiTMoETransformer2DModel,
    DynamicTokenMoETransformer2DModel,
    SpatialTemporalMoETransformer2DModel,
]
SHARED_LAYERS = [
    AdaLNZeroTransformerBlock,
    SpatialTemporalMoEBlock,
    SigmoidGroupLimitedRouter,
    SoftmaxTopKRouter,
    SwiGLU,
    SwiGLUExperts,
    GeluMLPExperts,
    SwiGLUTokenChoiceMoE,
    DeepSeekMoE,
    SoftmaxTopKMoE,
    LowRankModulation,
    ModulatedSwiGLU,
    ModulatedSwiGLUExperts,
    SpatialTemporalMoE,
    ExpertChoiceRouter,
    CapacityPredictor,
    DynamicTokenMoE,
]


def _init_parameters(model_class) -> set[str]:
    return set(inspect.signature(model_class.__init__).parameters) - {"self"}


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_every_family_names_its_moe_fields_the_same_way(model_class):
    assert {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"} <= _init_parameters(model_class)


@pytest.mark.parametrize("layer_class", SHARED_LAYERS, ids=lambda c: c.__name__)
def test_shared_layers_take_keyword_arguments_only(layer_class):
    parameters = list(inspect.signature(layer_class.__init__).parameters.values())[1:]
    assert parameters and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    if "dim" in {p.name for p in parameters}:
        assert parameters[0].name == "dim"  # one order everywhere: width first, then the experts


def test_moe_layers_patterns_and_lists():
    assert resolve_moe_layers("odd", 5) == [1, 3]
    assert resolve_moe_layers("all", 3) == [0, 1, 2]
    assert resolve_moe_layers("none", 3) == []
    assert resolve_moe_layers([3, 1, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match="'odd', 'all', 'none'|'all', 'odd', 'none'"):
        resolve_moe_layers(None, 4)
    with pytest.raises(ValueError, match="must index blocks 0..3"):
        resolve_moe_layers([4], 4)


def test_the_config_records_the_resolved_layers_and_widths():
    model = tiny_dsmoe(num_layers=4)
    assert model.config.moe_layers == [1, 3]
    assert model.config.shared_expert_intermediate_size == model.config.moe_intermediate_size
    dense = JiTTransformer2DModel(**{**JIT_TINY, "moe_layers": "none"})
    assert dense.config.moe_layers == [] and not any(hasattr(b.ff, "router") for b in dense.transformer_blocks)
