"""What a family's converter module declares: `FamilyConverter`, named by the family's registration."""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import yaml


@dataclass(frozen=True)
class FamilyConverter:
    """
    How to turn one family's original checkpoints into a transformer, and back.

    Args:
        build: `build(checkpoint, config_path=, preset=, **options) -> transformer`, where `checkpoint` is a
            `LoadedCheckpoint` and `options` are the family's own keyword arguments (e.g. the spatial-temporal-moe
            family's `num_experts`, `experts_per_token`, `formulation`).
        model_card: The fields of the family's model card (`model_card.render_model_card`).
        write_original: `write_original(model, folder) -> dict`, the inverse of `build`: writes `model` as the
            original code saves it (a checkpoint and, where the checkpoint does not record the architecture, the
            original config file) into `folder` and returns the `convert_checkpoint` keyword arguments that convert
            it back (`checkpoint_path`, `config_path`, family options). The tests convert every family's tiny model
            with it.
    """

    build: Callable
    model_card: dict
    write_original: Callable


def write_original_files(folder: str, state_dict: dict, config: dict | None = None) -> dict:
    """
    Saves `state_dict` as the EMA weights of `folder/checkpoint.pt` and `config`, when given, as `folder/config.yaml`.
    Returns the `checkpoint_path` / `config_path` arguments of `convert_checkpoint`.
    """
    os.makedirs(folder, exist_ok=True)
    paths = {"checkpoint_path": os.path.join(folder, "checkpoint.pt")}
    torch.save({"ema": state_dict}, paths["checkpoint_path"])
    if config is not None:
        paths["config_path"] = os.path.join(folder, "config.yaml")
        with open(paths["config_path"], "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
    return paths
