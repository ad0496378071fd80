"""Training objectives of the diffusion formulations (`diffmoe_hf.formulations`), as the original repositories train.

| formulation | time (default) | noisy input z | loss |
|---|---|---|---|
| `rf-noise-at-0` (DSMoE, DiffMoE of Shi et al.) | t ~ U[0, 1) | `t x + (1 - t) eps` | MSE(out[:C], x-eps) |
| `rf-noise-at-1` (DiT-MoE, Diff-MoE of Cheng et al.) | t = sigmoid(N(0, 1)) | `(1 - t) x + t eps` | MSE(out[:C], eps-x) |
| `jit-xpred` (JiT) | t = sigmoid(N(-0.8, 0.8)) | `t x + (1 - t) s eps` | MSE of `v = (x - z) / max(1 - t, t_eps)` |
| `ddpm-learned-sigma` (DiT-MoE, Diff-MoE of Cheng et al.) | t ~ U{0..999} | `sqrt(abar) x + sqrt(1 - abar) eps` | MSE(eps) + VB |

The VB term is the ADM/DiT one: with the output's second half v the learned-range log variance
`frac * log beta_t + (1 - frac) * log beta~_t` (frac = (v + 1) / 2), the KL in bits between the true posterior
q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), whose mean is computed from the *detached* eps prediction (so
the VB term trains only the variance); at t = 0 the discretised Gaussian decoder NLL instead. Losses are means over
all non-batch dimensions, then over the batch (each term as upstream).

The model's MoE terms (load-balancing and capacity-predictor losses) are not part of these objectives; add the
`aux_loss` of the model's output (the transformer passed as `denoiser` returns it in training mode).
"""

import math
from dataclasses import dataclass

import torch

from diffmoe_hf.formulations import Formulation, JiTXPrediction


@dataclass
class TimeSampling:
    """
    How flow-matching formulations draw the training time t in (0, 1) (t in the formulation's own convention).

    Args:
        scheme: `"uniform"` (t ~ U[0, 1)), `"logit_normal"` (t = sigmoid(N(logit_mean, logit_std))) or `None` for the
            formulation's upstream default.
        logit_mean, logit_std: Parameters of the logit-normal scheme; `None` uses the formulation's default (0, 1;
            JiT: -0.8, 0.8).
    """

    scheme: str | None = None
    logit_mean: float | None = None
    logit_std: float | None = None


UPSTREAM_TIME_SAMPLING = {
    "rf-noise-at-0": TimeSampling("uniform"),
    "rf-noise-at-1": TimeSampling("logit_normal", 0.0, 1.0),
    "jit-xpred": TimeSampling("logit_normal", -0.8, 0.8),
}


