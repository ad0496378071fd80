"""A fresh model of every family is initialised as its original code initialises one: adaLN-Zero (every block is the
identity, the output exactly 0) and each parameter group drawn from the original distribution (see
each class's `_initialize_family_weights`). Loading weights never initialises them."""

import math
import os
import re

import pytest
import torch

from diffmoe_hf.families import get_family
from diffmoe_hf.models.modeling_common import DiTForwardMixin

from .helpers import randomize_weights, tiny_variants


os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Parameter groups and their original init, first matching pattern wins. Kinds (fans from the parameter's shape,
# fan_in = product of all dims but the first):
#   ("zero",) / ("one",): exactly that value;
#   ("xavier", parts): U(±sqrt(6 / (fan_in + parts * fan_out))), parts > 1 for the parts of a fused original Linear;
#   ("normal", std): N(0, std^2);
#   ("kaiming_uniform",): kaiming-uniform with a = sqrt(5), U(±1 / sqrt(fan_in));
#   ("uniform", bound): U(±bound);
#   ("kaiming_normal",): N(0, 2 / fan_in).
_DIT = [
    (r"\.bias$", ("zero",)),
    (r"modulation\.linear\.weight$", ("zero",)),
    (r"^proj_out\.proj\.weight$", ("zero",)),
    (r"norm.*\.weight$", ("one",)),
    (r"^embedding\.timestep_embedder\.linear_[12]\.weight$", ("normal", 0.02)),
    (r"^embedding\.class_embedder\.embedding_table\.weight$", ("normal", 0.02)),
    (r"\.attn\.to_[qkv]\.weight$", ("xavier", 3)),
    (r"\.attn\.to_out\.0\.weight$", ("xavier", 1)),
    (r"^pos_embed\.proj\.weight$", ("xavier", 1)),
]
EXPECTED = {
    "dsmoe": _DIT
    + [
        (r"\.ff\.router\.weight$", ("kaiming_normal",)),
        (r"\.ff\.(net\.0\.proj|net\.2)\.weight$", ("xavier", 1)),
        (r"\.ff\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$", ("xavier", 1)),
    ],
    "jit": _DIT
    + [
        (r"^in_context_pos_embed$", ("normal", 0.02)),
        (r"^pos_embed\.(patch_proj|hidden_proj)\.weight$", ("xavier", 1)),
        (r"\.ff\.router\.weight$", ("kaiming_normal",)),
        (r"\.ff\.((experts\.\d+|shared_experts)\.)?(gate|up)_proj\.weight$", ("xavier", 2)),  # fused `w12`
        (r"\.ff\.((experts\.\d+|shared_experts)\.)?down_proj\.weight$", ("xavier", 1)),
    ],
    "dynamic-token-moe": _DIT
    + [
        (r"\.ff\.router\.weight$", ("normal", 0.006)),
        (r"\.ff\.capacity_predictor\.linear_[12]\.weight$", ("xavier", 1)),
        (r"\.ff\.((experts\.\d+|shared_experts)\.)?net\.(0\.proj|2)\.weight$", ("xavier", 1)),
    ],
    "dit-moe": _DIT
    + [
        (r"\.ff\.router\.weight$", ("kaiming_uniform",)),
        (r"\.ff\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$", ("xavier", 1)),
    ],
    "spatial-temporal-moe": [
        # PyTorch's default Conv2d init; the bias bound is 1 / sqrt(fan_in) of the 5x5 depthwise kernel
        (r"\.depthwise_conv\.weight$", ("kaiming_uniform",)),
        (r"\.depthwise_conv\.bias$", ("uniform", 1 / 5)),
        *_DIT,
        (r"\.ff\.router\.weight$", ("kaiming_uniform",)),
        # the experts' own adaLN as the original's later Xavier pass over every Linear leaves it (not zero)
        (r"\.ff\.(experts\.\d+|shared_experts)\.modulation\.linear_[12]\.weight$", ("xavier", 1)),
        (r"\.ff\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$", ("xavier", 1)),
        (r"\.ff\.recalibration\.[02]\.weight$", ("xavier", 1)),
    ],
}


def fresh_model(family: str, variant: str | None = None, seed: int = 0):
    """A fresh model of the family's registered tiny configuration `variant` (the variants cover every kind of
    parameter: dense and MoE blocks, shared experts, norm gains, q/k norms, in-context class tokens)."""
    torch.manual_seed(seed)
    return get_family(family).model_class.from_config(get_family(family).tiny_config(variant)).eval()


def model_inputs(model, batch_size: int = 2):
    config = model.config
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        torch.rand(batch_size, generator=generator),
        torch.tensor([3, config.num_classes])[:batch_size],
    )


def expected_init(family: str, name: str) -> tuple[str, tuple]:
    """The first `(pattern, kind)` of `EXPECTED[family]` that matches parameter `name`."""
    for pattern, kind in EXPECTED[family]:
        if re.search(pattern, name):
            return pattern, kind
    raise AssertionError(f"{family}: no expected init for parameter {name}")


