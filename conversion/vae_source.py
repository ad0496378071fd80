"""The VAE a converted folder ships (`diffmoe convert --vae`) or a latent model samples with (`diffmoe generate --vae`):
checked to be an `AutoencoderKL` folder, or a Hub repo id, before any weights are loaded."""

import json
import os
import re

from diffmoe_hf.models.folder_checks import check_folder_matches_config


VAE_CLASS = "AutoencoderKL"
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_EXAMPLE = "e.g. stabilityai/sd-vae-ft-mse, or the vae/ folder of a Stable Diffusion pipeline"


def check_vae_source(source: str) -> None:
    """
    Refuses a `--vae` that cannot be an `AutoencoderKL`: a file, a path that does not exist (anything but a Hub repo
    id `org/name` is a local path), a pipeline folder (its `vae/`, if any, is named), a folder of another model class, or a
    VAE folder whose config does not fit its weights (`folder_checks.check_folder_matches_config`). A Hub repo id is
    left to diffusers.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: naming the path and what to give instead.
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        raise NotADirectoryError(
            f"--vae {source} is a file: give the {VAE_CLASS} folder (with config.json and "
            f"diffusion_pytorch_model.safetensors), {_EXAMPLE}."
        )
    if not os.path.isdir(source):
        if _HUB_REPO_ID.fullmatch(source) and not source.startswith("."):
            return
        raise FileNotFoundError(
            f"--vae {source}: there is no such folder (and it is not a Hub repo id, org/name). Give the {VAE_CLASS} "
            f"folder, {_EXAMPLE}."
        )
    if os.path.isfile(os.path.join(source, "model_index.json")):
        vae = os.path.join(source, "vae")
        has_vae = os.path.isdir(vae)
        raise ValueError(
            f"--vae {source} is a pipeline folder; "
            + (
                f"its VAE is {vae}: pass that."
                if has_vae
                else f"it has no vae/ folder. Give the {VAE_CLASS}, {_EXAMPLE}."
            )
        )
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--vae {source} has no config.json: it is not an {VAE_CLASS} folder ({_EXAMPLE}).")
    with open(config_path, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    if class_name != VAE_CLASS:
        raise ValueError(
            f"--vae {source} holds a {class_name} (its config.json), not an {VAE_CLASS}: give the VAE the model was "
            f"trained with, {_EXAMPLE}."
        )
    from diffusers import AutoencoderKL

    check_folder_matches_config(AutoencoderKL, source)


def load_vae(source: str):
    """`AutoencoderKL.from_pretrained(source)` after `check_vae_source`."""
    from diffusers import AutoencoderKL

    check_vae_source(source)
    return AutoencoderKL.from_pretrained(source)
