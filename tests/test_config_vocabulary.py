"""One name and one meaning per concept across the families: the config fields (and what their defaults mean), the
presets' expert widths, the MoE layers' attributes, the shared layers' keyword-only constructors."""

import inspect

import pytest
import torch

from diffmoe_hf.families import FAMILIES, get_family
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


MODEL_CLASSES = [family.model_class for family in FAMILIES.values()]
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


# `None` means one thing, the same in every family: `out_channels=None` is `in_channels` (diffusers' convention; the
# config records the number), `qk_norm=None` is no q/k norm
NONE_DEFAULTS = {"out_channels", "qk_norm"}


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_no_field_defaults_to_a_none_whose_meaning_depends_on_the_family(model_class):
    signature = inspect.signature(model_class.__init__)
    assert {name for name, p in signature.parameters.items() if p.default is None} <= NONE_DEFAULTS


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_moe_preset_states_its_expert_widths(family):
    family = get_family(family)
    for name, config in family.presets.items():
        with torch.device("meta"):
            model = family.model_class.from_preset(name)
        if not any(hasattr(block.ff, "router") for block in model.transformer_blocks):
            continue  # a dense preset (JiT)
        assert "moe_intermediate_size" in config, name
        # a preset without a shared expert (DiffMoE of Shi et al.) may leave it to the constructor default, 0
        assert "shared_expert_intermediate_size" in config or model.config.shared_expert_intermediate_size == 0, name


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


def test_the_config_records_the_resolved_layers_and_output_channels():
    model = tiny_dsmoe(num_layers=4, out_channels=None)
    assert model.config.moe_layers == [1, 3] and model.config.out_channels == model.config.in_channels == 4
    dense = get_family("jit").tiny_model("dense")
    assert dense.config.moe_layers == [] and not any(hasattr(b.ff, "router") for b in dense.transformer_blocks)