def standardized(parameter: torch.Tensor, kind: tuple) -> tuple[torch.Tensor, str]:
    """The parameter's values divided by the standard deviation of their expected distribution, and its shape
    ("uniform" with bound sqrt(3) or "normal")."""
    fan_out, fan_in = parameter.shape[0], parameter[0].numel()
    if kind[0] == "xavier":
        bound = math.sqrt(6.0 / (fan_in + kind[1] * fan_out))
        return parameter.flatten() * math.sqrt(3) / bound, "uniform"
    if kind[0] == "kaiming_uniform":
        return parameter.flatten() * math.sqrt(3 * fan_in), "uniform"
    if kind[0] == "uniform":
        return parameter.flatten() * math.sqrt(3) / kind[1], "uniform"
    if kind[0] == "kaiming_normal":
        return parameter.flatten() / math.sqrt(2 / fan_in), "normal"
    if kind[0] == "normal":
        return parameter.flatten() / kind[1], "normal"
    raise AssertionError(kind)


@pytest.mark.parametrize("family, variant", tiny_variants())
def test_fresh_model_output_is_exactly_zero_and_every_block_is_the_identity(family, variant):
    """adaLN-Zero, as every original: the gates and the output layer start at zero."""
    model = fresh_model(family, variant)
    seen = []

    def check_identity(block, args, output):
        seen.append(torch.equal(output, args[0]))

    hooks = [block.register_forward_hook(check_identity) for block in model.transformer_blocks]
    with torch.no_grad():
        output = model(*model_inputs(model)).sample
    for hook in hooks:
        hook.remove()
    assert seen == [True] * model.config.num_layers
    assert output.numel() > 0 and torch.count_nonzero(output) == 0


def assert_original_init(family: str, model) -> None:
    """Exact zeros and ones where the original has them; each random group (one pattern, pooled over blocks and
    experts) has the original mean and variance within 5 standard errors of its sample size, and uniform draws stay
    in their bound."""
    pooled = {}
    for name, parameter in model.named_parameters():
        pattern, kind = expected_init(family, name)
        if kind == ("zero",):
            assert torch.count_nonzero(parameter) == 0, name
        elif kind == ("one",):
            assert torch.all(parameter == 1), name
        else:
            values, shape = standardized(parameter.detach(), kind)
            pooled.setdefault((pattern, shape), []).append(values)
            if shape == "uniform":  # every draw within its bound (float32 rounding of a + (b - a) * u aside)
                assert values.abs().max() <= math.sqrt(3) * (1 + 4 * torch.finfo(torch.float32).eps), name
    for (pattern, shape), chunks in pooled.items():
        values = torch.cat(chunks).double()
        n = values.numel()
        fourth_moment = 9 / 5 if shape == "uniform" else 3  # E[z^4] of a unit-variance uniform / normal
        assert abs(values.mean()) <= 5 / math.sqrt(n), (pattern, values.mean())
        assert abs(values.square().mean() - 1) <= 5 * math.sqrt((fourth_moment - 1) / n), (pattern, values.var(), n)


@pytest.mark.parametrize("family, variant", tiny_variants())
def test_every_parameter_group_has_the_original_distribution(family, variant):
    assert_original_init(family, fresh_model(family, variant))


@pytest.mark.parametrize("family, variant", tiny_variants())
def test_init_is_deterministic_under_manual_seed(family, variant):
    first, again, other = (fresh_model(family, variant, seed) for seed in (0, 0, 1))
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(first.transformer_blocks[1].attn.to_q.weight, other.transformer_blocks[1].attn.to_q.weight)


@pytest.mark.parametrize("family, variant", [("dsmoe", "rms-norm"), ("dit-moe", "qk-norm")])
def test_initialize_weights_resets_a_trained_model(family, variant):  # RMSNorm gains; q/k LayerNorm gains and biases
    model = randomize_weights(fresh_model(family, variant))
    with torch.no_grad():
        assert torch.count_nonzero(model(*model_inputs(model)).sample) > 0
        model.initialize_weights()
        assert torch.count_nonzero(model(*model_inputs(model)).sample) == 0
    assert_original_init(family, model)


def test_router_and_capacity_buffers_start_at_zero():
    dsmoe, dynamic = fresh_model("dsmoe"), fresh_model("diffmoe-dts")
    assert all(b.ff.router.e_score_correction_bias.abs().max() == 0 for b in dsmoe.transformer_blocks[1::2])
    assert all(b.ff.capacity_predictor.expert_threshold.abs().max() == 0 for b in dynamic.transformer_blocks[1::2])


@pytest.mark.parametrize("family, variant", tiny_variants())
def test_loading_keeps_the_saved_weights_and_never_initialises(family, variant, tmp_path, monkeypatch):
    """`from_pretrained` builds the model on the meta device and loads the saved tensors exactly; the family's
    initialisation is not run on the way (no second pass over the weights)."""
    model = randomize_weights(fresh_model(family, variant))
    model.save_pretrained(tmp_path)

    def refuse(model):
        raise AssertionError("from_pretrained ran the weight initialisation")

    monkeypatch.setattr(type(model), "_initialize_family_weights", refuse)
    loaded = type(model).from_pretrained(tmp_path)
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


def test_a_model_class_without_its_initialisation_is_refused():
    class Unported(DiTForwardMixin, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_out = torch.nn.Linear(2, 2)
            self.initialize_weights()

    with pytest.raises(NotImplementedError, match="Unported defines no `_initialize_family_weights`"):
        Unported()
