"""One name per concept across the families: the config fields, the MoE layers' attributes, the shared layers'
keyword-only constructors; and folders saved with the earlier field names still load as the model they were."""

import inspect
import json

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

from .helpers import randomize_weights, tiny_dsmoe


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
# names earlier versions used for concepts that now have one name in every family
RETIRED_FIELDS = {"num_shared_experts", "shared_intermediate_size"}


def _init_parameters(model_class) -> set[str]:
    return set(inspect.signature(model_class.__init__).parameters) - {"self"}


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_every_family_names_its_moe_fields_the_same_way(model_class):
    fields = _init_parameters(model_class)
    assert not fields & RETIRED_FIELDS
    assert {"num_experts", "shared_expert_intermediate_size"} <= fields


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
    dense = get_family("jit").tiny_model("dense")
    assert dense.config.moe_layers == [] and not any(hasattr(b.ff, "router") for b in dense.transformer_blocks)


def _public(config) -> dict:
    """A config's fields without diffusers' bookkeeping (`_name_or_path`, `_use_default_values`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _rewrite_config(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _legacy_dsmoe_or_jit(moe_layers_none_means):
    def edit(config):
        assert config.pop("shared_expert_intermediate_size") == config["moe_intermediate_size"]
        config["num_shared_experts"] = 1
        if moe_layers_none_means is not None:
            config["moe_layers"] = None

    return edit


def _legacy_dynamic_token(num_shared_experts):
    def edit(config):
        config.pop("shared_expert_intermediate_size")
        config.pop("moe_intermediate_size")  # it did not exist: the experts took the dense MLPs' width
        config.update(num_shared_experts=num_shared_experts, moe_layers=None)

    return edit


def _legacy_spatial_temporal(config):
    config["shared_intermediate_size"] = config.pop("shared_expert_intermediate_size") or None


LEGACY_CASES = {
    # DSMoE's `moe_layers: null` meant the odd blocks
    "dsmoe": (lambda: tiny_dsmoe(num_layers=4), _legacy_dsmoe_or_jit("odd")),
    # JiT's meant no MoE block at all
    "jit-dense": (lambda: get_family("jit").tiny_model("dense"), _legacy_dsmoe_or_jit("none")),
    "jitmoe": (lambda: get_family("jit").tiny_model("jitmoe"), _legacy_dsmoe_or_jit(None)),
    "diff-moe-shared": (
        lambda: get_family("spatial-temporal-moe").tiny_model("shared-expert"),
        _legacy_spatial_temporal,
    ),
    "diffmoe-shared": (
        lambda: get_family("dynamic-token-moe").tiny_model("shared-expert", num_layers=3),
        _legacy_dynamic_token(num_shared_experts=1),
    ),
    "diffmoe-no-shared": (
        lambda: get_family("dynamic-token-moe").tiny_model("no-shared-expert", num_layers=3),
        _legacy_dynamic_token(0),
    ),
    "diff-moe-no-shared": (
        lambda: get_family("spatial-temporal-moe").tiny_model("no-shared-expert"),
        _legacy_spatial_temporal,
    ),
}


@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_folders_saved_with_the_earlier_field_names_load_as_the_same_model(case, tmp_path):
    build, make_legacy = LEGACY_CASES[case]
    model = randomize_weights(build().eval())  # non-trivial outputs: a fresh adaLN-Zero model returns zeros
    model.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, make_legacy)

    loaded = type(model).from_pretrained(tmp_path).eval()

    assert _public(loaded.config) == _public(model.config)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    config = model.config
    channels = config.in_channels
    x = torch.randn(2, channels, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, y).sample
        assert expected.abs().max() > 0
        torch.testing.assert_close(loaded(x, t, y).sample, expected, rtol=0, atol=0)
