"""Tiny pipelines and datasets for the training tests (generated in a temporary folder; no network). Every family
comes from the registry (`diffmoe_hf.families`): a family's tiny model is its registered tiny configuration."""

import os
import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.families import get_family
from diffmoe_hf.formulations import get_formulation

from .helpers import randomize_weights, tiny_vae


NUM_CLASSES = 3


def tiny_transformer(family: str, variant: str | None = None, **overrides):
    """A tiny transformer of `family` (an id or alias; its registered tiny configuration `variant`, default the first,
    with NUM_CLASSES classes and `overrides`) with random weights (`randomize_weights`: a "pretrained" model whose every
    block matters)."""
    torch.manual_seed(0)
    return randomize_weights(get_family(family).tiny_model(variant, num_classes=NUM_CLASSES, **overrides))


def save_tiny_pipeline(folder: str, family: str, transformer=None) -> str:
    transformer = transformer if transformer is not None else tiny_transformer(family)
    vae = tiny_vae() if transformer.config.in_channels == 4 else None
    pipe = ClassConditionalMoEPipeline(
        transformer=transformer,
        scheduler=get_formulation(transformer.config.formulation).default_scheduler(),
        vae=vae,
        id2label={str(i): f"class_{i}" for i in range(NUM_CLASSES)},  # the folder names of make_image_folder
    )
    pipe.save_pretrained(folder)
    return folder


def resolution(family: str) -> int:
    """The training images' side: the tiny model's sample size (the tiny VAE does not downsample)."""
    return get_family(family).tiny_config()["sample_size"]


def script_args(pretrained: str, data: str, output_dir: str, *extra: str, family: str = "dsmoe") -> list[str]:
    """Arguments of train_class_conditional.py for a tiny run: no trackers, no validation, seed 0, batch 2."""
    return [
        "--pretrained_model_name_or_path",
        pretrained,
        "--train_data_dir",
        data,
        "--output_dir",
        output_dir,
        "--resolution",
        str(resolution(family)),
        "--train_batch_size",
        "2",
        "--seed",
        "0",
        "--report_to",
        "none",
        "--validation_inference_steps",
        "2",
        "--validation_epochs",
        "0",
        "--routing_log_steps",
        "1",
        *extra,
    ]


def train(pretrained: str, data: str, output_dir: str, *extra: str, family: str = "dsmoe") -> None:
    """Runs train_class_conditional.py in this process on `script_args(...)` (then resets accelerate's state)."""
    from accelerate.state import AcceleratorState

    from diffmoe_hf.training.train_class_conditional import main, parse_args

    try:
        main(parse_args(script_args(pretrained, data, output_dir, *extra, family=family)))
    finally:
        AcceleratorState._reset_state(True)


def free_port() -> int:
    """A TCP port that is free now (for a launcher's rendezvous, so that concurrent test workers never share one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(args: list[str], accelerate_config: str | None = None) -> str:
    """
    Runs the script in 2 CPU processes on gloo: tests/ddp_training_worker.py under torchrun (DDP; it also writes each
    rank's final weights to `<output_dir>/rank<r>.safetensors`), or with `accelerate_config` (an FSDP or DeepSpeed
    file of training/configs) tests/sharded_cpu_training_worker.py under `accelerate launch --config_file
    accelerate_config` in fp32. Returns the output.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if accelerate_config is None:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(here, "ddp_training_worker.py"),
        ]
        env["ACCELERATE_USE_CPU"] = "true"
    else:  # the worker sets up the CPU processes itself (DeepSpeed would be off with ACCELERATE_USE_CPU)
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            os.path.join(here, "sharded_cpu_training_worker.py"),
        ]
        env.pop("ACCELERATE_USE_CPU", None)
        env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout + result.stderr


def make_image_folder(root: str, num_classes: int = NUM_CLASSES, per_class: int = 4, size: int = 12, mode="RGB"):
    """`root/class_<i>/<j>.png` random images (datasets' imagefolder layout)."""
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    for label in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 2, channels), dtype=np.uint8).squeeze(
                -1 if mode == "L" else ()
            )
            Image.fromarray(pixels, mode=None).save(os.path.join(root, f"class_{label}", f"{j}.png"))
    return root
