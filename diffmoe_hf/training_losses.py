"""The training loss of one batch, as the original repositories train: the formulation (`diffmoe_hf.formulations`)
says how a clean sample is noised at a drawn time and what the output is regressed on (`Formulation.training_times`,
`noisy_sample`, `loss_terms`; the module table of `formulations` lists them); this module draws the noise, runs the
transformer and averages the terms. Losses are means over all non-batch dimensions, then over the batch (the sum of
the terms per sample first, as upstream).

The model's MoE terms (load-balancing and capacity-predictor losses) are not part of these objectives; add the
`aux_loss` of the model's output (the transformer passed as `denoiser` returns it in training mode).
"""

import functools
import operator
from dataclasses import dataclass

import torch

from diffmoe_hf.formulations import Formulation, TimeSampling


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
    The formulation's training loss for one batch.

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
    noise = torch.randn_like(x0) if noise is None else noise
    if timesteps is None:
        timesteps = formulation.training_times(x0.shape[0], x0.device, time_sampling, scheduler)
    sample = formulation.noisy_sample(x0, noise, timesteps, scheduler)
    output = transformer(sample, timesteps, class_labels).sample
    terms = formulation.loss_terms(output, x0, noise, sample, timesteps, scheduler)
    vb = terms.get("vb")
    return DiffusionLoss(
        loss=functools.reduce(operator.add, terms.values()).mean(),
        mse=terms["mse"].mean(),
        vb=None if vb is None else vb.mean(),
    )
