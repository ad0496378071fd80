"""The `ddpm-learned-sigma` and `rf-noise-at-1` formulations: upstream DiT/ADM timestep grids, exact DDIM respacing,
learned-variance routing of the model output, the pipeline's 3-channel guidance option, and the short names ddpm / rf
of the families trained either way."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel, get_formulation
from diffmoe_hf.formulations import ddim_respacing, evenly_spaced_respacing, resolve_formulation, rf_flag_formulation

from .helpers import assert_float32_close, float32_tolerance, model_float32_tolerance, randomize_weights


DDPM = get_formulation("ddpm-learned-sigma")
RF = get_formulation("rf-noise-at-1")

# upstream `create_diffusion("ddimN")` / `create_diffusion("N")` model timesteps, in sampling order
UPSTREAM_DDIM = {
    4: [750, 500, 250, 0],
    5: [800, 600, 400, 200, 0],
    6: [835, 668, 501, 334, 167, 0],
    8: [875, 750, 625, 500, 375, 250, 125, 0],
    16: [945 - 63 * i for i in range(16)],
}
UPSTREAM_ANCESTRAL = {4: [999, 666, 333, 0], 8: [999, 856, 714, 571, 428, 285, 143, 0]}


def _model_times(formulation, scheduler, steps):
    plan = formulation.sampling_plan(scheduler, steps, "cpu")
    return plan.scheduler, plan.model_times.tolist()


@pytest.mark.parametrize("steps", sorted(UPSTREAM_DDIM))
def test_ddim_model_timesteps_match_upstream_ddimN(steps):
    scheduler = DDIMScheduler.from_config(DDPM.default_scheduler().config)
    _, times = _model_times(DDPM, scheduler, steps)
    assert times == UPSTREAM_DDIM[steps]
    assert scheduler.num_inference_steps is None  # the pipeline's scheduler is left untouched


def test_ddim_respacing_without_a_stride_is_an_error():
    assert ddim_respacing(1000, 25) == list(range(0, 1000, 40))
    with pytest.raises(ValueError, match="no stride"):
        ddim_respacing(1000, 999)


def _upstream_ddim(eps_fn, x, kept):
    """The original DDIM loop (eta 0) on the respaced chain, in float64 as upstream computes alpha-bar."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)[kept]
    x = x.double()
    for k in reversed(range(len(kept))):
        abar = alphas_cumprod[k]
        abar_prev = alphas_cumprod[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = eps_fn(x.float(), kept[k]).double()
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    return x.float()


def _eps_fn(x, t):
    return torch.tanh(x * 0.7 + t / 500.0)


@pytest.mark.parametrize("steps", [6, 7, 8])
def test_ddim_loop_matches_upstream_for_any_step_count(steps):
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = _upstream_ddim(_eps_fn, x, ddim_respacing(1000, steps))
    plan = DDPM.sampling_plan(DDIMScheduler.from_config(DDPM.default_scheduler().config), steps, "cpu")
    scheduler = plan.scheduler
    sample = x.clone()
    for t, model_time in zip(plan.timesteps, plan.model_times):
        prediction = torch.cat([_eps_fn(sample, model_time.item()), torch.zeros_like(sample)], dim=1)
        step_input = DDPM.scheduler_output(prediction, sample, model_time, scheduler)
        assert step_input.shape == sample.shape  # DDIM gets eps only
        sample = scheduler.step(step_input, t, sample, eta=0.0).prev_sample
    # diffusers' alphas_cumprod is a float32 product over the 1000 betas; every step reuses it
    assert_float32_close(sample, expected, float32_tolerance(expected, 1000, depth=steps))


@pytest.mark.parametrize("steps", sorted(UPSTREAM_ANCESTRAL))
def test_ddpm_ancestral_grid_matches_upstream(steps):
    scheduler, times = _model_times(DDPM, DDPM.default_scheduler(), steps)
    assert times == UPSTREAM_ANCESTRAL[steps]
    prediction = torch.randn(1, 8, 2, 2)
    assert DDPM.scheduler_output(prediction, prediction[:, :4], None, scheduler).shape[1] == 8  # learned variance


def test_ddpm_ancestral_default_250_steps():
    kept = evenly_spaced_respacing(1000, 250)
    assert kept[:3] == [0, 4, 8] and kept[-3:] == [991, 995, 999]
    _, times = _model_times(DDPM, DDPM.default_scheduler(), 250)
    assert times == kept[::-1]


def test_dpm_solver_from_the_ddpm_config_runs_on_eps():
    scheduler = DPMSolverMultistepScheduler.from_config(DDPM.default_scheduler().config)
    plan = DDPM.sampling_plan(scheduler, 10, "cpu")
    sampling = plan.scheduler
    assert sampling.config.variance_type is None  # diffusers would keep only 3 channels of a learned variance
    sample = torch.randn(1, 4, 4, 4)
    for t, model_time in zip(plan.timesteps, plan.model_times):
        prediction = torch.cat([_eps_fn(sample, model_time.item()), torch.zeros_like(sample)], 1)
        sample = sampling.step(DDPM.scheduler_output(prediction, sample, None, sampling), t, sample).prev_sample
    assert sample.shape == (1, 4, 4, 4) and torch.isfinite(sample).all()


def test_rf_noise_at_one_reproduces_the_upstream_euler_sampler():
    steps = 6
    scheduler, times = _model_times(RF, RF.default_scheduler(), steps)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    torch.testing.assert_close(torch.tensor(times), torch.tensor([i / steps for i in range(steps, 0, -1)]))

    def velocity(x, t):
        return torch.sin(x + t)

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = x.clone()
    for i in range(steps, 0, -1):
        expected = expected - velocity(expected, i / steps) / steps
    sample = x.clone()
    for t, model_time in zip(scheduler.timesteps, torch.tensor(times)):
        prediction = torch.cat([velocity(sample, model_time), torch.zeros_like(sample)], dim=1)
        sample = scheduler.step(RF.scheduler_output(prediction, sample, model_time, scheduler), t, sample).prev_sample
    assert_float32_close(sample, expected, float32_tolerance(expected, 2, depth=steps))  # x - v * dt per step


def _tiny_ddpm_pipeline():
    transformer = randomize_weights(
        DSMoETransformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_classes=3,
            num_experts=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            formulation="ddpm-learned-sigma",
        )
    ).eval()
    pipe = ClassConditionalMoEPipeline(transformer=transformer, scheduler=DDPM.default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_channels_option_guides_only_the_first_channels():
    pipe = _tiny_ddpm_pipeline()
    latents = torch.randn(2, 4, 4, 4)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        cond = pipe.transformer(latents, torch.tensor([500.0] * 2), labels).sample
        uncond = pipe.transformer(latents, torch.tensor([500.0] * 2), torch.tensor([3, 3])).sample
        all_channels = pipe._predict(latents, torch.tensor(500.0), labels, 4.0, None)
        three = pipe._predict(latents, torch.tensor(500.0), labels, 4.0, None, guidance_channels=3)
    guided = uncond + 4.0 * (cond - uncond)
    # the pipeline runs both passes as one batch: summation order only, times up to 1 + 2 * 4 through the guidance
    tolerance = 9 * model_float32_tolerance(pipe.transformer, guided)
    assert_float32_close(all_channels[:, :4], guided[:, :4], tolerance)
    assert_float32_close(three[:, :3], guided[:, :3], tolerance)
    assert_float32_close(three[:, 3:], cond[:, 3:], tolerance)
    with pytest.raises(ValueError, match="guidance_channels"):
        pipe(class_labels=[0], num_inference_steps=2, output_type="latent", guidance_channels=5)


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_pipeline_runs_ddpm_formulation_with_standard_schedulers(scheduler_cls):
    pipe = _tiny_ddpm_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = pipe(
        class_labels=[0, 1],
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        guidance_channels=3,
    ).images
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_short_names_resolve_and_other_formulations_are_refused():
    either = ("ddpm-learned-sigma", "rf-noise-at-1")
    assert [resolve_formulation(name, either) for name in ("ddpm", "rf", *either)] == [*either, *either]
    assert [rf_flag_formulation(rf) for rf in (False, True)] == list(either)
    assert resolve_formulation("jit-xpred") == "jit-xpred"
    with pytest.raises(ValueError, match=r"'rf-noise-at-0' is not one of ddpm-learned-sigma, rf-noise-at-1 \(or"):
        resolve_formulation("rf-noise-at-0", either)
    with pytest.raises(ValueError, match="'flow' is not one of"):
        resolve_formulation("flow")
