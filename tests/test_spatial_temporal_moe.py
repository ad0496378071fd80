"""Diff-MoE (Cheng et al.) port: `SpatialTemporalMoETransformer2DModel`, its MoE layer and the `diff-moe` converter."""

import argparse
import re

import pytest
import torch

from diffmoe_hf import SPATIAL_TEMPORAL_MOE_PRESETS, ClassConditionalMoEPipeline, SpatialTemporalMoETransformer2DModel
from diffmoe_hf.conversion import CheckpointError, LoadedCheckpoint, convert_checkpoint
from diffmoe_hf.conversion.convert_spatial_temporal_moe import build_spatial_temporal_moe_transformer
from diffmoe_hf.families import get_family
from diffmoe_hf.models.attention import apply_rotary, rotary_tables

from .helpers import (
    assert_float32_close,
    float32_tolerance,
    model_float32_tolerance,
    randomize_weights,
    token_routing,
)


TINY = get_family("spatial-temporal-moe").tiny_config("shared-expert")

# original parameter counts in millions (input 32, 1000 classes, E = 8 / 16), which include the
# all-zero [1, T, D] pos_embed parameter that the port does not keep
UPSTREAM_PARAMS_M = {
    "DiT-S/2": (211.6, 391.1), "DiT-T/2": (97.0, 178.8), "DiT-B/2": (820.5, 1519.2), "DiT-L/2": (2889.6, 5356.6),
    "DiT-XL/2": (4254.5, 7888.9), "DiT-G/2": (9041.4, 16771.2), "DiT-S/2_v2": (106.6, 186.9),
    "DiT-B/2_v2": (401.6, 703.8), "DiT-L/2_v2": (1400.7, 2458.1),
}  # fmt: skip


def _tiny_model(**overrides) -> SpatialTemporalMoETransformer2DModel:
    torch.manual_seed(0)
    return randomize_weights(SpatialTemporalMoETransformer2DModel(**{**TINY, **overrides})).eval()


def _inputs(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([999.0, 500.0, 3.0][:batch]), torch.tensor([1, 10, 7][:batch])


# port key -> original key (the inverse of the converter's renaming), to build original-layout checkpoints
_TO_ORIGINAL = [
    (r"pos_embed\.proj\.(.*)", r"x_embedder.proj.\1"),
    (r"embedding\.timestep_embedder\.linear_1\.(.*)", r"t_embedder.mlp.0.\1"),
    (r"embedding\.timestep_embedder\.linear_2\.(.*)", r"t_embedder.mlp.2.\1"),
    (r"embedding\.class_embedder\.(.*)", r"y_embedder.\1"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(.*)", r"blocks.\1.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.modulation\.linear\.(.*)", r"blocks.\1.adaLN_modulation.1.\2"),
    (r"transformer_blocks\.(\d+)\.depthwise_conv\.(.*)", r"blocks.\1.dwconv.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.router\.(.*)", r"blocks.\1.moe.gate.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.recalibration\.(.*)", r"blocks.\1.moe.se.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.(.*)\.modulation\.linear_1\.(.*)", r"blocks.\1.moe.\2.adaLN_modulation.0.\3"),
    (r"transformer_blocks\.(\d+)\.ff\.(.*)\.modulation\.linear_2\.(.*)", r"blocks.\1.moe.\2.adaLN_modulation.2.\3"),
    (r"transformer_blocks\.(\d+)\.ff\.(.*)", r"blocks.\1.moe.\2"),
    (r"proj_out\.proj\.(.*)", r"final_layer.linear.\1"),
    (r"proj_out\.modulation\.linear\.(.*)", r"final_layer.adaLN_modulation.1.\1"),
]


def _original_state_dict(model: SpatialTemporalMoETransformer2DModel) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        qkv = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)", key)
        if qkv:
            parts = [model.state_dict()[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            state[f"blocks.{qkv[1]}.attn.qkv.{qkv[2]}"] = torch.cat(parts)
            continue
        if re.search(r"attn\.to_[kv]\.", key):
            continue
        for pattern, replacement in _TO_ORIGINAL:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, replacement, key)] = value.clone()
                break
        else:
            raise AssertionError(f"no original name for {key}")
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    state["pos_embed"] = torch.zeros(1, tokens, dim)
    return state


def _original_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "model": "DiT-S/2",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "rf": False,
            "pretraining_tp": 2,
            "num_classes": 10,
            **overrides,
        }
    )


