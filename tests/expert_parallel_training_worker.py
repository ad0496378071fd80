"""Runs train_class_conditional.py several times in the same CPU processes (gloo), for
tests/test_expert_parallel_training.py: `torchrun --standalone --nproc_per_node 2 -m
tests.expert_parallel_training_worker two <pretrained pipeline> <image folder> <output root> <DiffMoE pipeline>`, or
with 4 processes `... four <pretrained pipeline> <image folder> <output root> <collapsed DSMoE pipeline>`.

Every run trains the tiny DiT-MoE for 5 steps of 2 accumulated batches of 2 per process, with gradient checkpointing,
into `<output root>/<name>`. With 2 processes:

- `ep1`: `--expert_parallel_size 1` (every rank holds every expert), checkpoint at step 3;
- `ep2`: K = 2, checkpoint at step 3; `ep2-resumed`: K = 2 from `ep2`'s step 3;
- `ep1-from-ep2`: K = 1 from `ep2`'s step 3; `ep2-from-ep1`: K = 2 from `ep1`'s step 3;
- `ddp`: without the option, 1 step and its checkpoint; `ep2-from-ddp`: K = 2 from it, which must be refused;
  `three-experts`: K = 2 on a model with 3 experts per layer, which must be refused before the data is read; and
  `sample-dense`: `diffmoe sample --expert-parallel-size 2` of a dense JiT pipeline, refused before its weights are
  read (the messages and the exit status go to `<output root>/refused.json`, the CLI's message to stderr);
- LoRA (rank 4 on attention, experts and shared experts): `lora1` at K = 1, checkpoint at step 3; `lora2-from-lora1`:
  K = 2 from it, checkpoint at step 4; `lora2-resumed`: K = 2 from that; `lora2-fresh`: one step at K = 2 from new
  adapters;
- EMA: `ema-ddp` without the option; `ema1` at K = 1, checkpoint at step 3; `ema2-from-ema1`: K = 2 from it, checkpoint
  at step 4; `ema2-resumed`: K = 2 from that;
- FSDP2 on the non-expert weights (`--non_expert_parallel fsdp2`) at K = 2: `fsdp2`, checkpoint at step 3;
  `fsdp2-resumed` from it; `ep1-from-fsdp2`: K = 1 with DDP from it; `lora2-fsdp2-from-lora1` and
  `ema2-fsdp2-from-ema1`: from `lora1`'s and `ema1`'s step 3;
- bf16 mixed precision: `bf16-2` at K = 2, checkpoint at step 3; `bf16-2-resumed`: K = 2 from it.

Then `diffmoe sample` (6 samples in batches of 2, 2 steps, float pixels kept) of `ep2`'s export and of the DiffMoE
(Shi et al.) pipeline, without the option (`<output root>/<family>.npz`) and with `--expert-parallel-size 2`
(`<family>-ep2.npz`).

With 4 processes (a 2 x 2 mesh at K = 2, where DDP's 4-rank all-reduces could add in another order after a resume):
`ep2`: K = 2, checkpoint at step 3; `ep2-resumed`: K = 2 from it; `ep4-from-ep2`: K = 4 from it; and without the
option, a DSMoE whose collapsed router leaves experts idle (`... four <pretrained> <images> <root> <that DSMoE>`):
`ddp`, checkpoint at step 3, and `ddp-resumed` from it.
"""

import json
import os
import sys

from accelerate.state import AcceleratorState, PartialState

from diffmoe_hf import cli, cli_evaluation
from diffmoe_hf.cli import CommandError
from diffmoe_hf.families import get_family
from diffmoe_hf.training import train_class_conditional as script

from .training_helpers import save_tiny_pipeline, script_args


