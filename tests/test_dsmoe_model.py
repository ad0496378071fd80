"""DSMoETransformer2DModel: presets, inputs, gradients, saving and loading."""

import pytest
import torch

from diffmoe_hf import DSMOE_PRESETS, DSMoETransformer2DModel

from .helpers import assert_float32_close, model_float32_tolerance, tiny_dsmoe, token_routing


# (total parameters in M = 1e6, activated parameters in Mi = 2**20), from the original classes
RELEASED_COUNTS = {
    "DSMoE-S-E16": (96.9, 33.3), "DSMoE-S-E48": (69.2, 29.8), "DSMoE-B-E16": (386.3, 132.2),
    "DSMoE-B-E48": (275.6, 117.7), "DSMoE-L-E16": (1368.1, 464.7), "DSMoE-L-E48": (1166.9, 435.6),
    "DSMoE-3B-E16": (3101.7, 964.6),
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(DSMOE_PRESETS))
def test_preset_parameter_counts_match_released_models(preset):
    with torch.device("meta"):
        model = DSMoETransformer2DModel.from_preset(preset)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = [b.ff for b in model.transformer_blocks if hasattr(b.ff, "router")]
    per_expert = sum(p.numel() for p in moe_layers[0].experts[0].parameters())
    inactive = len(moe_layers) * (model.config.num_experts - model.config.num_experts_per_tok) * per_expert
    expected_total, expected_active = RELEASED_COUNTS[preset]
    # the published figures are rounded to 0.1; the original count of S-E48 also includes two small buffers
    assert abs(total / 1e6 - expected_total) <= 0.05
    assert abs((total - inactive) / 2**20 - expected_active) <= 0.06


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match=r"Unknown DSMoE \(Liu et al. 2025\) preset 'DSMoE-XXL'"):
        DSMoETransformer2DModel.from_preset("DSMoE-XXL")


def test_forward_shape_and_output_channels_default():
    model = tiny_dsmoe(out_channels=None)
    assert model.out_channels == 4
    out = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])).sample
    assert out.shape == (3, 4, 8, 8)


def test_scalar_timestep_is_broadcast():
    model = tiny_dsmoe()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0.3, y).sample, model(x, torch.full((2,), 0.3), y).sample, atol=0, rtol=0)


@pytest.mark.parametrize(
    "x, t, y, message",
    [
        (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2]), "3 channels"),
        (torch.randn(2, 4, 8), torch.rand(2), torch.tensor([1, 2]), "batch, channels, height, width"),
        (torch.randn(2, 4, 7, 7), torch.rand(2), torch.tensor([1, 2]), "multiples of the patch size"),
        (torch.randn(2, 4, 8, 8), torch.rand(3), torch.tensor([1, 2]), "timestep"),
        (torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1.0, 2.0]), "integer class ids"),
        (torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1]), "integer class ids"),
    ],
)
def test_bad_inputs_get_clear_errors(x, t, y, message):
    with pytest.raises(ValueError, match=message):
        tiny_dsmoe()(x, t, y)


def test_routing_is_per_token_so_samples_do_not_depend_on_the_batch():
    model = tiny_dsmoe()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        full = model(x, t, y).sample
        alone = model(x[:1], t[:1], y[:1]).sample
    tokens = alone.shape[-2] * alone.shape[-1] // model.config.patch_size**2
    full_routing, alone_routing = token_routing(model, x, t, y), token_routing(model, x[:1], t[:1], y[:1])
    for name, (ids,) in full_routing.items():
        assert torch.equal(alone_routing[name][0], ids[:tokens]), name  # the same experts for every token
    assert_float32_close(alone, full[:1], model_float32_tolerance(model, full))  # summation order only


def test_gradients_reach_router_experts_and_shared_expert():
    model = tiny_dsmoe().train()
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).sample
    out.square().mean().backward()
    moe = model.transformer_blocks[1].ff
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.shared_experts.down_proj.weight.grad.abs().sum() > 0
    assert sum(e.down_proj.weight.grad.abs().sum() for e in moe.experts if e.down_proj.weight.grad is not None) > 0


def test_gradient_checkpointing_gives_same_gradients():
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for checkpointing in (False, True):
        model = tiny_dsmoe().train()
        model.embedding.class_embedder.dropout_prob = 0.0
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, y).sample.square().mean().backward()
        grads.append(model.transformer_blocks[1].ff.router.weight.grad.clone())
    batch_tokens = x.shape[0] * x.shape[-2] * x.shape[-1] // model.config.patch_size**2
    assert_float32_close(grads[1], grads[0], model_float32_tolerance(model, grads[0], tokens=batch_tokens, calls=2))


def test_save_load_round_trip_and_sharding(tmp_path):
    model = tiny_dsmoe()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    with torch.no_grad():
        reference = model(x, t, y).sample
        for folder in ("whole", "sharded"):
            loaded = DSMoETransformer2DModel.from_pretrained(tmp_path / folder).eval()
            torch.testing.assert_close(loaded(x, t, y).sample, reference, atol=0, rtol=0)


def test_torch_dtype_loading_keeps_router_in_float32(tmp_path):
    tiny_dsmoe().save_pretrained(tmp_path)
    model = DSMoETransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    moe = model.transformer_blocks[1].ff
    assert moe.experts[0].gate_proj.weight.dtype == torch.bfloat16
    assert moe.router.weight.dtype == torch.float32
    assert moe.router.e_score_correction_bias.dtype == torch.float32
    out = model(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.rand(2), torch.tensor([1, 2])).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
