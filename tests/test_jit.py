"""JiT / JiTMoE: model, presets, the jit-xpred formulation, the pipeline in pixel space and the converter."""

import argparse
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffmoe_hf import ClassConditionalMoEPipeline, JiTTransformer2DModel, get_formulation
from diffmoe_hf.conversion import CheckpointError, LoadedCheckpoint, convert_checkpoint
from diffmoe_hf.conversion.convert_jit import build_jit_transformer, jit_config_from_kwargs
from diffmoe_hf.families import get_family
from diffmoe_hf.models.transformer_jit import JIT_PRESETS

from .conftest import parity_root
from .helpers import assert_float32_close, model_float32_tolerance, randomize_weights


TINY = get_family("jit").tiny_config("jitmoe")

# total / activated parameters in Mi (2**20), trainable parameters of the original classes
PRESET_PARAMS_MI = {
    "JiT-B/16": (125.0, 125.0),
    "JiT-B/32": (127.0, 127.0),
    "JiTMoE-B/16-E16": (369.5, 133.0),
    "JiT-L/16": (437.6, 437.6),
    "JiT-L/32": (440.2, 440.2),
    "JiTMoE-L/16-E16": (1306.5, 465.8),
    "JiT-H/16": (908.4, 908.4),
    "JiTMoE-H/16-E16": (2407.2, 936.2),
    "JiT-H/32": (911.8, 911.8),
}


def tiny_model(**overrides) -> JiTTransformer2DModel:
    return randomize_weights(JiTTransformer2DModel(**{**TINY, **overrides})).eval()


def tiny_inputs(batch=2):
    return torch.randn(batch, 3, 16, 16), torch.tensor([0.2, 0.7])[:batch], torch.tensor([1, 10])[:batch]


@pytest.mark.parametrize("name", sorted(JIT_PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = JiTTransformer2DModel.from_preset(name)
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    inactive = 0
    if config.moe_layers:
        expert = sum(p.numel() for p in model.transformer_blocks[config.moe_layers[0]].ff.experts[0].parameters())
        inactive = len(config.moe_layers) * (config.num_experts - config.num_experts_per_tok) * expert
    assert (round(total / 2**20, 1), round((total - inactive) / 2**20, 1)) == PRESET_PARAMS_MI[name]


def test_preset_aliases_and_unknown_preset():
    with torch.device("meta"):
        model = JiTTransformer2DModel.from_preset("JiT-B/16-E16")  # the name args.model records
    assert model.config.num_layers == 10 and model.config.moe_layers == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match=r"Unknown JiT / JiTMoE \(Li & He 2025; Liu et al. 2025\) preset 'JiT-XL/2'"):
        JiTTransformer2DModel.from_preset("JiT-XL/2")


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        expected = model(x, t, y).sample
    model.save_pretrained(tmp_path)
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, expected, rtol=0, atol=0)


def test_dense_model_and_invalid_configs():
    dense = tiny_model(moe_layers="none")
    assert not any(hasattr(block.ff, "router") for block in dense.transformer_blocks)
    assert dense.transformer_blocks[0].ff.gate_proj.out_features == int(int(16 * 1.0) * 2 / 3)
    with pytest.raises(ValueError, match="in_context_start"):
        JiTTransformer2DModel(**{**TINY, "in_context_start": 4})
    with pytest.raises(ValueError, match="divisible by 4"):
        JiTTransformer2DModel(**{**TINY, "attention_head_dim": 6})
    with pytest.raises(ValueError, match="16x16"):
        dense(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), torch.tensor([0]))


def test_label_dropout_only_in_training_mode():
    model = tiny_model(class_dropout_prob=1.0)
    x, t, y = tiny_inputs()
    null = torch.full_like(y, model.config.num_classes)
    with torch.no_grad():
        unconditional = model(x, t, null).sample
        tolerance = model_float32_tolerance(model, unconditional)
        assert (model(x, t, y).sample - unconditional).abs().max() > tolerance
        model.train()
        assert_float32_close(model(x, t, y).sample, unconditional, tolerance)