COMMON = ["--max_train_steps", "5", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2"]
LORA = ["--use_lora", "--rank", "4", "--lora_layers", "attention,experts,shared_experts"]


def sample(model: str, output: str, *extra: str) -> None:
    options = ["--num-samples", "6", "--batch-size", "2", "--steps", "2", "--keep-float", "--no-progress"]
    assert cli.main(["sample", "--model", model, "--output", output, *options, *extra]) == 0, output


def runner(pretrained: str, images: str, root: str):
    """`run(name, *options, model=..., family=...)` (a training run into `root/name`, of the tiny DiT-MoE by default)
    and `checkpoint(name, step)` (its resume options)."""
    # the runs share the processes' one process group: the script's `end_training` must not destroy it
    PartialState.destroy_process_group = lambda self, group=None: None

    def run(name: str, *extra: str, model: str = pretrained, family: str = "dit-moe") -> None:
        args = script_args(model, images, os.path.join(root, name), family=family)
        try:
            script.main(script.parse_args([*args, *COMMON, "--gradient_checkpointing", *extra]))
        finally:
            AcceleratorState._reset_state()

    def checkpoint(name: str, step: int) -> list[str]:
        return ["--resume_from_checkpoint", os.path.join(root, name, f"checkpoint-{step}")]

    return run, checkpoint


def data_read_too_early(*args, **kwargs):
    raise AssertionError("the data was read before the expert counts were checked")


def weights_read_too_early(*args, **kwargs):
    raise AssertionError("the weights were read before the expert counts were checked")


def two_processes(pretrained: str, images: str, root: str, dynamic_token_pipeline: str) -> None:
    run, checkpoint = runner(pretrained, images, root)
    run("ep1", "--expert_parallel_size", "1", "--checkpointing_steps", "3")
    run("ep2", "--expert_parallel_size", "2", "--checkpointing_steps", "3")
    run("ep2-resumed", "--expert_parallel_size", "2", *checkpoint("ep2", 3))
    run("ep1-from-ep2", "--expert_parallel_size", "1", *checkpoint("ep2", 3))
    run("ep2-from-ep1", "--expert_parallel_size", "2", *checkpoint("ep1", 3))
    run("ddp", "--max_train_steps", "1", "--checkpointing_steps", "1")
    refused = {}
    try:
        run("ep2-from-ddp", "--expert_parallel_size", "2", *checkpoint("ddp", 1))
    except CommandError as error:
        refused["ep2-from-ddp"] = str(error)
    three_experts = get_family("dit-moe").tiny_model(num_experts=3)
    folder = save_tiny_pipeline(os.path.join(root, f"three-experts-{os.environ['RANK']}"), "dit-moe", three_experts)
    read_data = script.load_image_dataset
    script.load_image_dataset = data_read_too_early
    try:
        run("three-experts", "--expert_parallel_size", "2", model=folder)
    except CommandError as error:
        refused["three-experts"] = str(error)
    finally:
        script.load_image_dataset = read_data
    dense = save_tiny_pipeline(
        os.path.join(root, f"dense-{os.environ['RANK']}"), "jit", get_family("jit").tiny_model("dense")
    )
    read_weights = cli_evaluation.load_pipeline
    cli_evaluation.load_pipeline = weights_read_too_early
    try:
        options = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--expert-parallel-size", "2"]
        refused["sample-dense"] = cli.main(["sample", "--model", dense, "--output", f"{dense}.npz", *options])
    finally:
        cli_evaluation.load_pipeline = read_weights
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(root, "refused.json"), "w") as f:
            json.dump(refused, f)
    run("lora1", *LORA, "--expert_parallel_size", "1", "--checkpointing_steps", "3")
    run(
        "lora2-from-lora1", *LORA, "--expert_parallel_size", "2", "--checkpointing_steps", "4", *checkpoint("lora1", 3)
    )
    run("lora2-resumed", *LORA, "--expert_parallel_size", "2", *checkpoint("lora2-from-lora1", 4))
    run("lora2-fresh", *LORA, "--expert_parallel_size", "2", "--max_train_steps", "1")
    run("ema-ddp", "--use_ema")
    run("ema1", "--use_ema", "--expert_parallel_size", "1", "--checkpointing_steps", "3")
    run(
        "ema2-from-ema1",
        "--use_ema",
        "--expert_parallel_size",
        "2",
        "--checkpointing_steps",
        "4",
        *checkpoint("ema1", 3),
    )
    run("ema2-resumed", "--use_ema", "--expert_parallel_size", "2", *checkpoint("ema2-from-ema1", 4))
    fsdp2 = ["--expert_parallel_size", "2", "--non_expert_parallel", "fsdp2"]
    run("fsdp2", *fsdp2, "--checkpointing_steps", "3")
    run("fsdp2-resumed", *fsdp2, *checkpoint("fsdp2", 3))
    run("ep1-from-fsdp2", "--expert_parallel_size", "1", *checkpoint("fsdp2", 3))
    run("lora2-fsdp2-from-lora1", *LORA, *fsdp2, *checkpoint("lora1", 3))
    run("ema2-fsdp2-from-ema1", "--use_ema", *fsdp2, *checkpoint("ema1", 3))
    run("bf16-2", "--mixed_precision", "bf16", "--expert_parallel_size", "2", "--checkpointing_steps", "3")
    run("bf16-2-resumed", "--mixed_precision", "bf16", "--expert_parallel_size", "2", *checkpoint("bf16-2", 3))
    for family, model in (("dit-moe", os.path.join(root, "ep2")), ("dynamic-token-moe", dynamic_token_pipeline)):
        sample(model, os.path.join(root, f"{family}.npz"))
        sample(model, os.path.join(root, f"{family}-ep2.npz"), "--expert-parallel-size", "2")


def four_processes(pretrained: str, images: str, root: str, collapsed_dsmoe: str) -> None:
    run, checkpoint = runner(pretrained, images, root)
    run("ep2", "--expert_parallel_size", "2", "--checkpointing_steps", "3")
    run("ep2-resumed", "--expert_parallel_size", "2", *checkpoint("ep2", 3))
    run("ep4-from-ep2", "--expert_parallel_size", "4", *checkpoint("ep2", 3))
    run("ddp", "--checkpointing_steps", "3", model=collapsed_dsmoe, family="dsmoe")
    run("ddp-resumed", *checkpoint("ddp", 3), model=collapsed_dsmoe, family="dsmoe")


if __name__ == "__main__":
    plan = {"two": two_processes, "four": four_processes}[sys.argv[1]]
    plan(*sys.argv[2:])
