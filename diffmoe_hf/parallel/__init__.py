"""Expert parallelism on PyTorch's distributed engine: each rank holds only its block of every MoE layer's experts,
and the routed rows travel to the experts (two `all_to_all` exchanges per MoE layer), while the other weights stay
data-parallel.

- `mesh`: the (data x expert) `DeviceMesh` of the ranks and its process groups.
- `model`: building a model with only this rank's experts, switching its banks to the `"expert_parallel"` backend
  (`diffmoe_hf.models.moe.layers.expert_parallel`), loading a full state dict into it and gathering one from it.
- `checkpoint`: model and optimizer checkpoints keyed by global names (`torch.distributed.checkpoint`), loadable
  at any expert-parallel size.
- `gradients`: the experts' gradients averaged over their replicas, and the global gradient norm.
- `sharding`: FSDP2 on the non-expert weights (sharded over all ranks), the experts left whole.

The model files are the same for every parallelism: the experts a bank builds (`holding_experts`) and the way it
runs them (`expert_backend`) are the only switches.
"""

from .checkpoint import load_expert_parallel_checkpoint, save_expert_parallel_checkpoint
from .gradients import clip_grad_norm_, reduce_expert_gradients
from .mesh import ExpertParallelMesh, check_expert_parallel_processes, expert_parallel_mesh
from .model import (
    build_expert_parallel_model,
    check_expert_parallel_size,
    enable_expert_parallel,
    expert_banks,
    expert_parameter_names,
    gather_full_state_dict,
    load_local_state_dict,
    model_outline,
)
from .sharding import shard_non_experts, unsharded_class
