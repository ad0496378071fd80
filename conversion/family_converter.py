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


def deepseek_moe_config(config, model_name: str) -> dict:
    """
    The `MoE_config` / `moe_config` fields the EfficientMoE code (DSMoE and JiTMoE) builds its DeepSeek-style experts
    from, for a diffmoe_hf `config`: expert count and width, top-k, groups, scaling and whether a shared expert exists.

    Raises:
        ValueError: for a shared expert of another width than a routed one, which `model_name` cannot express.
    """
    shared = config["shared_expert_intermediate_size"]
    if shared not in (0, config["moe_intermediate_size"]):
        raise ValueError(f"The original {model_name}'s shared expert is as wide as a routed one (or absent).")
    return dict(
        num_experts=config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        moe_intermediate_size=config["moe_intermediate_size"],
        n_group=config["n_group"],
        topk_group=config["topk_group"],
        routed_scaling_factor=float(config["routed_scaling_factor"]),
        use_shared_expert=shared > 0,
    )
