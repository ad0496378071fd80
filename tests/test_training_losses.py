"""Training objectives against the formulas of the original code (the training losses of DSMoE, DiffMoE and JiT, and
the DDPM / rectified-flow losses of DiT-MoE and Diff-MoE)."""

import math

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch.distributions import Normal, kl_divergence

from diffmoe_hf.formulations import TimeSampling, get_formulation
from diffmoe_hf.training_losses import diffusion_training_loss


class Recorder(torch.nn.Module):
    """A stand-in transformer: output = scale * x_t (+ a learned variance half), remembering its inputs."""

    def __init__(self, channels=2, learned_sigma=False):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))
        self.variance = torch.nn.Parameter(torch.tensor(0.3)) if learned_sigma else None

    def forward(self, x, t, y):
        self.inputs = (x, t, y)
        out = self.scale * x
        if self.variance is not None:
            out = torch.cat([out, torch.tanh(self.variance * x)], dim=1)
        return Transformer2DModelOutput(sample=out)


def _batch(batch=4, channels=2, size=3):
    torch.manual_seed(1)
    return torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size), torch.arange(batch)


def test_rectified_flow_noise_at_zero():
    x0, noise, y = _batch()
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    model = Recorder()
    result = diffusion_training_loss(get_formulation("rf-noise-at-0"), model, x0, y, noise=noise, timesteps=t)
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x0 + (1 - tt) * noise
    torch.testing.assert_close(model.inputs[0], xt)
    torch.testing.assert_close(result.loss, ((0.7 * xt - (x0 - noise)) ** 2).mean())


def test_rectified_flow_noise_at_one_drops_the_sigma_half():
    x0, noise, y = _batch()
    t = torch.tensor([0.1, 0.3, 0.6, 1.0])
    model = Recorder(learned_sigma=True)
    result = diffusion_training_loss(get_formulation("rf-noise-at-1"), model, x0, y, noise=noise, timesteps=t)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    torch.testing.assert_close(result.loss, ((0.7 * xt - (noise - x0)) ** 2).mean())
    result.loss.backward()
    assert model.variance.grad is None or not model.variance.grad.any()


def test_jit_velocity_loss_with_noise_scale():
    formulation = get_formulation("jit-xpred").for_model({"t_eps": 0.05, "noise_scale": 2.0})
    x0, noise, y = _batch()
    t = torch.tensor([0.0, 0.5, 0.97, 0.99])
    model = Recorder()
    result = diffusion_training_loss(formulation, model, x0, y, noise=noise, timesteps=t)
    tt = t.view(-1, 1, 1, 1)
    z = tt * x0 + (1 - tt) * 2.0 * noise
    torch.testing.assert_close(model.inputs[0], z)
    denominator = (1 - tt).clamp_min(0.05)
    v, v_hat = (x0 - z) / denominator, (0.7 * z - z) / denominator
    torch.testing.assert_close(result.loss, ((v - v_hat) ** 2).mean())


def test_ddpm_eps_mse_plus_vb_with_detached_mean():
    formulation = get_formulation("ddpm-learned-sigma")
    scheduler = formulation.default_scheduler()
    x0, noise, y = _batch()
    x0 = x0.clamp(-1, 1)
    t = torch.tensor([0, 1, 500, 999])
    model = Recorder(learned_sigma=True)
    result = diffusion_training_loss(formulation, model, x0, y, scheduler=scheduler, noise=noise, timesteps=t)

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    a, ap, b = abar[t].view(-1, 1, 1, 1), abar_prev[t].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(model.inputs[0], xt.float())
    out = model(xt.float(), t, y).sample.double()
    eps, v = out[:, :2], out[:, 2:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    # true posterior q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t) with learned-range variance
    post_var = b * (1 - ap) / (1 - a)
    post_var_clipped = torch.where(t.view(-1, 1, 1, 1) == 0, (betas[1] * (1 - abar[0]) / (1 - abar[1])), post_var)
    true_mean = (b * ap.sqrt() * x0 + (1 - ap) * (1 - b).sqrt() * xt) / (1 - a)
    x0_hat = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    model_mean = (b * ap.sqrt() * x0_hat + (1 - ap) * (1 - b).sqrt() * xt) / (1 - a)
    frac = (v + 1) / 2
    model_logvar = frac * b.log() + (1 - frac) * post_var_clipped.log()
    kl = kl_divergence(Normal(true_mean, post_var_clipped.sqrt()), Normal(model_mean, (0.5 * model_logvar).exp()))
    kl_bits = kl.mean(dim=(1, 2, 3)) / math.log(2)
    # t = 0: negative log-likelihood of x0 in its 1/127.5-wide bin (edge bins open), exact normal CDF
    decoder = Normal(model_mean[:1], (0.5 * model_logvar[:1]).exp())
    upper = torch.where(x0[:1] > 0.999, torch.ones_like(x0[:1]), decoder.cdf(x0[:1].double() + 1 / 255))
    lower = torch.where(x0[:1] < -0.999, torch.zeros_like(x0[:1]), decoder.cdf(x0[:1].double() - 1 / 255))
    decoder_bits = -(upper - lower).clamp_min(1e-12).log().mean() / math.log(2)
    vb = torch.cat([decoder_bits.view(1), kl_bits[1:]])
    # not a float tolerance: the loss uses the original's tanh approximation of the normal CDF in the decoder term
    # (absolute error up to about 2e-4 in the CDF), the reference the exact CDF
    torch.testing.assert_close(result.vb, vb.mean().float(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(result.mse, mse.mean().float())
    torch.testing.assert_close(result.loss, result.mse + result.vb)

    # the VB term trains only the variance half: the eps half gets gradient from the MSE alone
    model.zero_grad()
    result.loss.backward()
    grad_with_vb = model.scale.grad.clone()
    model.zero_grad()
    model(xt.float(), t, y)
    mse_only = ((noise.float() - model.scale * xt.float()) ** 2).mean(dim=(1, 2, 3)).mean()
    mse_only.backward()
    torch.testing.assert_close(grad_with_vb, model.scale.grad)


def test_ddpm_without_learned_sigma_is_plain_eps_mse():
    formulation = get_formulation("ddpm-learned-sigma")
    x0, noise, y = _batch()
    result = diffusion_training_loss(formulation, Recorder(), x0, y, noise=noise, timesteps=torch.tensor([5, 6, 7, 8]))
    assert result.vb is None and torch.equal(result.loss, result.mse)


@pytest.mark.parametrize(
    ("name", "sampling", "mean", "std"),
    [
        ("rf-noise-at-1", None, 0.0, 1.0),
        ("jit-xpred", None, -0.8, 0.8),
        ("rf-noise-at-0", TimeSampling("logit_normal", 0.5, 0.5), 0.5, 0.5),
    ],
)
def test_logit_normal_time_sampling(name, sampling, mean, std):
    generator = torch.Generator().manual_seed(0)
    t = get_formulation(name).training_times(20000, torch.device("cpu"), sampling, generator=generator)
    logits = torch.logit(t.double())
    assert abs(float(logits.mean()) - mean) < 0.03 and abs(float(logits.std()) - std) < 0.03


def test_uniform_time_sampling_is_the_rf_noise_at_zero_default():
    generator = torch.Generator().manual_seed(0)
    t = get_formulation("rf-noise-at-0").training_times(20000, torch.device("cpu"), generator=generator)
    assert 0 <= float(t.min()) and float(t.max()) < 1 and abs(float(t.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="uniform"):
        get_formulation("rf-noise-at-0").training_times(2, torch.device("cpu"), TimeSampling("cosine"))
