"""What the command-line front-ends share: the sampling arguments that `diffmoe generate` and `diffmoe sample` check
one way for both (argument types for argparse, the device, the scheduler by the formulations' one rule, the pipeline
call the command will make), loading a model folder or Hub id, the output folder probe, and `CommandError`. Each check
raises `CommandError`, `ValueError` or argparse's `ArgumentTypeError`, which the CLI reports as one line, exit status 2,
before the model is loaded or sampled.
"""

import argparse
import inspect
import math
import os


class CommandError(Exception):
    """A problem with the command's arguments or files, reported as one line (exit status 2)."""


def checked_model_source(source: str) -> str:
    """`source` if it can be a model: a folder with `model_index.json`, or a Hub repo id (org/name)."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "model_index.json")):
            raise CommandError(
                f"{source} is not a converted model folder (it has no model_index.json); write one with "
                "`diffmoe convert`, or pass a Hub repo id."
            )
    elif os.path.exists(source) or source.count("/") != 1:
        raise CommandError(f"--model {source} is neither a converted model folder nor a Hub repo id (org/name).")
    return source


def load_pipeline(source: str, **components):
    """`ClassConditionalMoEPipeline.from_pretrained(source)`; a failed Hub load also says that no such folder exists."""
    from diffmoe_hf import ClassConditionalMoEPipeline

    try:
        return ClassConditionalMoEPipeline.from_pretrained(checked_model_source(source), **components)
    except (OSError, ValueError) as err:
        if os.path.isdir(source):
            raise
        raise CommandError(
            f"--model {source}: there is no such folder, and as a Hub repo id it failed: {err}"
        ) from None


def check_writable_folder(folder: str, what: str) -> None:
    """Refuses `what` when `folder`, or the closest existing folder above it (missing ones are created), does not
    accept new files (`atomic_files.why_not_writable`)."""
    from diffmoe_hf.atomic_files import why_not_writable

    problem = why_not_writable(folder)
    if problem is not None and problem.endswith("is a file"):
        raise CommandError(f"Cannot create the folder {folder} for {what}: {problem}. Choose another path.")
    if problem is not None:
        raise CommandError(f"Cannot write {what}: {problem}. Choose another path.")


def guidance_scale_argument(text: str) -> float:
    """argparse type of `--guidance-scale`: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (e.g. 1.5; values <= 1 turn guidance off), got {text!r}"
        )
    return value


def guidance_channels_argument(text: str) -> int:
    """argparse type of `--guidance-channels`: a whole number >= 1 (the model's channels are checked after loading)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (the number of latent channels to guide), got {value}")
    return value


def check_device(name: str):
    """
    The `torch.device` that `--device NAME` names, if this machine has it: a typo, or `cuda` on a build or machine
    without CUDA, is a `ValueError` that says which devices there are (`devices.check_device_available`).
    """
    from diffmoe_hf.devices import check_device_available

    return check_device_available(name, "--device", hint="Omit --device to use the best one.")


def select_scheduler(pipe, name: str | None) -> None:
    """Sets the scheduler class called `name` (`--scheduler`) on `pipe` if the model's formulation can use it
    (`formulations.available_schedulers`, built on `scheduler_problem`); else a `ValueError` with the usable ones."""
    from diffusers import schedulers as diffusers_schedulers

    from diffmoe_hf.formulations import available_schedulers

    if name is None:
        return
    formulation = pipe.transformer.config.formulation
    available = available_schedulers(formulation, pipe.scheduler)
    if name not in available:
        problem = (
            "is not a diffusers scheduler"
            if not isinstance(getattr(diffusers_schedulers, name, None), type)
            else f"cannot sample this model (formulation {formulation})"
        )
        raise ValueError(f"--scheduler {name} {problem}; choose one of: {', '.join(available)}.")
    pipe.scheduler = available[name]


def check_sampling_call(pipe, call_kwargs: dict) -> None:
    """
    Runs the pipeline's own argument checks (`check_inputs`: steps, guidance scale, interval and channels, the
    scheduler rule) on the call a command will make with `call_kwargs`, before it samples anything; a problem is a
    `ValueError` that also says where such a value comes from.
    """
    defaults = inspect.signature(type(pipe).__call__).parameters
    default_scale, default_interval = pipe.default_guidance()
    try:
        pipe.check_inputs(
            call_kwargs.get("num_inference_steps", defaults["num_inference_steps"].default),
            call_kwargs.get("guidance_scale", default_scale),
            "np",
            None,
            call_kwargs.get("guidance_interval", default_interval),
            guidance_channels=call_kwargs.get("guidance_channels"),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{err} (from the command line, or the model folder's published_settings.json where the command line "
            "gives none)"
        ) from None