def test_gradients_reach_every_kind_of_parameter_with_and_without_checkpointing():
    model = tiny_model(class_dropout_prob=0.0).train()
    x, t, y = tiny_inputs()
    model(x, t, y).sample.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for name in (
        "in_context_pos_embed",
        "transformer_blocks.1.ff.router.weight",
        "pos_embed.patch_proj.weight",
        "transformer_blocks.1.ff.experts.0.gate_proj.bias",
        "transformer_blocks.0.attn.norm_q.weight",
    ):
        assert grads[name].abs().sum() > 0, name
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y).sample.square().mean().backward()
    batch_tokens = x.shape[0] * (x.shape[-2] * x.shape[-1] // model.config.patch_size**2 + TINY["in_context_len"])
    for name, grad in grads.items():
        tolerance = model_float32_tolerance(model, grad, tokens=batch_tokens, calls=2)
        assert_float32_close(dict(model.named_parameters())[name].grad, grad, tolerance, msg=name)


def test_guidance_interval_boundaries():
    formulation = get_formulation("jit-xpred")
    below, at, above = torch.tensor([0.1], dtype=torch.float32).nextafter(torch.tensor(0.0)), 0.1, 0.10000002
    times = torch.tensor([0.0, below.item(), at, above, 0.5, 1.0], dtype=torch.float32)
    scales = formulation.guidance_scale_at(2.9, times, (0.1, 1.0))
    torch.testing.assert_close(scales, torch.tensor([1.0, 1.0, 1.0, 2.9, 2.9, 1.0]))
    # low == 0 includes t = 0; no interval guides everywhere
    assert formulation.guidance_scale_at(2.9, torch.tensor(0.0), (0.0, 1.0)).item() == pytest.approx(2.9)
    assert formulation.guidance_scale_at(2.9, torch.tensor(1.0), None).item() == pytest.approx(2.9)
    # the other formulations keep guiding at every step by default
    assert get_formulation("rf-noise-at-0").default_guidance_interval is None


@pytest.mark.parametrize("scheduler_cls", [FlowMatchHeunDiscreteScheduler, FlowMatchEulerDiscreteScheduler])
def test_model_time_is_the_float32_grid(scheduler_cls):
    """With 50 steps the original grid has t_5 = 0.099999994, which is not > 0.1 (unguided); 1 - sigma_5 would be."""
    formulation = get_formulation("jit-xpred")
    plan = formulation.sampling_plan(scheduler_cls(), 50, "cpu", (0.1, 1.0))
    scheduler = plan.scheduler
    grid = torch.linspace(0.0, 1.0, 51)
    times = plan.model_times
    expected = grid[:50] if scheduler_cls is FlowMatchEulerDiscreteScheduler else grid[torch.arange(99).add(1) // 2]
    assert torch.equal(times, expected)
    assert times.dtype == torch.float32
    assert formulation.guidance_scale_at(2.9, grid[5], (0.1, 1.0)).item() == 1.0
    # guided from t_6 = 0.12 on: t_5 = 0.099999994 is outside (0.1, 1.0)
    grid_index = range(50) if scheduler_cls is FlowMatchEulerDiscreteScheduler else [(k + 1) // 2 for k in range(99)]
    assert plan.guided == tuple(index >= 6 for index in grid_index)
    # the scheduler's sigma grid is 1 - i/N (Heun: repeated for the corrector), ending at 0
    sigmas = scheduler.sigmas.unique_consecutive()
    torch.testing.assert_close(sigmas, 1 - torch.linspace(0, 1, 51), rtol=0, atol=1e-6)


def test_heun_scheduler_keeps_its_settings():
    formulation = get_formulation("jit-xpred")
    scheduler = formulation.default_scheduler()
    sigma_min = scheduler.sigma_min
    plan = formulation.sampling_plan(scheduler, 7, "cpu")
    assert scheduler.sigma_min == sigma_min
    assert torch.equal(scheduler.timesteps, formulation.default_scheduler().timesteps)  # its timesteps never set
    assert plan.scheduler is not scheduler and len(plan.timesteps) == 2 * 7 - 1


def test_formulation_parameters_come_from_the_model_config():
    formulation = get_formulation("jit-xpred").for_model(tiny_model(t_eps=0.2, noise_scale=2.0).config)
    assert (formulation.t_eps, formulation.noise_scale) == (0.2, 2.0)
    sample, prediction = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    # (x - z) / max(1 - t, t_eps): clamped at t = 0.9, not at t = 0.5
    assert formulation.velocity(prediction, sample, torch.tensor(0.9)).max().item() == pytest.approx(5.0)
    assert formulation.velocity(prediction, sample, torch.tensor(0.5)).max().item() == pytest.approx(2.0)
    assert formulation.initial_noise(torch.ones(1)).item() == 2.0


def _pipeline(model=None):
    model = model or tiny_model()
    scheduler = get_formulation(model.config.formulation).default_scheduler()
    pipe = ClassConditionalMoEPipeline(transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_outputs_pixel_images_without_vae():
    pipe = _pipeline()
    images = pipe([1, 2], num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    pil = pipe(3, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert pil[0].size == (16, 16) and pil[0].mode == "RGB"
    np.testing.assert_array_less(-1e-6, pipe([4], num_inference_steps=1, output_type="pt").images.numpy())


def test_pipeline_guides_only_inside_the_interval():
    """Heun, 3 steps: t = 0 is outside (0.1, 1.0) -> one conditional pass; every later evaluation is guided."""
    pipe = _pipeline()
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    pipe([1, 2], num_inference_steps=3, output_type="latent")
    assert batch_sizes == [2, 4, 4, 4, 4]
    batch_sizes.clear()
    pipe([1, 2], num_inference_steps=3, output_type="latent", guidance_interval=(0.0, 1.0))
    assert batch_sizes == [4] * 5
    hook.remove()
    with pytest.raises(ValueError, match="guidance_interval"):
        pipe([1], num_inference_steps=2, guidance_interval=(0.5, 0.1))


def test_pipeline_matches_guided_velocity_euler_step():
    """One Euler step of the pipeline equals z + (t1 - t0) * guided velocity of the formulation."""
    pipe = _pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    formulation = get_formulation("jit-xpred")
    noise, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    sample = pipe(
        labels,
        num_inference_steps=1,
        latents=noise,
        guidance_scale=3.0,
        guidance_interval=(0.0, 1.0),
        output_type="latent",
    ).images
    velocity = formulation.guided_velocity(pipe.transformer, noise, torch.zeros(2), labels, 3.0, (0.0, 1.0))
    # at t = 0 the velocity is x_hat - z; guidance u + 3 (c - u) adds up to 1 + 2 * 3 model errors
    tolerance = 7 * model_float32_tolerance(pipe.transformer, velocity)
    assert_float32_close(sample, noise + velocity, tolerance)


# --- converter -------------------------------------------------------------------------------------------------


def _fixture(name):
    case = os.path.join(parity_root(), name)
    if not os.path.isdir(case):
        pytest.skip(f"fixture {name} not available")
    return case


def _bare_checkpoint(case, args=None) -> LoadedCheckpoint:
    from diffmoe_hf.conversion import load_original_checkpoint

    loaded = load_original_checkpoint(os.path.join(case, "checkpoint.pt"))
    assert loaded.source == "model_ema1"
    return LoadedCheckpoint(loaded.state_dict, "state_dict", "bare-state-dict", args)


def test_converter_reads_sampling_parameters_from_args(tmp_path):
    case = _fixture("jitmoe-p4-e4")
    folder = convert_checkpoint(
        "jit",
        os.path.join(case, "checkpoint.pt"),
        str(tmp_path / "out"),
        config_path=os.path.join(case, "config.yaml"),
    )
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, FlowMatchHeunDiscreteScheduler)
    config = pipe.transformer.config
    assert (config.t_eps, config.noise_scale, config.class_dropout_prob) == (0.05, 1.0, 0.1)
    assert config.moe_layers == [1, 3] and config.in_context_start == 2 and config.num_classes == 10


def test_converter_errors(tmp_path):
    case = _fixture("jitmoe-p4-e4")
    config_path = os.path.join(case, "config.yaml")
    with pytest.raises(CheckpointError, match="not both"):
        build_jit_transformer(_bare_checkpoint(case), config_path=config_path, preset="JiT-B/16")
    with pytest.raises(CheckpointError, match="does not record its architecture"):
        build_jit_transformer(_bare_checkpoint(case))
    with pytest.raises(CheckpointError, match="contradicts"):
        build_jit_transformer(_bare_checkpoint(case, argparse.Namespace(model="JiT-L/16")), preset="JiT-B/16")
    with pytest.raises(
        CheckpointError, match=r"Unknown JiT / JiTMoE \(Li & He 2025; Liu et al. 2025\) preset 'JiT-T/4-E4'"
    ):
        build_jit_transformer(_bare_checkpoint(case, argparse.Namespace(model="JiT-T/4-E4")))
    with pytest.raises(CheckpointError, match="pos_embed .* does not fit the configured model"):
        build_jit_transformer(_bare_checkpoint(case), preset="JiT-B/16")
    not_jit = tmp_path / "other.yaml"
    not_jit.write_text("model:\n  params: {}\n")
    with pytest.raises(CheckpointError, match="net_kwargs"):
        build_jit_transformer(_bare_checkpoint(case), config_path=str(not_jit))
    # the dense fixture's architecture does not fit the MoE checkpoint
    with pytest.raises(CheckpointError, match="does not match the model configuration"):
        build_jit_transformer(
            _bare_checkpoint(case), config_path=os.path.join(_fixture("jit-dense-p4"), "config.yaml")
        )


def test_config_from_kwargs_follows_the_upstream_moe_flags():
    moe = dict(
        num_experts=4,
        hidden_size=32,
        moe_intermediate_size=8,
        n_group=2,
        topk_group=2,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        use_shared_expert=False,
        proj_drop=0.0,
    )
    base = dict(depth=5, hidden_size=32, num_heads=4, input_size=16, patch_size=4, in_context_start=1)
    assert jit_config_from_kwargs({**base, "moe_config": {**moe, "interleave": True}})["moe_layers"] == [1, 3]
    config = jit_config_from_kwargs({**base, "moe_config": {**moe, "interleave": True}})
    assert config["shared_expert_intermediate_size"] == 0
    assert jit_config_from_kwargs({**base, "moe_config": {**moe, "interleave": False}})["moe_layers"] == []
    with pytest.raises(CheckpointError, match="Unknown JiT constructor arguments"):
        jit_config_from_kwargs({**base, "rope_type": "2d"})
