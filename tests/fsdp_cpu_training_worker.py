"""Runs `train_class_conditional.main` under accelerate's FSDP2 on CPU processes (gloo), for tests.

accelerate (1.16) turns its FSDP settings on only for accelerator devices (`AcceleratorState` enables FSDP for
MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU), although torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo. This
worker marks the CPU state as multi-GPU before the script builds its `Accelerator`, so that accelerate's own FSDP2
path (wrapping, sharded checkpoints, gathering the final weights) runs on CPU. Launch it with
`ACCELERATE_USE_CPU=true accelerate launch --config_file training/configs/fsdp.yaml --num_processes 2 ...`.
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from diffmoe_hf.training import train_class_conditional as script

if __name__ == "__main__":
    state = PartialState(cpu=True)  # MULTI_CPU on gloo
    assert state.num_processes > 1 and state.distributed_type == DistributedType.MULTI_CPU, state
    state.distributed_type = DistributedType.MULTI_GPU
    script.main(script.parse_args(sys.argv[1:]))