def _original_count(model: SpatialTemporalMoETransformer2DModel) -> int:
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    zero_pos_embed = (model.config.sample_size // model.config.patch_size) ** 2 * dim
    return sum(p.numel() for p in model.parameters()) + zero_pos_embed


@pytest.mark.parametrize("name", sorted(UPSTREAM_PARAMS_M))
def test_preset_parameter_counts_match_the_original(name):
    expected_e8, expected_e16 = UPSTREAM_PARAMS_M[name]
    with torch.device("meta"):
        model = SpatialTemporalMoETransformer2DModel.from_preset(name)
    count = _original_count(model)
    assert round(count / 1e6, 1) == expected_e8, f"{name} E8: {count / 1e6:.2f}M"
    if model.config.num_layers <= 12:
        with torch.device("meta"):
            count = _original_count(SpatialTemporalMoETransformer2DModel.from_preset(name, num_experts=16))
    else:  # deep E16 models take seconds to build even on the meta device: 8 more experts and router rows per block
        moe = model.transformer_blocks[0].ff
        per_expert = sum(p.numel() for p in moe.experts[0].parameters()) + moe.router.weight.shape[1]
        count += 8 * per_expert * model.config.num_layers
    assert round(count / 1e6, 1) == expected_e16, f"{name} E16: {count / 1e6:.2f}M"


def test_patch_4_and_8_presets_differ_only_in_the_patch():
    for patch in (4, 8):
        base, other = SPATIAL_TEMPORAL_MOE_PRESETS["Diff-MoE-S/2"], SPATIAL_TEMPORAL_MOE_PRESETS[f"Diff-MoE-S/{patch}"]
        assert {**base, "patch_size": patch} == other
    with pytest.raises(ValueError, match=r"Unknown SpatialTemporalMoE \(Diff-MoE, Cheng et al.\) preset"):
        SpatialTemporalMoETransformer2DModel.from_preset("DiT-XXL/2")


def test_save_load_round_trip(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    loaded = SpatialTemporalMoETransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)
    assert loaded.config.shared_expert_intermediate_size == 32


def test_output_is_batch_independent_and_routing_is_per_token():
    model = _tiny_model()
    x, t, y = _inputs()
    with torch.no_grad():
        full = model(x, t, y).sample
        alone = model(x[1:2], t[1:2], y[1:2]).sample
    assert full.shape == (3, 8, 8, 8)
    tokens = alone.shape[-2] * alone.shape[-1] // TINY["patch_size"] ** 2
    full_routing, alone_routing = token_routing(model, x, t, y), token_routing(model, x[1:2], t[1:2], y[1:2])
    for name, (ids,) in full_routing.items():
        assert torch.equal(alone_routing[name][0], ids[tokens : 2 * tokens]), name  # the same experts per token
    assert_float32_close(alone, full[1:2], model_float32_tolerance(model, full))  # summation order only
    assert model.routing_depends_on_batch is False


def test_grouped_experts_match_the_per_expert_modules():
    model = _tiny_model()
    moe = model.transformer_blocks[0].ff
    hidden, conditioning = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        grouped = moe(hidden, conditioning)
        expert_ids, weights = moe.router(hidden.reshape(-1, 32))
        channel_weights = moe.recalibration(hidden.mean(1))
        reference = moe.shared_experts(hidden, conditioning[:, None])
        for slot in range(2):
            for token in range(32):
                sample, expert = token // 16, expert_ids[token, slot]
                out = moe.experts[expert](hidden.reshape(-1, 32)[token], conditioning[sample], channel_weights[sample])
                reference.view(-1, 32)[token] += weights[token, slot] * out
    # the longest dot product is the shared expert's hidden layer; modulation, two projections, recalibration, sum
    assert_float32_close(
        grouped, reference, float32_tolerance(reference, TINY["shared_expert_intermediate_size"], depth=5)
    )


def test_aux_loss_in_training_mode_only_and_gradients_reach_experts_and_router():
    model = _tiny_model().train()
    x, t, y = _inputs()
    output = model(x, t, y)
    out, aux = output.sample, output.aux_loss
    assert aux is not None and aux.ndim == 0 and aux.item() > 0
    (out.square().mean() + aux).backward()
    for block in model.transformer_blocks:
        moe = block.ff
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert moe.recalibration[0].weight.grad.abs().sum() > 0
        assert moe.shared_experts.modulation.linear_1.weight.grad.abs().sum() > 0
        assert any(
            e.gate_proj.weight.grad is not None and e.gate_proj.weight.grad.abs().sum() > 0 for e in moe.experts
        )
        assert any(e.modulation.linear_2.weight.grad is not None for e in moe.experts)
    model.eval()
    with torch.no_grad():
        assert model(x, t, y).aux_loss is None


def test_head_dim_must_allow_2d_rope():
    with pytest.raises(ValueError, match="divisible by 4"):
        SpatialTemporalMoETransformer2DModel(**{**TINY, "num_attention_heads": 8, "attention_head_dim": 6})


def _checkpoint(model, args=None):
    layout = "training-dict" if args is not None else "bare-state-dict"
    return LoadedCheckpoint(_original_state_dict(model), "ema" if args else "state_dict", layout, args)


def test_converter_round_trip_with_constructor_kwargs(tmp_path):
    model = _tiny_model(shared_expert_intermediate_size=0)
    config = tmp_path / "kwargs.yaml"
    config.write_text(
        "input_size: 8\nhidden_size: 32\ndepth: 2\nnum_heads: 4\nmlp_ratio: 0.75\nnum_classes: 10\n"
        "num_experts: 4\nnum_experts_per_tok: 2\nn_shared_experts: null\n"
    )
    converted = build_spatial_temporal_moe_transformer(_checkpoint(model), config_path=str(config))
    assert (
        converted.config.formulation == "ddpm-learned-sigma" and converted.config.shared_expert_intermediate_size == 0
    )
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)


