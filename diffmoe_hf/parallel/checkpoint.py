"""Checkpoints of an expert-parallel model and its optimizer that load at any expert-parallel size.

Every rank saves what it holds with `torch.distributed.checkpoint` (DCP), keyed by global names: `model.<name>` for
the model's tensors, `optimizer.<parameter name>.<state>` for the optimizer state (e.g. AdamW's `exp_avg`,
`exp_avg_sq`, `step`) and `optimizer_group.<i>.<hyperparameter>`. An expert is a whole tensor under its global name
(`...experts.{e}...`), saved once however many replicas hold it, so a rank of any other K (1 included: a
single-process model) loads exactly the tensors it holds: resharding is reading other keys.
"""

import torch
import torch.distributed.checkpoint as dcp
from torch import nn


def _checkpoint_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The entries of this rank, keyed by global names (a fresh optimizer's state is allocated first)."""
    names = {parameter: name for name, parameter in model.named_parameters()}
    _allocate_optimizer_state(optimizer)
    entries = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    for parameter, values in optimizer.state.items():
        entries.update({f"optimizer.{names[parameter]}.{key}": value for key, value in values.items()})
    for index, group in enumerate(optimizer.param_groups):
        entries.update({f"optimizer_group.{index}.{key}": value for key, value in group.items() if key != "params"})
    return entries


def save_expert_parallel_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Saves `model` and `optimizer` (unwrapped: no DDP, no accelerate wrapper) into the folder `path`; every rank of
    the default process group must call it."""
    dcp.save(_checkpoint_entries(model, optimizer), checkpoint_id=path)


def load_expert_parallel_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads, in place, the tensors this rank's `model` and `optimizer` hold from a checkpoint saved at any K; every
    rank must call it."""
    entries = _checkpoint_entries(model, optimizer)
    dcp.load(entries, checkpoint_id=path)  # tensors in place; the hyperparameters replaced in `entries`
    for index, group in enumerate(optimizer.param_groups):
        group.update({key: entries[f"optimizer_group.{index}.{key}"] for key in group if key != "params"})


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