def sample_flow_time(
    formulation: Formulation,
    batch_size: int,
    device: torch.device,
    sampling: TimeSampling | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch_size,) float32 training times t in [0, 1) of a flow formulation (see `TimeSampling`)."""
    default = UPSTREAM_TIME_SAMPLING[formulation.name]
    sampling = sampling or TimeSampling()
    scheme = sampling.scheme or default.scheme
    if scheme == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if scheme == "logit_normal":
        mean = default.logit_mean if sampling.logit_mean is None else sampling.logit_mean
        std = default.logit_std if sampling.logit_std is None else sampling.logit_std
        normal = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(normal * (std if std is not None else 1.0) + (mean or 0.0))
    raise ValueError(f"Unknown time sampling scheme {scheme!r}; use 'uniform' or 'logit_normal'.")


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _mean_flat(values: torch.Tensor) -> torch.Tensor:
    return values.float().mean(dim=list(range(1, values.ndim)))


class DDPMDiffusion:
    """
    The ADM/DiT Gaussian diffusion quantities in float64 (gathered per sample as float32), from a diffusers
    `DDPMScheduler`'s betas (linear 1e-4..0.02 over 1000 steps in the converted folders).
    """

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        self.num_timesteps = betas.shape[0]
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        # log of the posterior variance, its first (zero) entry replaced by the second
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * previous.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler) -> "DDPMDiffusion":
        config = scheduler.config
        if getattr(config, "beta_schedule", None) == "linear" and getattr(config, "trained_betas", None) is None:
            # the float64 grid of the original code (the scheduler keeps float32 betas)
            betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
            return cls(betas)
        return cls(scheduler.betas)

    def _gather(self, values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _broadcast(values.to(timesteps.device)[timesteps].float(), like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) sample: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`."""
        return (
            self._gather(self.alphas_cumprod.sqrt(), timesteps, x0) * x0
            + self._gather((1.0 - self.alphas_cumprod).sqrt(), timesteps, x0) * noise
        )

    def vb_term(
        self, eps: torch.Tensor, variance: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """
        (B,) variational bound term in bits for the predicted `eps` (used as given; detach it to train only the
        variance, as upstream) and learned-range `variance` values v in [-1, 1].
        """
        sqrt_recip = self._gather((1.0 / self.alphas_cumprod).sqrt(), timesteps, xt)
        sqrt_recipm1 = self._gather((1.0 / self.alphas_cumprod - 1.0).sqrt(), timesteps, xt)
        coef1 = self._gather(self.posterior_mean_coef1, timesteps, xt)
        coef2 = self._gather(self.posterior_mean_coef2, timesteps, xt)
        true_mean = coef1 * x0 + coef2 * xt
        true_log_variance = self._gather(self.posterior_log_variance_clipped, timesteps, xt)

        min_log = true_log_variance
        max_log = self._gather(self.betas.log(), timesteps, xt)
        frac = (variance.float() + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        x0_prediction = sqrt_recip * xt - sqrt_recipm1 * eps.float()
        model_mean = coef1 * x0_prediction + coef2 * xt

        kl = _mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        decoder_nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(timesteps == 0, decoder_nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of `x` in [-1, 1] under a Gaussian discretised to 256 bins (ADM decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class DiffusionLoss:
    """The objective of one training batch: `loss` (scalar, what to back-propagate) and its parts (scalars)."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor | None = None


def diffusion_training_loss(
    formulation: Formulation,
    transformer,
    x0: torch.Tensor,
    class_labels: torch.Tensor,
    scheduler=None,
    time_sampling: TimeSampling | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> DiffusionLoss:
    """
    The formulation's training loss for one batch (see the module table).

    Args:
        formulation: The transformer's formulation (`get_formulation(config.formulation).for_model(config)`).
        transformer: Called as `transformer(x_t, model_time, class_labels)`; its output has C or 2C channels.
        x0: (B, C, H, W) clean data: scaled VAE latents, or pixels in [-1, 1] for pixel-space models.
        class_labels: (B,) class ids (label dropout for guidance happens inside the model in training mode).
        scheduler: The DDPM scheduler whose betas define `ddpm-learned-sigma` (default: the formulation's).
        time_sampling: Flow time sampling (default: the formulation's upstream one).
        noise: (B, C, H, W) standard Gaussian noise (drawn if not given).
        timesteps: (B,) model times to use instead of sampling them (DDPM indices or flow times).
    """
    channels = x0.shape[1]
    noise = torch.randn_like(x0) if noise is None else noise
    if formulation.name == "ddpm-learned-sigma":
        diffusion = DDPMDiffusion.from_scheduler(scheduler or formulation.default_scheduler())
        if timesteps is None:
            timesteps = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        xt = diffusion.add_noise(x0, noise, timesteps)
        output = transformer(xt, timesteps, class_labels).sample.float()
        eps = output[:, :channels]
        mse = _mean_flat((noise - eps) ** 2)
        if output.shape[1] < 2 * channels:
            return DiffusionLoss(loss=mse.mean(), mse=mse.mean())
        vb = diffusion.vb_term(eps.detach(), output[:, channels : 2 * channels], x0, xt, timesteps)
        return DiffusionLoss(loss=(mse + vb).mean(), mse=mse.mean(), vb=vb.mean())

    if timesteps is None:
        timesteps = sample_flow_time(formulation, x0.shape[0], x0.device, time_sampling)
    t = _broadcast(timesteps, x0)
    if formulation.name == "rf-noise-at-0":
        xt, target = t * x0 + (1 - t) * noise, x0 - noise
    elif formulation.name == "rf-noise-at-1":
        xt, target = (1 - t) * x0 + t * noise, noise - x0
    elif isinstance(formulation, JiTXPrediction):
        xt = t * x0 + (1 - t) * noise * formulation.noise_scale
        output = transformer(xt, timesteps, class_labels).sample[:, :channels].float()
        target = formulation.velocity(x0, xt, timesteps)
        mse = _mean_flat((target - formulation.velocity(output, xt, timesteps)) ** 2).mean()
        return DiffusionLoss(loss=mse, mse=mse)
    else:
        raise ValueError(f"No training loss for formulation {formulation.name!r}.")
    output = transformer(xt, timesteps, class_labels).sample[:, :channels].float()
    mse = _mean_flat((output - target) ** 2).mean()
    return DiffusionLoss(loss=mse, mse=mse)
