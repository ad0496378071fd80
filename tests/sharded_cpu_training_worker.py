"""Runs `train_class_conditional.main` under accelerate's FSDP2 or DeepSpeed on CPU processes (gloo), for tests.

Launch it with `accelerate launch --config_file training/configs/<fsdp or deepspeed config> --num_processes 2 ...`
(for DeepSpeed with `DS_ACCELERATOR=cpu`, and without `ACCELERATE_USE_CPU`). accelerate (1.16) enables neither engine
for CPU processes: `AcceleratorState` turns FSDP on only for accelerator device types (MULTI_GPU, MULTI_XPU, ...) and
DeepSpeed only when `cpu` is false, and without `cpu` and without GPUs it sets up no process group at all. Both
engines themselves run on CPU with gloo (torch's FSDP2 `fully_shard`; DeepSpeed's CPU accelerator). This worker sets
up accelerate's CPU state (gloo process group, ranks) before the script builds its `Accelerator`, and for FSDP marks it
multi-GPU, so that accelerate's own FSDP2 / DeepSpeed code (wrapping, sharded checkpoints, gathering the final weights)
runs on CPU.
"""

import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from diffmoe_hf.training import train_class_conditional as script


if __name__ == "__main__":
    state = PartialState(cpu=True)
    assert state.num_processes > 1 and state.distributed_type == DistributedType.MULTI_CPU, state
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        state.distributed_type = DistributedType.MULTI_GPU
    script.main(script.parse_args(sys.argv[1:]))
