"""Checkpoints of an expert-parallel model, its optimizer and its EMA that load at any expert-parallel size.

Every rank saves what it holds with `torch.distributed.checkpoint` (DCP), keyed by global names: `model.<name>` for
the model's tensors, `optimizer.<parameter name>.<state>` for the optimizer state (e.g. AdamW's `exp_avg`,
`exp_avg_sq`, `step`), `optimizer_group.<i>.<hyperparameter>`, and with an EMA (diffusers' `EMAModel` of the model's
parameters) `ema.<parameter name>` for its averages and `ema_state.optimization_step`. An expert is a whole tensor
under its global name (`...experts.{e}...`), saved once however many replicas hold it, so a rank of any other K (1
included: a single-process model) loads exactly the tensors it holds: resharding is reading other keys.
"""

from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch import nn


if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


def _checkpoint_entries(model: nn.Module, optimizer: torch.optim.Optimizer, ema: "EMAModel | None") -> dict:
    """The entries of this rank, keyed by global names (a fresh optimizer's state is allocated first)."""
    named_parameters = list(model.named_parameters())
    names = {parameter: name for name, parameter in named_parameters}
    _allocate_optimizer_state(optimizer)
    entries = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    for parameter, values in optimizer.state.items():
        entries.update({f"optimizer.{names[parameter]}.{key}": value for key, value in values.items()})
    for index, group in enumerate(optimizer.param_groups):
        entries.update({f"optimizer_group.{index}.{key}": value for key, value in group.items() if key != "params"})
    if ema is not None:  # its averages follow `model.parameters()`, from which it was made
        if len(ema.shadow_params) != len(named_parameters):
            raise ValueError(f"The EMA holds {len(ema.shadow_params)} tensors, the model {len(named_parameters)}.")
        entries.update({f"ema.{name}": average for (name, _), average in zip(named_parameters, ema.shadow_params)})
        entries["ema_state.optimization_step"] = ema.optimization_step
    return entries


def save_expert_parallel_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: "EMAModel | None" = None
) -> None:
    """Saves `model` and `optimizer` (unwrapped: no DDP, no accelerate wrapper), and `ema` if given, into the folder
    `path`; every rank of the default process group must call it."""
    dcp.save(_checkpoint_entries(model, optimizer, ema), checkpoint_id=path)


def load_expert_parallel_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: "EMAModel | None" = None
) -> None:
    """Loads, in place, the tensors this rank's `model` and `optimizer` (and `ema`, which the checkpoint must hold)
    hold from a checkpoint saved at any K; every rank must call it."""
    entries = _checkpoint_entries(model, optimizer, ema)
    dcp.load(entries, checkpoint_id=path)  # tensors in place; the other values replaced in `entries`
    for index, group in enumerate(optimizer.param_groups):
        group.update({key: entries[f"optimizer_group.{index}.{key}"] for key in group if key != "params"})
    if ema is not None:
        ema.optimization_step = entries["ema_state.optimization_step"]


@torch.no_grad()
def _allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the state of parameters that have none yet, by one step with zero gradients and learning rate 0, so
    that a checkpoint can be loaded into it in place; the weights and the existing state are unchanged."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    fresh = {id(parameter) for parameter in parameters if not optimizer.state.get(parameter)}
    if not fresh:
        return
    saved_gradients = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter) if id(parameter) in fresh else None
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, learning_rate in zip(optimizer.param_groups, learning_rates):
        group["lr"] = learning_rate
    for parameter, gradient in zip(parameters, saved_gradients):
        parameter.grad = gradient
