"""Diffusion formulations: what a transformer's timestep input and output mean, and how a diffusers scheduler drives it.

A transformer records its formulation in `config.formulation`; the pipeline looks it up here, so one pipeline serves
every family. diffusers' flow-matching schedulers use `x_sigma = (1 - sigma) * x0 + sigma * noise` (sigma = 1 is
noise) and step with the velocity `noise - x0`; each formulation converts to and from that convention.

| name | model time | noise at | model output (first C channels) |
|---|---|---|---|
| `rf-noise-at-0` | flow time t in [0, 1] | t = 0 | velocity `data - noise` |
| `jit-xpred` | flow time t in [0, 1] | t = 0 | clean image x (pixel space) |
| `rf-noise-at-1` | flow time t in [0, 1] | t = 1 | velocity `noise - data` |
| `ddpm-learned-sigma` | DDPM index 0..999 | t = 999 | eps (channels C..2C-1: learned variance v in [-1, 1]) |

A formulation also says how the original code trains it (`training_times`, `noisy_sample`, `loss_terms`, which
`diffmoe_hf.training_losses` runs); per-sample terms are means over all non-batch dimensions:

| name | time (default) | noisy input z | loss terms |
|---|---|---|---|
| `rf-noise-at-0` (DSMoE, DiffMoE of Shi et al.) | t ~ U[0, 1) | `t x + (1 - t) eps` | mse: MSE(out[:C], x - eps) |
| `rf-noise-at-1` (DiT-MoE, Diff-MoE of Cheng et al.) | t = sigmoid(N(0, 1)) | `(1 - t) x + t eps` | mse: MSE(out[:C], eps - x) |
| `jit-xpred` (JiT) | t = sigmoid(N(-0.8, 0.8)) | `t x + (1 - t) s eps` | mse: MSE of `v = (x - z) / max(1 - t, t_eps)` |
| `ddpm-learned-sigma` (DiT-MoE, Diff-MoE of Cheng et al.) | t ~ U{0..999} | `sqrt(abar) x + sqrt(1 - abar) eps` | mse: MSE(out[:C], eps); vb (2C outputs): `gaussian_diffusion` |
"""

from dataclasses import dataclass

import torch
from diffusers.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SchedulerMixin,
)

from .gaussian_diffusion import DDPMDiffusion, broadcast_to_sample, mean_flat


def in_guidance_interval(model_time: torch.Tensor, guidance_interval: tuple[float, float] | None) -> torch.Tensor:
    """
    Where classifier-free guidance applies: `low < model_time < high`, or `model_time < high` when `low == 0` (the
    rule of Kynkaanniemi et al. as JiT implements it, comparing in the dtype of `model_time`); everywhere when
    `guidance_interval` is None. Returns a bool tensor of the shape of `model_time`.
    """
    if guidance_interval is None:
        return torch.ones_like(model_time, dtype=torch.bool)
    low, high = guidance_interval
    return (model_time < high) & ((model_time > low) | (low == 0))


