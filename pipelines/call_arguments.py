"""Checks of `ClassConditionalMoEPipeline.__call__`'s arguments: each raises a `TypeError` / `ValueError` that names the
argument and says what it takes, before any denoising step runs."""

import math
import numbers

import numpy as np
import torch


# Every formulation works on data of unit scale (pixels in [-1, 1], VAE latents times their scaling factor) and starts
# from unit Gaussian noise, so no sampler of a trained model leaves |x| <= LATENT_LIMIT (10^4 standard deviations of its
# starting noise); latents beyond it (or NaN / infinite) mean the sampling diverged, and would decode to saturated or
# blank images.
LATENT_LIMIT = 1e4

# what the transformers' `attention_kwargs` take (`{"scale": s}` scales LoRA layers)
ATTENTION_KWARGS = ("scale",)


def check_real_number(name: str, value, minimum: float | None = None, allow_inf: bool = False) -> float:
    """
    `value` as a float if it is a finite real number (a Python or NumPy int or float, not a bool) >= `minimum`.

    Raises:
        TypeError: `value` is not a real number (e.g. the string "2").
        ValueError: `value` is NaN, infinite (unless `allow_inf`), or below `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value}: pass a number such as 1.5.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _check_not_meta(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} is a tensor on the meta device, which holds no values: create it on a real device (e.g. with "
            "torch.randn(..., device='cpu'))."
        )


def flatten_class_labels(class_labels) -> list:
    """
    The class labels of a call as one flat list, in order: a single id or name, a (nested) list or tuple of them (as
    diffusers' batching produces, e.g. `[[1], [1]]`), or an integer tensor / array of any shape.

    Raises:
        TypeError: for a float or bool label, or a float / bool tensor or array.
        ValueError: for a tensor on the meta device.
    """
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        dtype = class_labels.dtype
        is_integer = (
            not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
            if isinstance(class_labels, torch.Tensor)
            else dtype.kind in "iu"
        )
        if not is_integer:
            raise TypeError(
                f"class_labels has type {type(class_labels).__name__} of dtype {dtype}: class ids must be integers "
                "(e.g. torch.long); convert with `.long()` if the values are whole numbers."
            )
        if isinstance(class_labels, torch.Tensor):
            _check_not_meta("class_labels", class_labels)
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in flatten_class_labels(item)]
    if isinstance(class_labels, str) or (
        isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool)
    ):
        return [int(class_labels) if isinstance(class_labels, numbers.Integral) else class_labels]
    raise TypeError(
        f"Class label {class_labels!r} has type {type(class_labels).__name__}: class labels must be integer class "
        "ids or class names (strings), e.g. class_labels=[1, 7] or class_labels=['goldfish']."
    )


def check_label_names(label) -> list[str]:
    """`label` (one class name or a list / tuple of names) as a list of names; anything else is a `TypeError`."""
    names = [label] if isinstance(label, str) else label
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"label must be a class name or a list of class names (strings), got {label!r}; integer class ids need "
            "no lookup: pass them to the pipeline as they are."
        )
    return list(names)


def check_guidance_channels(guidance_channels, in_channels: int) -> None:
    """`guidance_channels` is None or a whole number in 1..`in_channels` (the transformer's latent channels)."""
    if guidance_channels is None:
        return
    if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, numbers.Integral):
        raise TypeError(
            f"guidance_channels must be None or a whole number, got {guidance_channels!r} of type "
            f"{type(guidance_channels).__name__}."
        )
    if not 1 <= guidance_channels <= in_channels:
        raise ValueError(
            f"guidance_channels must be None (guide every channel) or between 1 and {in_channels}, the model's "
            f"latent channels; got {guidance_channels}."
        )


def check_attention_kwargs(attention_kwargs) -> None:
    """`attention_kwargs` is None or a dict of `ATTENTION_KWARGS` keys; its `scale` a finite real number."""
    if attention_kwargs is None:
        return
    if not isinstance(attention_kwargs, dict):
        raise TypeError(
            f"attention_kwargs must be None or a dict such as {{'scale': 0.5}}, got {type(attention_kwargs).__name__}."
        )
    unknown = sorted(str(key) for key in attention_kwargs if key not in ATTENTION_KWARGS)
    if unknown:
        raise ValueError(
            f"attention_kwargs has unknown keys {', '.join(map(repr, unknown))}: the transformers accept only "
            f"{', '.join(map(repr, ATTENTION_KWARGS))} (the LoRA scale)."
        )
    if "scale" in attention_kwargs:
        check_real_number("attention_kwargs['scale']", attention_kwargs["scale"])


def check_generator(generator) -> None:
    """`generator` is None, a `torch.Generator`, or a list of them."""
    generators = generator if isinstance(generator, list) else [generator]
    for item in generators:
        if item is not None and not isinstance(item, torch.Generator):
            raise TypeError(
                f"generator must be None, a torch.Generator or a list of them, got {item!r} of type "
                f"{type(item).__name__}; for a seed pass generator=torch.Generator().manual_seed(seed)."
            )


def check_callback(callback_on_step_end) -> None:
    """`callback_on_step_end` is None or callable."""
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(
            f"callback_on_step_end must be a function fn(pipe, step, timestep, callback_kwargs) -> dict, got "
            f"{callback_on_step_end!r} of type {type(callback_on_step_end).__name__}."
        )


def check_callback_output(outputs) -> dict:
    """What a `callback_on_step_end` returned: a dict (diffusers' contract), else a `TypeError`."""
    if not isinstance(outputs, dict):
        raise TypeError(
            f"callback_on_step_end must return a dict (e.g. `return callback_kwargs`), got {type(outputs).__name__}."
        )
    return outputs


def check_latents(latents) -> None:
    """Given initial `latents`: a floating-point tensor with real values, finite and within `LATENT_LIMIT`."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(
            f"latents must be a floating-point torch.Tensor, got {type(latents).__name__}"
            f"{' of dtype ' + str(latents.dtype) if isinstance(latents, torch.Tensor) else ''}."
        )
    _check_not_meta("latents", latents)
    if not bool((latents.abs() <= LATENT_LIMIT).all()):  # False for NaN too
        raise ValueError(
            f"latents contain NaN or infinite values, or values beyond +-{LATENT_LIMIT:g}, which would give blank or "
            "saturated images: pass unit Gaussian noise (e.g. from torch.randn) or leave latents=None."
        )


def diverged_step(first_step: torch.Tensor, step: int, latents: torch.Tensor) -> torch.Tensor:
    """
    The index of the first step whose latents diverged (NaN, infinite or beyond `LATENT_LIMIT`): `first_step` (a 0-d
    long tensor, -1 while none did) updated with `step`. Stays on the latents' device: no host sync.
    """
    diverged = ~(latents.abs().amax() <= LATENT_LIMIT)  # NaN compares False, so it counts as diverged
    return torch.where((first_step < 0) & diverged, step, first_step)
