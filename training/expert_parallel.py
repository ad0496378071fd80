"""What `--expert_parallel_size K` adds to train_class_conditional.py (DDP processes, K of them per expert group).

- The transformer is built and loaded with only this rank's E/K experts per MoE layer (`holding_experts`), its banks
  exchange rows over the expert group (`diffmoe_hf.parallel`), and its routing statistics and auxiliary losses are
  those of the global batch. With K = 1 every rank holds every expert and nothing is exchanged; only the checkpoint
  format below and the gradient path differ from a run without the option.
- The non-expert weights are replicated, their gradients reduced by DDP (`--non_expert_parallel ddp`), or sharded
  over all ranks by FSDP2 (`fsdp2`, `diffmoe_hf.parallel.shard_non_experts`; accelerate then does not wrap the
  model); the experts are left out of either, their gradients summed over their replicas and divided by the number
  of processes (`reduce_expert_gradients`); the gradient norm is the global one.
- LoRA adapters on experts live in the banks with their experts (peft wraps each local expert's projections), so they
  are expert parameters like the weights they adapt; an EMA (`--use_ema`) averages each rank's own parameters.
- Checkpoints: the model (with its LoRA layers), optimizer state and hyperparameters, and the EMA, are saved by every
  rank with `torch.distributed.checkpoint` into `<checkpoint>/expert_parallel`, keyed by the global parameter names
  (`diffmoe_hf.parallel.checkpoint`), so a checkpoint loads at any K. accelerate keeps saving the scheduler, the data
  position and the random states; the optimizer is taken out of its care.
- The final export gathers the experts (the EMA weights with `--use_ema`; the adapters of a LoRA run) on the main
  process into a single-process model, which the script saves as it saves a run without the option.
"""

import copy
import os

import torch
from accelerate import init_empty_weights
from diffusers.training_utils import EMAModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffmoe_hf.cli import CommandError
from diffmoe_hf.models.moe import expert_rank_seed, holding_experts
from diffmoe_hf.parallel import (
    check_expert_parallel_processes,
    check_expert_parallel_size,
    clip_grad_norm_,
    enable_expert_parallel,
    expert_banks,
    expert_parallel_mesh,
    expert_parameter_names,
    gather_full_state_dict,
    load_expert_parallel_checkpoint,
    reduce_expert_gradients,
    save_expert_parallel_checkpoint,
    shard_non_experts,
    unsharded_class,
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
    if args.mixed_precision == "fp16":
        raise CommandError("--expert_parallel_size supports --mixed_precision no or bf16, not fp16.")


class ExpertParallelTraining:
    """The expert-parallel parts of one training run; every rank builds one.

    Args:
        non_expert_parallel: `"ddp"` (the non-expert weights replicated, reduced by accelerate's DDP) or `"fsdp2"`
            (sharded over all ranks by `fully_shard`, one unit per transformer block and one for the rest; the model
            is then not handed to accelerate's `prepare`).
    """

    def __init__(self, expert_parallel_size: int, non_expert_parallel: str, device_type: str):
        try:
            self.mesh = expert_parallel_mesh(expert_parallel_size, device_type)
        except ValueError as error:
            raise CommandError(f"--expert_parallel_size: {error}") from None
        self.shards_non_experts = non_expert_parallel == "fsdp2"
        self.device_type = device_type

    def building(self):
        """Context in which the transformer is built or loaded: only this rank's experts are created."""
        return holding_experts(self.mesh.expert_rank, self.mesh.expert_size)

    def check_model(self, transformer: nn.Module) -> None:
        """A `CommandError` naming the numbers unless K divides every MoE layer's expert count of `transformer` (any
        device: the meta device's outline is checked before any work)."""
        try:
            check_expert_parallel_size(transformer, self.mesh.expert_size)
        except ValueError as error:
            raise CommandError(f"--expert_parallel_size: {error}") from None

    def prepare(self, transformer: nn.Module) -> None:
        """Checks the model and switches it to expert parallelism (right after it is built or loaded)."""
        self.check_model(transformer)
        enable_expert_parallel(transformer, self.mesh)

    @torch.no_grad()
    def draw_expert_adapters(self, transformer: nn.Module) -> None:
        """Draws the new LoRA adapters of this rank's experts again, from the rank's own random stream
        (`expert_rank_seed`): every rank adds its adapters from the same random state, so rank r > 0's would copy
        rank 0's. peft's own initialisation, as configured; the other adapters stay the same on every rank."""
        from peft.tuners.lora import LoraLayer

        if self.mesh.expert_rank == 0:
            return
        with torch.random.fork_rng():
            torch.manual_seed(expert_rank_seed(self.mesh.expert_rank))
            for _, bank in expert_banks(transformer):
                for module in bank.modules():
                    if isinstance(module, LoraLayer):
                        for adapter_name, config in transformer.peft_config.items():
                            module.reset_lora_parameters(adapter_name, config.init_lora_weights)

    def distribute(self, transformer: nn.Module) -> None:
        """
        Once the model's parameters are final (LoRA layers added, dtypes set), before an optimizer or EMA is made of
        them: keeps every parameter of the expert banks (a LoRA adapter on an expert included) out of DDP, whose
        constructor would otherwise copy rank 0's values into every rank and average the gradients of different
        experts; or, with `"fsdp2"`, shards the other parameters over all ranks and leaves the banks whole.
        """
        if self.shards_non_experts:
            shard_non_experts(transformer, self.device_type)
        else:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                transformer, expert_parameter_names(transformer)
            )

    def finish_gradients(self, model: nn.Module, max_grad_norm: float) -> None:
        """After the backward of a synchronising step: the experts' average, then the global gradient clipping."""
        reduce_expert_gradients(model, self.mesh)
        if max_grad_norm > 0:
            clip_grad_norm_(model, self.mesh, max_grad_norm)

    def save(self, directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMAModel | None) -> None:
        """Saves the model, optimizer and EMA of every rank into `directory/expert_parallel` (every rank must call
        it)."""
        save_expert_parallel_checkpoint(os.path.join(directory, CHECKPOINT_FOLDER), model, optimizer, ema)

    def load(self, directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMAModel | None) -> None:
        """Loads what this rank holds from a checkpoint saved at any K (every rank must call it; the checkpoint's
        marker was checked to record this layout and the same `--use_ema`)."""
        load_expert_parallel_checkpoint(os.path.join(directory, CHECKPOINT_FOLDER), model, optimizer, ema)

    def full_model(self, model: nn.Module, ema: EMAModel | None) -> nn.Module | None:
        """
        A single-process copy of `model` with every expert, and its LoRA adapters, on the main process (`None`
        elsewhere); with `ema`, the copy holds the EMA weights (`model` keeps its own). Every rank must call it.
        """
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        state = gather_full_state_dict(model, self.mesh)
        if ema is not None:
            if state is not None:  # CPU tensors of the main process are gathered without a copy
                state = {name: tensor.clone() for name, tensor in state.items()}
            ema.restore(model.parameters())
        if state is None:
            return None
        with init_empty_weights(include_buffers=False):  # parameters on meta, then the gathered tensors adopted
            full = unsharded_class(model).from_config(model.config)
            for adapter_name, adapter_config in getattr(model, "peft_config", {}).items():
                full.add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)
        full.load_state_dict(state, assign=True)
        return full.eval()
