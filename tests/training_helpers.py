"""Tiny pipelines and datasets for the training tests (generated in a temporary folder; no network)."""

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from diffmoe_hf import (
    ClassConditionalMoEPipeline,
    DiTMoETransformer2DModel,
    DynamicTokenMoETransformer2DModel,
    JiTTransformer2DModel,
    SpatialTemporalMoETransformer2DModel,
)
from diffmoe_hf.formulations import get_formulation

from .helpers import randomize_weights, tiny_dsmoe, tiny_vae
from .test_dit_moe import TINY as DIT_MOE_TINY
from .test_jit import TINY as JIT_TINY
from .test_spatial_temporal_moe import TINY as SPATIAL_TEMPORAL_TINY


NUM_CLASSES = 3


def tiny_transformer(family: str):
    """A tiny transformer of `family` with random weights (`randomize_weights`: a "pretrained" model whose every
    block matters; latent families: 4 x 8 x 8, JiT: 3 x 16 x 16 pixels)."""
    torch.manual_seed(0)
    if family == "dsmoe":
        return tiny_dsmoe(num_classes=NUM_CLASSES)
    if family == "diff-moe":
        model = SpatialTemporalMoETransformer2DModel(**{**SPATIAL_TEMPORAL_TINY, "num_classes": NUM_CLASSES})
    elif family == "diffmoe-dts":
        model = DynamicTokenMoETransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
            attention_head_dim=4, mlp_ratio=1.0, num_classes=NUM_CLASSES, num_experts=4, moe_intermediate_size=8,
            shared_expert_intermediate_size=64,
        )  # fmt: skip
    elif family == "dit-moe":  # the rectified-flow variant (Diff-MoE covers DDPM)
        model = DiTMoETransformer2DModel(
            **{**DIT_MOE_TINY, "num_classes": NUM_CLASSES, "formulation": "rf-noise-at-1"}
        )
    elif family == "jit":
        model = JiTTransformer2DModel(**{**JIT_TINY, "num_classes": NUM_CLASSES})
    else:
        raise ValueError(family)
    return randomize_weights(model)


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
    return 16 if family == "jit" else 8


def script_args(pretrained: str, data: str, output_dir: str, *extra: str, family: str = "dsmoe") -> list[str]:
    """Arguments of train_class_conditional.py for a tiny run: no trackers, no validation, seed 0, batch 2."""
    return [
        "--pretrained_model_name_or_path", pretrained, "--train_data_dir", data, "--output_dir", output_dir,
        "--resolution", str(resolution(family)), "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
        "--validation_inference_steps", "2", "--validation_epochs", "0", "--routing_log_steps", "1", *extra,
    ]  # fmt: skip


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
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(here, "ddp_training_worker.py")]  # fmt: skip
        env["ACCELERATE_USE_CPU"] = "true"
    else:  # the worker sets up the CPU processes itself (DeepSpeed would be off with ACCELERATE_USE_CPU)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                    "--num_processes", "2", "--mixed_precision", "no",
                    os.path.join(here, "sharded_cpu_training_worker.py")]  # fmt: skip
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
