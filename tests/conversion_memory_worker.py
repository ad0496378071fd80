"""Run by `test_streamed_conversion` in its own process: writes an original float16 DiT-MoE checkpoint (`torch.save`
zip format) many shards large, converts it to float32 safetensors shards, and prints the checkpoint, shard and
largest-tensor sizes, the measured peak of anonymous memory during the conversion (`benchmarks.process_memory`) and
whether the saved weights are the checkpoint's, cast to float32, as one JSON line.

Usage: python -m tests.conversion_memory_worker FOLDER
"""

import gc
import json
import os
import sys

import torch

from benchmarks.process_memory import PeakMemory
from diffmoe_hf.conversion.convert import convert_checkpoint
from diffmoe_hf.families import get_family


# 2 banks of 16 experts of width 8192 on 32-wide tokens: 48 MiB of float16 experts, 96 MiB once saved in float32
LARGE_EXPERTS = dict(num_layers=2, num_experts=16, moe_intermediate_size=8192)
SHARD_BYTES = 8 * 10**6


def main(folder: str) -> None:
    family = get_family("dit-moe")
    model = family.tiny_model("rectified-flow", **LARGE_EXPERTS).half()
    arguments = family.load_converter().write_original(model, os.path.join(folder, "original"))
    largest = max(p.numel() for p in model.parameters())
    gc.collect()
    with PeakMemory() as converting:
        convert_checkpoint(
            "dit-moe",
            output_dir=os.path.join(folder, "converted"),
            dtype="fp32",
            max_shard_size=SHARD_BYTES,
            **arguments,
        )
    converted = family.model_class.from_pretrained(os.path.join(folder, "converted", "transformer"))
    expected = model.float().state_dict()
    record = dict(
        checkpoint_bytes=os.path.getsize(arguments["checkpoint_path"]),
        shard_bytes=SHARD_BYTES,
        largest_tensor_bytes=largest * torch.float32.itemsize,
        shards=len(
            [
                name
                for name in os.listdir(os.path.join(folder, "converted", "transformer"))
                if name.endswith(".safetensors")
            ]
        ),
        converting_anon_increase=converting.peak_anon - converting.start["RssAnon"],
        weights_equal=all(torch.equal(tensor, expected[name]) for name, tensor in converted.state_dict().items()),
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