def test_converter_cross_checks_the_args_preset():
    model = _tiny_model()
    with pytest.raises(CheckpointError, match=r"hidden_size=384 \(from args.model='DiT-S/2'\)"):
        build_spatial_temporal_moe_transformer(_checkpoint(model, _original_args()))
    with pytest.raises(CheckpointError, match="attention heads"):  # args without a preset name
        build_spatial_temporal_moe_transformer(_checkpoint(model, _original_args(model=None)))


def test_bare_state_dict_needs_heads_and_experts_per_token():
    model = _tiny_model()
    with pytest.raises(CheckpointError, match="attention heads"):
        build_spatial_temporal_moe_transformer(_checkpoint(model))
    with pytest.raises(CheckpointError, match="hidden_size=384 .* but the weights have 32"):
        build_spatial_temporal_moe_transformer(_checkpoint(model), preset="DiT-S/2", experts_per_token=2)


def test_converter_errors_on_contradicting_settings(tmp_path):
    model = _tiny_model()
    config = tmp_path / "kwargs.json"
    config.write_text('{"hidden_size": 32, "depth": 2, "num_heads": 3, "mlp_ratio": 0.75, "n_shared_experts": 1}')
    with pytest.raises(CheckpointError, match="num_heads=3 .* does not fit hidden size 32"):
        build_spatial_temporal_moe_transformer(_checkpoint(model), config_path=str(config))
    config.write_text('{"hidden_size": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 0.75, "n_shared_experts": 1}')
    with pytest.raises(CheckpointError, match="num_experts=8 .* but the weights have 4"):
        build_spatial_temporal_moe_transformer(_checkpoint(model), config_path=str(config), num_experts=8)
    with pytest.raises(CheckpointError, match="experts_per_token=5 must be between 1 and 4"):
        build_spatial_temporal_moe_transformer(_checkpoint(model), config_path=str(config), experts_per_token=5)
    with pytest.raises(CheckpointError, match="n_shared_experts=2"):
        config.write_text('{"hidden_size": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 0.75}')  # default: 2 shared
        build_spatial_temporal_moe_transformer(_checkpoint(model), config_path=str(config))


