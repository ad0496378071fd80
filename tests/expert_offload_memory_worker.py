"""Run by `test_expert_offload` in its own process: builds a DiT-MoE whose experts are far larger than the memory
limit with the disk tier (`benchmarks.streamed_models`, bank after bank), samples one step of the pipeline, and prints
the expert bytes and the measured peaks of anonymous memory (`benchmarks.process_memory`) as one JSON line.

Usage: python -m tests.expert_offload_memory_worker OFFLOAD_DIR
"""

import gc
import json
import sys

import torch

from benchmarks.process_memory import PeakMemory
from benchmarks.streamed_models import streamed_model
from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.conversion.low_memory import init_empty_model
from diffmoe_hf.families import get_family
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.models.moe.offload import plan_expert_offload
from tests.helpers import tiny_vae


# 2 banks of 16 experts of width 8192 on 32-wide tokens: 2 x 16 x 3 x 32 x 8192 x 4 B = 96 MiB of experts
LARGE_EXPERTS = dict(num_layers=2, num_experts=16, moe_intermediate_size=8192)


def main(offload_dir: str) -> None:
    family = get_family("dit-moe")
    config = family.tiny_config("rectified-flow", **LARGE_EXPERTS)
    plan = plan_expert_offload(init_empty_model(family.model_class, **config), "disk")
    with PeakMemory() as building:
        transformer = streamed_model(family.model_class, config, "disk", offload_dir)
        gc.collect()
    pipe = ClassConditionalMoEPipeline(
        transformer=transformer,
        scheduler=get_formulation(transformer.config.formulation).default_scheduler(),
        vae=tiny_vae(),
    )
    pipe.set_progress_bar_config(disable=True)
    gc.collect()
    with PeakMemory() as sampling:
        images = pipe(class_labels=[0, 1], num_inference_steps=1, output_type="np").images
    bank = plan.expert_bytes // config["num_layers"]
    record = dict(
        expert_bytes=plan.expert_bytes,
        bank_bytes=bank,
        building_anon_increase=building.peak_anon - building.start["RssAnon"],
        sampling_anon_increase=sampling.peak_anon - sampling.start["RssAnon"],
        finite=bool(torch.isfinite(torch.from_numpy(images)).all()),
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