@dataclass(frozen=True)
class SamplingPlan:
    """
    Everything a sampling call needs from the formulation, computed once before the denoising loop.

    Args:
        scheduler: The scheduler that steps, its timesteps set: the pipeline's own, or a copy derived from it when
            the upstream grid needs one (the pipeline's scheduler is then left untouched).
        timesteps: (S,) `scheduler.timesteps`, one per transformer evaluation (Heun: two per step but the last).
        model_times: (S,) the transformer's timestep input at each of them (float32, on the sampling device).
        guided: S bools: whether classifier-free guidance applies at each of them (the guidance interval).
    """

    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    model_times: torch.Tensor
    guided: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def evaluations_per_step(self) -> int:
        """Transformer evaluations per sampling step: the scheduler's `order` (Heun: 2, its last step 1)."""
        return getattr(self.scheduler, "order", 1)

    @property
    def num_steps(self) -> int:
        """Sampling steps (what `num_inference_steps` asked for): the evaluations grouped by `evaluations_per_step`."""
        return -(-len(self) // self.evaluations_per_step)

    def step_of(self, evaluation: int) -> int:
        """The 0-based sampling step that transformer evaluation `evaluation` (an index into `timesteps`) belongs to."""
        return evaluation // self.evaluations_per_step

    def completes_step(self, evaluation: int) -> bool:
        """Whether evaluation `evaluation` is the last one of its sampling step."""
        return (evaluation + 1) % self.evaluations_per_step == 0 or evaluation == len(self) - 1


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


class Formulation:
    """
    Base class: plans a sampling call (`sampling_plan`), maps model predictions to `scheduler.step` inputs, and
    defines the training objective (`training_times`, `noisy_sample`, `loss_terms`).
    """

    name: str
    # pipeline defaults when the caller gives none (the original sampling scripts' values)
    default_guidance_scale: float = 1.5
    default_guidance_interval: tuple[float, float] | None = None
    # the scheduler classes this formulation can drive (the default scheduler's class first)
    compatible_schedulers: tuple[type[SchedulerMixin], ...] = ()
    # how the original training script draws flow times (`training_times`)
    default_time_sampling: TimeSampling = TimeSampling("uniform")

    def for_model(self, config) -> "Formulation":
        """This formulation with the parameters a transformer records in its config (none by default)."""
        return self

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's starting point from standard Gaussian noise (unchanged by default)."""
        return noise

    def guidance_scale_at(
        self, guidance_scale: float, model_time: torch.Tensor, guidance_interval: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """
        The classifier-free guidance scale to use at `model_time` (0-d or (B,), same shape returned, float32):
        `guidance_scale` inside `guidance_interval` (see `in_guidance_interval`), 1 (no guidance) outside.
        """
        scale = torch.full_like(model_time, guidance_scale, dtype=torch.float32)
        return torch.where(in_guidance_interval(model_time, guidance_interval), scale, torch.ones_like(scale))

    def default_scheduler(self) -> SchedulerMixin:
        """The scheduler written into converted folders; it reproduces the upstream sampler."""
        raise NotImplementedError

    def sampling_plan(
        self,
        scheduler: SchedulerMixin,
        num_inference_steps: int,
        device: torch.device,
        guidance_interval: tuple[float, float] | None = None,
    ) -> SamplingPlan:
        """
        The plan of one sampling call: the scheduler that steps on the upstream grid (where the scheduler can express
        it), the model time of every step and where guidance applies.

        Args:
            scheduler: The pipeline's scheduler. Only its own `set_timesteps` changes it; when the upstream grid needs
                other settings, a derived copy steps instead and `scheduler` is left untouched.
            num_inference_steps: Number of denoising steps.
            device: Where the timesteps and model times live.
            guidance_interval: `(low, high)` in model time, or None (guidance at every step).
        """
        stepping, model_times = self.schedule(scheduler, num_inference_steps, device)
        # one host sync per call, so that the denoising loop decides on one or two passes without any
        guided = tuple(in_guidance_interval(model_times, guidance_interval).tolist())
        return SamplingPlan(stepping, stepping.timesteps, model_times, guided)

    def schedule(
        self, scheduler: SchedulerMixin, num_inference_steps: int, device: torch.device
    ) -> tuple[SchedulerMixin, torch.Tensor]:
        """The scheduler that steps, its timesteps set, and the (S,) model times of its timesteps."""
        raise NotImplementedError

    def scheduler_output(
        self, prediction: torch.Tensor, sample: torch.Tensor, model_time: torch.Tensor, scheduler: SchedulerMixin
    ) -> torch.Tensor:
        """
        Converts the guided model output to what `scheduler.step` expects.

        Args:
            prediction: (B, C_out, H, W) guided transformer output (C_out >= C).
            sample: (B, C, H, W) current latents.
            model_time: the transformer's timestep input for this step.
            scheduler: the plan's scheduler.
        """
        raise NotImplementedError

    def training_times(
        self,
        batch_size: int,
        device: torch.device,
        time_sampling: TimeSampling | None = None,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        (batch_size,) model times to train at. This default draws float32 flow times t in [0, 1) as `time_sampling`
        says, its unset fields taken from `default_time_sampling`; `scheduler` is for formulations whose times come
        from a noise schedule.
        """
        default = self.default_time_sampling
        sampling = time_sampling or TimeSampling()
        scheme = sampling.scheme or default.scheme
        if scheme == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        if scheme == "logit_normal":
            mean = default.logit_mean if sampling.logit_mean is None else sampling.logit_mean
            std = default.logit_std if sampling.logit_std is None else sampling.logit_std
            normal = torch.randn(batch_size, device=device, generator=generator)
            return torch.sigmoid(normal * (std if std is not None else 1.0) + (mean or 0.0))
        raise ValueError(f"Unknown time sampling scheme {scheme!r}; use 'uniform' or 'logit_normal'.")

    def noisy_sample(
        self, x0: torch.Tensor, noise: torch.Tensor, model_time: torch.Tensor, scheduler: SchedulerMixin | None = None
    ) -> torch.Tensor:
        """
        The transformer's training input z_t: clean data `x0` (B, C, H, W) noised with standard Gaussian `noise` (same
        shape) at the (B,) `model_time` (`scheduler`: the noise schedule, where the formulation has one).
        """
        raise NotImplementedError

    def loss_terms(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sample: torch.Tensor,
        model_time: torch.Tensor,
        scheduler: SchedulerMixin | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        The per-sample terms of the training loss, (B,) float32 each, whose sum is the loss of a sample: `"mse"`, the
        regression of the output, and any further term (`"vb"`).

        Args:
            output: (B, C_out, H, W) transformer output for `sample` (C_out >= C).
            x0, noise: (B, C, H, W) the clean data and the noise `sample` was made of.
            sample: (B, C, H, W) the transformer's input (`noisy_sample`).
            model_time: (B,) the transformer's timestep input.
            scheduler: The noise schedule, where the formulation has one.
        """
        raise NotImplementedError


def _flow_time(scheduler: SchedulerMixin) -> torch.Tensor:
    """`timesteps / num_train_timesteps` of a flow-matching scheduler (its sigma before any shift), float32."""
    return scheduler.timesteps.float() / scheduler.config.num_train_timesteps


class RectifiedFlowNoiseAtZero(Formulation):
    """
    Rectified flow with t = 0 at noise (DSMoE, DiffMoE of Shi et al.): `z_t = t * x + (1 - t) * noise`, the model
    predicts `x - noise`. In diffusers terms t = 1 - sigma and the scheduler velocity is the negated prediction. The
    upstream Euler sampler evaluates t_i = i / N, i.e. sigmas 1, (N-1)/N, ..., 1/N, which
    `FlowMatchEulerDiscreteScheduler` takes as custom sigmas.
    """

    name = "rf-noise-at-0"
    compatible_schedulers = (FlowMatchEulerDiscreteScheduler,)
    default_time_sampling = TimeSampling("uniform")

    def default_scheduler(self) -> SchedulerMixin:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def schedule(self, scheduler, num_inference_steps, device):
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.use_dynamic_shifting:
            sigmas = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler, 1.0 - _flow_time(scheduler)

    def scheduler_output(self, prediction, sample, model_time, scheduler):
        return -prediction[:, : sample.shape[1]]

    def noisy_sample(self, x0, noise, model_time, scheduler=None):
        t = broadcast_to_sample(model_time, x0)
        return t * x0 + (1 - t) * noise

    def loss_terms(self, output, x0, noise, sample, model_time, scheduler=None):
        return {"mse": mean_flat((output[:, : x0.shape[1]].float() - (x0 - noise)) ** 2)}


class RectifiedFlowNoiseAtOne(Formulation):
    """
    Rectified flow with t = 1 at noise (DiT-MoE, Diff-MoE of Cheng et al.): `z_t = (1 - t) * x + t * noise`, the model
    predicts the velocity `noise - x`, which is diffusers' flow-matching convention with sigma = t. The model takes the
    unscaled t = sigma = timestep / num_train_timesteps. The upstream Euler sampler evaluates t_i = i / N for i = N..1,
    which `FlowMatchEulerDiscreteScheduler` takes as custom sigmas (its default grid, linspace(1, 1/1000, N), differs).
    """

    name = "rf-noise-at-1"
    compatible_schedulers = (FlowMatchEulerDiscreteScheduler,)
    default_time_sampling = TimeSampling("logit_normal", 0.0, 1.0)

    def default_scheduler(self) -> SchedulerMixin:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def schedule(self, scheduler, num_inference_steps, device):
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.use_dynamic_shifting:
            sigmas = [(num_inference_steps - i) / num_inference_steps for i in range(num_inference_steps)]
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler, _flow_time(scheduler)

    def scheduler_output(self, prediction, sample, model_time, scheduler):
        return prediction[:, : sample.shape[1]]

    def noisy_sample(self, x0, noise, model_time, scheduler=None):
        t = broadcast_to_sample(model_time, x0)
        return (1 - t) * x0 + t * noise

    def loss_terms(self, output, x0, noise, sample, model_time, scheduler=None):
        return {"mse": mean_flat((output[:, : x0.shape[1]].float() - (noise - x0)) ** 2)}


def ddim_respacing(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """
    The kept DDPM indices of the original DiT/ADM `"ddimN"` respacing, ascending: `range(0, T, s)` with the smallest
    stride s that gives exactly N indices. Equal to diffusers' "leading" spacing only when N divides T (N = 6, T = 1000
    gives stride 167, not 166).
    """
    for stride in range(1, num_train_timesteps):
        if len(range(0, num_train_timesteps, stride)) == num_inference_steps:
            return list(range(0, num_train_timesteps, stride))
    raise ValueError(
        f"The original DDIM respacing has no stride giving exactly {num_inference_steps} of {num_train_timesteps} "
        "timesteps; choose another num_inference_steps."
    )


def evenly_spaced_respacing(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """
    The kept DDPM indices of the original DiT/ADM `"N"` respacing (one section), ascending: positions
    `round(j * (T - 1) / (N - 1))` accumulated as a float stride, with Python's round-half-to-even.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and {num_train_timesteps}, got {num_inference_steps}."
        )
    stride = 1.0 if num_inference_steps == 1 else (num_train_timesteps - 1) / (num_inference_steps - 1)
    position, kept = 0.0, []
    for _ in range(num_inference_steps):
        kept.append(round(position))
        position += stride
    return kept


class DDPMLearnedSigma(Formulation):
    """
    DDPM with epsilon prediction and learned variance (DiT, DiT-MoE, Diff-MoE of Cheng et al.): the model takes the
    integer DDPM index t in 0..999 (999 = noise) and returns `[eps, v]` with v the learned-range variance
    interpolation.

    - `DDPMScheduler` (the default, `variance_type="learned_range"`) gets the full 2C output and runs the upstream
      ancestral sampler on the upstream `"N"` grid (`evenly_spaced_respacing`; the default 250 steps).
    - `DDIMScheduler` (eta 0) runs the upstream `"ddimN"` grid exactly for every N: the upstream respaced chain is a
      DDIM scheduler over N steps with betas `1 - abar[tau_k] / abar[tau_(k-1)]`, so a derived `DDIMScheduler` with
      those `trained_betas` steps k = N-1..0 and the model gets the original index `tau_k`.
    - Any other scheduler (e.g. `DPMSolverMultistepScheduler`) runs its own grid on the eps half (a learned
      `variance_type` there is dropped, since those schedulers would keep only 3 channels of it).
    """

    name = "ddpm-learned-sigma"
    compatible_schedulers = (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)

    def default_scheduler(self) -> SchedulerMixin:
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            variance_type="learned_range",
            clip_sample=False,
            timestep_spacing="linspace",
        )

    @staticmethod
    def _learned_variance(scheduler: SchedulerMixin) -> bool:
        return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")

    def schedule(self, scheduler, num_inference_steps, device):
        train_steps = scheduler.config.num_train_timesteps
        if isinstance(scheduler, DDIMScheduler):
            kept = ddim_respacing(train_steps, num_inference_steps)
            stepping = self._respaced_ddim(scheduler, kept)
            stepping.set_timesteps(num_inference_steps, device=device)
            # step k of the respaced chain is DDPM index kept[k]
            return stepping, torch.tensor(kept, device=device)[stepping.timesteps.long()].float()
        if isinstance(scheduler, DDPMScheduler):
            kept = evenly_spaced_respacing(train_steps, num_inference_steps)
            scheduler.set_timesteps(timesteps=kept[::-1], device=device)
        elif self._learned_variance(scheduler):
            scheduler = type(scheduler).from_config(scheduler.config, variance_type=None)
            scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler, scheduler.timesteps.float()

    @staticmethod
    def _respaced_ddim(scheduler: DDIMScheduler, kept: list[int]) -> DDIMScheduler:
        """A DDIM scheduler over the `len(kept)` steps of the upstream chain respaced to the DDPM indices `kept`."""
        alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)[torch.tensor(kept)]
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # the upstream chain ends at alpha-bar 1 and needs no step offset, whatever `scheduler` is set to
        return DDIMScheduler.from_config(
            scheduler.config,
            num_train_timesteps=len(kept),
            trained_betas=(1.0 - alphas_cumprod / previous).tolist(),
            rescale_betas_zero_snr=False,  # already applied to the betas read above
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )

    def scheduler_output(self, prediction, sample, model_time, scheduler):
        channels = sample.shape[1]
        if isinstance(scheduler, DDPMScheduler) and self._learned_variance(scheduler):
            return prediction[:, : 2 * channels]
        return prediction[:, :channels]

    def _diffusion(self, scheduler: SchedulerMixin | None) -> DDPMDiffusion:
        """The Gaussian diffusion of `scheduler`'s betas (default: this formulation's scheduler)."""
        return DDPMDiffusion.from_scheduler(scheduler or self.default_scheduler())

    def training_times(self, batch_size, device, time_sampling=None, scheduler=None, generator=None):
        """(batch_size,) DDPM indices drawn uniformly from the schedule's (`time_sampling` is for flows only)."""
        num_timesteps = self._diffusion(scheduler).num_timesteps
        return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)

    def noisy_sample(self, x0, noise, model_time, scheduler=None):
        return self._diffusion(scheduler).add_noise(x0, noise, model_time)

    def loss_terms(self, output, x0, noise, sample, model_time, scheduler=None):
        """`mse` of the eps half; with a learned variance half (2C outputs), `vb` as ADM trains it: from the detached
        eps, so that it trains only the variance."""
        channels = x0.shape[1]
        output = output.float()
        eps = output[:, :channels]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if output.shape[1] >= 2 * channels:
            variance = output[:, channels : 2 * channels]
            terms["vb"] = self._diffusion(scheduler).vb_term(eps.detach(), variance, x0, sample, model_time)
        return terms


class JiTXPrediction(RectifiedFlowNoiseAtZero):
    """
    JiT / JiTMoE (`JiTMoE/denoiser.py`): flow in pixel space with t = 0 at noise,
    `z_t = t * x + (1 - t) * noise_scale * eps`; the model predicts the clean image x and the original sampler
    follows the velocity `v = (x_pred - z) / max(1 - t, t_eps)` on the float32 grid `t_i = linspace(0, 1, N + 1)[i]`,
    with guidance only inside an interval of t (released scripts: 50 steps, scale 2.9, interval (0.1, 1.0)).

    `FlowMatchHeunDiscreteScheduler` reproduces its default sampler (Heun on the first N - 1 intervals, then one Euler
    step) and `FlowMatchEulerDiscreteScheduler` its Euler sampler, both on sigmas `1 - i / N`. The model time is read
    from the float32 grid, not computed as `1 - sigma`: the two differ by an ulp, which flips the interval test at
    grid points such as t = 0.1 for N = 50.

    Args:
        t_eps (`float`): Lower clamp of `1 - t` in the velocity.
        noise_scale (`float`): Standard deviation of the initial noise.
    """

    name = "jit-xpred"
    compatible_schedulers = (FlowMatchHeunDiscreteScheduler, FlowMatchEulerDiscreteScheduler)
    default_guidance_scale = 2.9
    default_guidance_interval = (0.1, 1.0)
    default_time_sampling = TimeSampling("logit_normal", -0.8, 0.8)

    def __init__(self, t_eps: float = 0.05, noise_scale: float = 1.0):
        self.t_eps = t_eps
        self.noise_scale = noise_scale

    def for_model(self, config) -> "JiTXPrediction":
        t_eps, noise_scale = config.get("t_eps", self.t_eps), config.get("noise_scale", self.noise_scale)
        return type(self)(t_eps=t_eps, noise_scale=noise_scale)

    def default_scheduler(self) -> SchedulerMixin:
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def schedule(self, scheduler, num_inference_steps, device):
        if isinstance(scheduler, FlowMatchHeunDiscreteScheduler) and scheduler.config.shift == 1.0:
            # The scheduler spaces its sigmas linearly from sigma_max (1) down to its attribute sigma_min and takes no
            # custom sigmas (diffusers 0.37 to 0.42): a copy whose sigma_min is 1/N steps on exactly 1 - i/N.
            scheduler = type(scheduler).from_config(scheduler.config)
            scheduler.sigma_min = 1.0 / num_inference_steps
            scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            scheduler, _ = super().schedule(scheduler, num_inference_steps, device)
        return scheduler, self._on_upstream_grid(1.0 - _flow_time(scheduler), scheduler.num_inference_steps)

    @staticmethod
    def _on_upstream_grid(times: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        """
        `times` (float32), each replaced by the point of the upstream grid `linspace(0, 1, N + 1)` (float32) it lies
        on: `1 - sigma` and the upstream grid differ by an ulp at some points (e.g. t = 0.1 for N = 50), which decides
        the guidance interval test there. Times off the grid (another scheduler's own grid) are kept.
        """
        grid = torch.linspace(0.0, 1.0, num_inference_steps + 1, device=times.device)
        # the grid position in float64, on the CPU (every backend has float64 there): one copy per call
        position = times.cpu().double() * num_inference_steps
        index = position.round()
        on_grid = ((position - index).abs() < 1e-3) & (index >= 0) & (index <= num_inference_steps)
        on_grid, index = on_grid.to(times.device), index.long().clamp(0, num_inference_steps).to(times.device)
        return torch.where(on_grid, grid[index], times)

    def initial_noise(self, noise):
        return noise * self.noise_scale

    def velocity(self, x_prediction: torch.Tensor, sample: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        """The original velocity `(x_pred - z) / max(1 - t, t_eps)` (towards the data); `model_time` 0-d or (B,)."""
        one_minus_t = (1.0 - model_time).clamp_min(self.t_eps)
        return (x_prediction - sample) / one_minus_t.reshape(-1, *([1] * (sample.ndim - 1)))

    def scheduler_output(self, prediction, sample, model_time, scheduler):
        return -self.velocity(prediction[:, : sample.shape[1]], sample, model_time)

    def noisy_sample(self, x0, noise, model_time, scheduler=None):
        t = broadcast_to_sample(model_time, x0)
        return t * x0 + (1 - t) * noise * self.noise_scale

    def loss_terms(self, output, x0, noise, sample, model_time, scheduler=None):
        """`mse` of the velocities the clean image and the x-prediction give (as the original trains)."""
        prediction = output[:, : x0.shape[1]].float()
        target = self.velocity(x0, sample, model_time)
        return {"mse": mean_flat((target - self.velocity(prediction, sample, model_time)) ** 2)}

    @torch.no_grad()
    def guided_velocity(
        self,
        transformer,
        sample: torch.Tensor,
        model_time: torch.Tensor,
        class_labels: torch.LongTensor,
        guidance_scale: float,
        guidance_interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """
        The original sampler's guided velocity (`Denoiser._forward_sample`) for a batch with per-sample times:
        separate conditional and null-class passes, each turned into a velocity, mixed with the interval rule.

        Args:
            transformer: A `JiTTransformer2DModel`.
            sample: (B, C, S, S) noisy images z_t.
            model_time: (B,) flow times t.
            class_labels: (B,) class ids.
            guidance_scale: Guidance scale inside the interval.
            guidance_interval: `(low, high)`; defaults to `default_guidance_interval`.

        Returns:
            (B, C, S, S) guided velocity towards the data (the negated `scheduler.step` input).
        """
        interval = self.default_guidance_interval if guidance_interval is None else guidance_interval
        null_labels = torch.full_like(class_labels, transformer.config.num_classes)
        velocity_cond = self.velocity(transformer(sample, model_time, class_labels).sample, sample, model_time)
        velocity_uncond = self.velocity(transformer(sample, model_time, null_labels).sample, sample, model_time)
        scale = self.guidance_scale_at(guidance_scale, model_time, interval).reshape(-1, 1, 1, 1)
        return velocity_uncond + scale.to(sample.dtype) * (velocity_cond - velocity_uncond)


FORMULATIONS: dict[str, Formulation] = {
    f.name: f for f in (RectifiedFlowNoiseAtZero(), RectifiedFlowNoiseAtOne(), DDPMLearnedSigma(), JiTXPrediction())
}


# The short names of the command line (`--formulation ddpm|rf`) and of the original code of the families trained either
# way (DiT-MoE, Diff-MoE of Cheng et al., whose train.py `args.rf` flag picks one): DDPM with a learned variance, or
# rectified flow with noise at t = 1.
FORMULATION_ALIASES = {"ddpm": "ddpm-learned-sigma", "rf": "rf-noise-at-1"}


def get_formulation(name: str) -> Formulation:
    """The registered formulation called `name` (a transformer's `config.formulation`)."""
    if name not in FORMULATIONS:
        raise ValueError(f"Unknown formulation {name!r}; known: {', '.join(FORMULATIONS)}.")
    return FORMULATIONS[name]


def resolve_formulation(name: str, allowed=None) -> str:
    """
    The registered name that `name` (a registered name or one of `FORMULATION_ALIASES`) stands for.

    Args:
        name: What the user or a config gave.
        allowed: The registered names the caller accepts (default: every registered one).

    Raises:
        ValueError: for any other name, listing the accepted names and aliases.
    """
    allowed = tuple(FORMULATIONS if allowed is None else allowed)
    resolved = FORMULATION_ALIASES.get(name, name)
    if resolved not in allowed:
        aliases = [alias for alias, target in FORMULATION_ALIASES.items() if target in allowed]
        raise ValueError(
            f"formulation {name!r} is not one of {', '.join(allowed)}"
            + (f" (or their short names {', '.join(aliases)})" if aliases else "")
        )
    return resolved


def rf_flag_formulation(rf: bool) -> str:
    """The formulation the original DiT-MoE / Diff-MoE (Cheng et al.) `args.rf` flag selects."""
    return FORMULATION_ALIASES["rf" if rf else "ddpm"]


def scheduler_problem(formulation: str, scheduler) -> str | None:
    """
    Why `scheduler` cannot sample a model of `formulation` (a transformer's `config.formulation`), or None when it can:
    the one rule of every entry point (the pipeline's call, `diffmoe generate` / `sample`, the Space, training's
    validation). A scheduler can when it is an instance of one of the formulation's `compatible_schedulers`; any
    other class would drive the transformer with timesteps or outputs it was not trained for (e.g. a DDPM scheduler
    on a flow model samples degraded images without an error).
    """
    compatible = get_formulation(formulation).compatible_schedulers
    if isinstance(scheduler, compatible):
        return None
    names = ", ".join(scheduler_class.__name__ for scheduler_class in compatible)
    return (
        f"{type(scheduler).__name__} cannot sample this model (formulation {formulation}): its timesteps or outputs "
        f"mean something else, so the samples would be degraded. Use one of: {names}."
    )


def check_scheduler(formulation: str, scheduler, where: str) -> None:
    """Raises `ValueError` ("`where`: why") when `scheduler` cannot sample a model of `formulation`
    (`scheduler_problem`); `where` names the scheduler for the user, e.g. `"pipe.scheduler"`."""
    problem = scheduler_problem(formulation, scheduler)
    if problem:
        raise ValueError(f"{where}: {problem}")


def available_schedulers(formulation: str, scheduler: SchedulerMixin) -> dict[str, SchedulerMixin]:
    """
    The schedulers that can sample a model of `formulation` (`scheduler_problem`), by class name: the model's own
    `scheduler` first when it can (the one its folder ships), then the formulation's `compatible_schedulers`, each
    built from `scheduler.config`.
    """
    schedulers = {} if scheduler_problem(formulation, scheduler) else {type(scheduler).__name__: scheduler}
    for scheduler_class in get_formulation(formulation).compatible_schedulers:
        if scheduler_class.__name__ not in schedulers:
            schedulers[scheduler_class.__name__] = scheduler_class.from_config(scheduler.config)
    return schedulers


def max_inference_steps(scheduler: SchedulerMixin) -> int:
    """
    The most denoising steps a call may take with `scheduler`: its `num_train_timesteps` (1000 for every shipped
    scheduler). The DDPM-family schedulers cannot express a finer grid than the training one; the flow-matching ones
    could, but the model was trained on that resolution and the cost grows linearly (one or two transformer passes
    per step), so a larger count is almost always a typo.
    """
    return int(scheduler.config.num_train_timesteps)
