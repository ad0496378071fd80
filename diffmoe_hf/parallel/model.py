"""A model with only this rank's experts: building it, switching it to the expert-parallel dispatch, loading full
(single-process) weights into it, and gathering them back into one full state dict."""

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..models.moe import expert_banks, expert_block, holding_experts
from .mesh import ExpertParallelMesh


def check_expert_parallel_size(model: nn.Module, expert_parallel_size: int) -> None:
    """
    Raises a `ValueError` naming the numbers unless K = `expert_parallel_size` divides every MoE layer's expert
    count, or when `model` (any device, e.g. meta) has no MoE layer at all.
    """
    banks = expert_banks(model)
    if not banks:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} needs a model with MoE layers; {type(model).__name__} of "
            "this configuration has none."
        )
    for name, bank in banks:
        if bank.num_experts % expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size={expert_parallel_size} must divide the expert count of every MoE layer; "
                f"{name} has {bank.num_experts} experts."
            )


def model_outline(source: str, subfolder: str | None = None, **load_kwargs) -> nn.Module:
    """
    The model whose `config.json` is at `source` (a folder or Hub repo id; in `subfolder`, e.g. a pipeline's
    `"transformer"`), built on the meta device from its config alone: no weights are read, so its expert counts can be
    checked (`check_expert_parallel_size`) before any expensive work. `load_kwargs` go to `load_config` (`revision`,
    `cache_dir`, ...).

    Raises:
        ValueError: when the config names a class diffusers does not know.
    """
    import diffusers

    config = diffusers.AutoModel.load_config(source, subfolder=subfolder, **load_kwargs)
    model_class = getattr(diffusers, config.get("_class_name") or "", None)
    if model_class is None:
        raise ValueError(f"{source}: its model class {config.get('_class_name')!r} is not one diffusers knows.")
    with torch.device("meta"):
        return model_class.from_config(config)


def build_expert_parallel_model(build: Callable[[], nn.Module], mesh: ExpertParallelMesh) -> nn.Module:
    """`build()` with only this rank's experts in every bank (the others are never built), expert-parallel
    (`enable_expert_parallel`)."""
    with holding_experts(mesh.expert_rank, mesh.expert_size):
        model = build()
    return enable_expert_parallel(model, mesh)


def enable_expert_parallel(model: nn.Module, mesh: ExpertParallelMesh) -> nn.Module:
    """
    Makes a model built with this rank's experts (`build_expert_parallel_model`) run expert-parallel: its banks use the
    `"expert_parallel"` backend over `mesh.expert_group`, and its routing statistics and auxiliary losses describe
    the tokens of all ranks (every module with a `statistics_group`). Returns `model`.

    Raises:
        ValueError: when a bank does not hold exactly this rank's experts (built outside `holding_experts`, or for
            another K), or the model has no MoE layer.
    """
    check_expert_parallel_size(model, mesh.expert_size)
    for name, bank in expert_banks(model):
        expected = expert_block(bank.num_experts, mesh.expert_rank, mesh.expert_size)
        if bank.expert_ids != expected:
            raise ValueError(
                f"{name} holds experts {list(bank.expert_ids)}, but expert-parallel rank {mesh.expert_rank} of "
                f"{mesh.expert_size} holds {list(expected)}: build the model with build_expert_parallel_model."
            )
        bank.expert_backend = "expert_parallel"
        bank.expert_parallel_group = mesh.expert_group
    for module in model.modules():
        if hasattr(module, "statistics_group"):
            module.statistics_group = dist.group.WORLD
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in `model.named_parameters()`) of the parameters that live in expert banks."""
    return [
        f"{name}.{parameter_name}"
        for name, bank in expert_banks(model)
        for parameter_name, _ in bank.named_parameters()
    ]


def load_local_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """
    Loads the entries of a full (single-process) `state_dict` that this rank's model holds: every non-expert tensor
    and this rank's experts, found under their global names. A tensor of `model` missing from `state_dict` raises
    (`load_state_dict(strict=True)`); the other ranks' experts are skipped.
    """
    model.load_state_dict({name: state_dict[name] for name in model.state_dict() if name in state_dict})


def gather_full_state_dict(model: nn.Module, mesh: ExpertParallelMesh) -> dict[str, torch.Tensor] | None:
    """
    The full (single-process) state dict of an expert-parallel `model` on rank 0, `None` on the other ranks: rank 0's
    own tensors (FSDP2-sharded ones gathered whole) plus the experts of the other ranks of its expert group (on the
    CPU; rank 0's own CPU tensors are not copied, so they may share memory with `model`). Every rank must call it.
    """
    experts = set(expert_parameter_names(model))
    state = {  # FSDP2's shards of the non-expert weights gathered whole (a collective)
        name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        for name, tensor in model.state_dict().items()
    }
    in_first_replica = dist.get_rank() < mesh.expert_size
    local_experts = {name: tensor.detach().cpu() for name, tensor in state.items() if name in experts}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local_experts if in_first_replica else {}, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    full = {name: tensor.detach().cpu() for name, tensor in state.items()}
    for rank_experts in gathered:
        full.update(rank_experts)
    return full
