"""Every family's constructor refuses a config field outside what it takes, naming the field and the valid range (valid
configurations, the presets and the tiny test models, are built by the other tests as before)."""

import functools
import math
import re

import pytest

from diffmoe_hf.families import FAMILIES, get_family
from diffmoe_hf.models.validation import CONFIG_RULES


# case id, field, value, fragment of the message
BAD_FIELDS = [
    ("capacity-nan", "capacity", math.nan, "capacity=nan must be a finite number > 0"),
    ("routed-scaling-nan", "routed_scaling_factor", math.nan, "routed_scaling_factor=nan must be a finite number > 0"),
    ("routed-scaling-0", "routed_scaling_factor", 0.0, "routed_scaling_factor=0.0 must be a finite number > 0"),
    ("dropout-2", "class_dropout_prob", 2.0, "class_dropout_prob=2.0 must be a finite number in [0, 1]"),
    ("in-channels-0", "in_channels", 0, "in_channels=0 must be a whole number >= 1"),
    ("num-classes-0", "num_classes", 0, "num_classes=0 must be a whole number >= 1"),
    ("num-layers-negative", "num_layers", -1, "num_layers=-1 must be a whole number >= 1"),
    ("sample-size-fraction", "sample_size", 8.5, "sample_size=8.5 must be a whole number >= 1"),
    ("heads-string", "num_attention_heads", "2", "num_attention_heads='2' must be a whole number >= 1"),
    ("experts-bool", "num_experts", True, "num_experts=True must be a whole number >= 1"),
    ("k-above-experts", "num_experts_per_tok", 99, "num_experts_per_tok=99 must be at most num_experts=4"),
    ("shared-negative", "shared_expert_intermediate_size", -8, "must be a whole number >= 0"),
    ("aux-inf", "aux_loss_alpha", math.inf, "aux_loss_alpha=inf must be a finite number >= 0"),
    ("t-eps-1", "t_eps", 1.0, "t_eps=1.0 must be a finite number in [0, 1)"),
    ("out-channels-0", "out_channels", 0, "out_channels=0 must be a whole number >= 1 (or None)"),
]


@functools.cache
def _config(family: str) -> dict:
    model = get_family(family).tiny_model(None)
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


# every (family, case) whose field the family has
CASES = [
    pytest.param(family, field, value, message, id=f"{family}-{case}")
    for family in FAMILIES
    for case, field, value, message in BAD_FIELDS
    if field in _config(family)
]


@pytest.mark.parametrize("family, field, value, message", CASES)
def test_a_constructor_refuses_a_field_out_of_range(family, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_family(family).model_class(**{**_config(family), field: value})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_numeric_field_has_a_rule(family):
    """Each constructor checks its config first, so every preset built by test_config_vocabulary passes the rules."""
    numeric = {k for k, v in _config(family).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(CONFIG_RULES), numeric - set(CONFIG_RULES)  # a new numeric field needs its rule
