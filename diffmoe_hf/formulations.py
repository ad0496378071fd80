"""Diffusion formulations: what a transformer's timestep input and output mean, and how a diffusers scheduler drives it.

A transformer records its formulation in `config.formulation`; the pipeline looks it up here, so one pipeline serves
every family. diffusers' flow-matching schedulers use `x_sigma = (1 - sigma) * x0 + sigma * noise` (sigma = 1 is
noise) and step with the velocity `noise - x0`; each formulation converts to and from that convention.

| name | model time | noise at | model output (first C channels) |
|---|---|---|---|
| `rf-noise-at-0` | flow time t in [0, 1] | t = 0 | velocity `data - noise` |
"""

import torch
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, SchedulerMixin


class Formulation:
    """Base class: maps scheduler timesteps to model time and model predictions to `scheduler.step` inputs."""

    name: str

    def default_scheduler(self) -> SchedulerMixin:
        """The scheduler written into converted folders; it reproduces the upstream sampler."""
        raise NotImplementedError

    def set_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int, device: torch.device) -> None:
        """Sets the sampling grid (the upstream grid where the scheduler can express it)."""
        scheduler.set_timesteps(num_inference_steps, device=device)

    def model_time(self, scheduler: SchedulerMixin, timestep: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for the scheduler timestep `timestep` (0-d tensor)."""
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
        """
        raise NotImplementedError


class RectifiedFlowNoiseAtZero(Formulation):
    """
    Rectified flow with t = 0 at noise (DSMoE, DiffMoE): `z_t = t * x + (1 - t) * noise`, the model predicts
    `x - noise`. In diffusers terms t = 1 - sigma and the scheduler velocity is the negated prediction. The upstream
    Euler sampler evaluates t_i = i / N, i.e. sigmas 1, (N-1)/N, ..., 1/N, which `FlowMatchEulerDiscreteScheduler`
    takes as custom sigmas.
    """

    name = "rf-noise-at-0"

    def default_scheduler(self) -> SchedulerMixin:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def set_timesteps(self, scheduler, num_inference_steps, device):
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.use_dynamic_shifting:
            sigmas = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)

    def model_time(self, scheduler, timestep):
        return 1.0 - timestep.float() / scheduler.config.num_train_timesteps

    def scheduler_output(self, prediction, sample, model_time, scheduler):
        return -prediction[:, : sample.shape[1]]


FORMULATIONS: dict[str, Formulation] = {f.name: f for f in (RectifiedFlowNoiseAtZero(),)}


def get_formulation(name: str) -> Formulation:
    """The registered formulation called `name` (a transformer's `config.formulation`)."""
    if name not in FORMULATIONS:
        raise ValueError(f"Unknown formulation {name!r}; known: {', '.join(FORMULATIONS)}.")
    return FORMULATIONS[name]
