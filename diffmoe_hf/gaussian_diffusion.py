"""The Gaussian diffusion quantities of ADM / DiT in float64, for the `ddpm-learned-sigma` training objective.

The VB term is the ADM/DiT one: with the output's second half v the learned-range log variance
`frac * log beta_t + (1 - frac) * log beta~_t` (frac = (v + 1) / 2), the KL in bits between the true posterior
q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), whose mean is computed from the eps prediction it is given
(detached by the caller, so that the VB term trains only the variance); at t = 0 the discretised Gaussian decoder NLL
instead.
"""

import math

import torch


def broadcast_to_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample `values` as (B, 1, ..., 1) in the dtype of `like` (B, ...), to scale a batch of samples."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def mean_flat(values: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean of (B, ...) `values` over every dimension but the batch."""
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
        return broadcast_to_sample(values.to(timesteps.device)[timesteps].float(), like)

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

        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        decoder_nll = mean_flat(nll) / math.log(2.0)
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
