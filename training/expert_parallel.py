"""What `--expert_parallel_size K` adds to train_class_conditional.py (DDP processes, K of them per expert group).

- The transformer is built and loaded with only this rank's E/K experts per MoE layer (`holding_experts`), its banks
  exchange rows over the expert group (`diffmoe_hf.parallel`), and its routing statistics and auxiliary losses are
  those of the global batch. With K = 1 every rank holds every expert and nothing is exchanged; only the checkpoint
  format below and the gradient path differ from a run without the option.
- DDP reduces the non-expert gradients; the experts are left out of DDP and their gradients are summed over their
  replicas and divided by the number of processes (`reduce_expert_gradients`); the gradient norm is the global one.
- Checkpoints: the model, optimizer state and hyperparameters are saved by every rank with
  `torch.distributed.checkpoint` into `<checkpoint>/expert_parallel`, keyed by the global parameter names
  (`diffmoe_hf.parallel.checkpoint`), so a checkpoint loads at any K. accelerate keeps saving the scheduler, the data
  position and the random states; the optimizer is taken out of its care.
- The final export gathers the experts on the main process into an ordinary diffusers folder.
"""

import os

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffmoe_hf.cli import CommandError
from diffmoe_hf.models.moe import holding_experts
from diffmoe_hf.parallel import (
    check_expert_parallel_processes,
    check_expert_parallel_size,
    clip_grad_norm_,
    enable_expert_parallel,
    expert_parallel_mesh,
    expert_parameter_names,
    gather_full_state_dict,
    load_expert_parallel_checkpoint,
    reduce_expert_gradients,
    save_expert_parallel_checkpoint,
)


CHECKPOINT_FOLDER = "expert_parallel"


def check_expert_parallel_arguments(args, num_processes: int, native_checkpoints: bool) -> None:
    """Refuses, before any work, what expert parallelism does not support, naming the numbers (exit status 2)."""
    try:
        check_expert_parallel_processes(args.expert_parallel_size, num_processes, "--expert_parallel_size")
    except ValueError as error:
        raise CommandError(str(error)) from None
    if native_checkpoints:
        raise CommandError("--expert_parallel_size runs on DDP processes: launch without an FSDP or DeepSpeed config.")
    for option in ("use_lora", "use_ema"):
        if getattr(args, option):
            raise CommandError(f"--{option} is not supported with --expert_parallel_size yet.")
    if args.mixed_precision == "fp16":
        raise CommandError("--expert_parallel_size supports --mixed_precision no or bf16, not fp16.")


class ExpertParallelTraining:
    """The expert-parallel parts of one training run; every rank builds one."""

    def __init__(self, expert_parallel_size: int, device_type: str):
        try:
            self.mesh = expert_parallel_mesh(expert_parallel_size, device_type)
        except ValueError as error:
            raise CommandError(f"--expert_parallel_size: {error}") from None

    def building(self):
        """Context in which the transformer is built or loaded: only this rank's experts are created."""
        return holding_experts(self.mesh.expert_rank, self.mesh.expert_size)

    def prepare(self, transformer: nn.Module) -> None:
        """Checks the model, switches it to expert parallelism and keeps its experts out of DDP (before `prepare`)."""
        try:
            check_expert_parallel_size(transformer, self.mesh.expert_size)
        except ValueError as error:
            raise CommandError(f"--expert_parallel_size: {error}") from None
        enable_expert_parallel(transformer, self.mesh)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            transformer, expert_parameter_names(transformer)
        )

    def finish_gradients(self, model: nn.Module, max_grad_norm: float) -> None:
        """After the backward of a synchronising step: the experts' average, then the global gradient clipping."""
        reduce_expert_gradients(model, self.mesh)
        if max_grad_norm > 0:
            clip_grad_norm_(model, self.mesh, max_grad_norm)

    def save(self, directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Saves the model and optimizer of every rank into `directory/expert_parallel` (every rank must call it)."""
        save_expert_parallel_checkpoint(os.path.join(directory, CHECKPOINT_FOLDER), model, optimizer)

    def load(self, directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Loads what this rank holds from a checkpoint saved at any K (every rank must call it)."""
        path = os.path.join(directory, CHECKPOINT_FOLDER)
        if not os.path.isdir(path):
            raise CommandError(
                f"{directory} was not saved with --expert_parallel_size, so it cannot be resharded: resume it without "
                "the option, or start from its exported folder with --pretrained_model_name_or_path."
            )
        load_expert_parallel_checkpoint(path, model, optimizer)

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """A single-process copy of `model` with every expert on the main process (`None` elsewhere)."""
        state = gather_full_state_dict(model, self.mesh)
        if state is None:
            return None
        with init_empty_weights(include_buffers=False):  # parameters on meta, then the gathered tensors adopted
            full = type(model).from_config(model.config)
        full.load_state_dict(state, assign=True)
        return full.eval()