def test_converter_rejects_a_sincos_pos_embed(tmp_path):
    model = _tiny_model()
    checkpoint = _checkpoint(model)
    checkpoint.state_dict["pos_embed"] += 0.5
    config = tmp_path / "kwargs.json"
    config.write_text('{"num_heads": 4, "mlp_ratio": 0.75, "n_shared_experts": 1}')
    with pytest.raises(CheckpointError, match="pos_embed is not zero"):
        build_spatial_temporal_moe_transformer(checkpoint, config_path=str(config))


def test_convert_checkpoint_writes_the_formulation_scheduler(tmp_path):
    model = _tiny_model()
    path = tmp_path / "train.pt"
    torch.save(
        {
            "model": _original_state_dict(model),
            "ema": _original_state_dict(model),
            "opt": {},
            "args": _original_args(model="DiT-S/2", rf=True),
        },
        path,
    )
    config = tmp_path / "kwargs.json"
    config.write_text('{"hidden_size": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 0.75, "n_shared_experts": 1}')
    with pytest.raises(ValueError, match="does not take num_experts"):
        convert_checkpoint("dsmoe", str(path), str(tmp_path / "x"), num_experts=4)
    folder = convert_checkpoint("diff-moe", str(path), str(tmp_path / "rf"), config_path=str(config))
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    assert pipe.transformer.config.formulation == "rf-noise-at-1"  # from args.rf
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    folder = convert_checkpoint(
        "diff-moe", str(path), str(tmp_path / "ddpm"), config_path=str(config), formulation="ddpm", experts_per_token=1
    )
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    assert pipe.transformer.config.formulation == "ddpm-learned-sigma"
    assert pipe.transformer.config.num_experts_per_tok == 1
    assert pipe.scheduler.config.variance_type == "learned_range"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3], num_inference_steps=3, output_type="latent", guidance_channels=3).images
    assert images.shape == (1, 4, 8, 8) and torch.isfinite(images).all()


def test_rope_2d_alternating_matches_the_complex_rotation():
    """Pair m = (2m, 2m+1) as a complex number, rotated by col * f_(m/2) (m even) or row * f_((m-1)/2) (m odd)."""
    head_dim, grid_h, grid_w = 16, 3, 5
    x = torch.randn(2, grid_h * grid_w, 3, head_dim)
    rotated = apply_rotary(x, rotary_tables("rope_2d_alternating", head_dim, grid_h, grid_w))
    freqs = 10000.0 ** (-4 * torch.arange(head_dim // 4) / head_dim)
    token = torch.arange(grid_h * grid_w)
    col, row = token % grid_w, token // grid_w
    angles = torch.stack([col[:, None] * freqs, row[:, None] * freqs], dim=-1).flatten(1)  # (N, hd/2)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    assert_float32_close(rotated, expected, float32_tolerance(expected, 2))  # a 2x2 rotation per pair


def test_lora_on_experts_uses_the_per_expert_path():
    from peft import LoraConfig

    model = _tiny_model()
    x, t, y = _inputs()
    with torch.no_grad():
        base = model(x, t, y).sample
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v", "gate_proj", "up_proj", "down_proj"]))
    assert model.transformer_blocks[0].ff.experts.backend(torch.zeros(1, 1)) == "modules"
    with torch.no_grad():
        assert_float32_close(model(x, t, y).sample, base, model_float32_tolerance(model, base))
