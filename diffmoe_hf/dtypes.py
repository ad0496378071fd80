"""The short dtype names of the command lines and scripts (`--dtype fp32|fp16|bf16`, accelerate's mixed precision)."""

import torch


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
