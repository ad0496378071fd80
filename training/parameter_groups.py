"""What a training run changes: the parameters of a transformer (any family) sorted into groups by their module
names, the routers trained or frozen, and the table the training script prints at start."""

import re

from torch import nn


# the router-like modules of the families: token routers and DiffMoE's (Shi et al.) capacity predictor
ROUTER_PATTERN = re.compile(r"\.ff\.(router|gate|capacity_predictor)\.")
GROUPS = (
    "class embedding",
    "other embeddings",
    "attention",
    "experts",
    "shared experts",
    "routers",
    "dense feed-forward",
    "modulation, norms, output",
)


def parameter_group(name: str) -> str:
    """The group (one of `GROUPS`) of the parameter `name` of a transformer, LoRA parameters (`...lora_A...`)
    counted with the layer they adapt."""
    if name.startswith("embedding.class_embedder."):
        return "class embedding"
    if name.startswith(("embedding.", "pos_embed.", "in_context_pos_embed")):
        return "other embeddings"
    if ".attn." in name and ".attn.norm_" not in name:
        return "attention"
    if ROUTER_PATTERN.search(name):
        return "routers"
    if ".ff.shared_experts." in name:
        return "shared experts"
    if ".ff.experts." in name or ".ff.recalibration." in name:  # Diff-MoE's (Cheng et al.) recalibration of experts
        return "experts"
    if ".ff." in name:
        return "dense feed-forward"
    return "modulation, norms, output"


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every router-like module of `model` (see `ROUTER_PATTERN`)."""
    return [parameter for name, parameter in model.named_parameters() if parameter_group(name) == "routers"]


def trainable_parameter_table(model: nn.Module) -> str:
    """
    A text table of `model`'s parameters by group: how many are trained and how (in full, or through LoRA adapters)
    next to the group's size in the base model. Groups the model lacks are left out.
    """
    base, full, lora = {}, {}, {}
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        if "lora_" in name:
            lora[group] = lora.get(group, 0) + parameter.numel() * parameter.requires_grad
            continue
        base[group] = base.get(group, 0) + parameter.numel()
        full[group] = full.get(group, 0) + parameter.numel() * parameter.requires_grad
    rows = [("group", "parameters", "trained in full", "LoRA (trained)")]
    for group in GROUPS:
        if group in base:
            rows.append((group, f"{base[group]:,}", f"{full[group]:,}", f"{lora.get(group, 0):,}"))
    rows.append(
        ("total", f"{sum(base.values()):,}", f"{sum(full.values()):,}", f"{sum(lora.values()):,}"),
    )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    )
