"""Tiny models and folders shared by the tests (CPU, seconds)."""

import os

import torch
from diffusers import AutoencoderKL

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel
from diffmoe_hf.formulations import get_formulation

from .conftest import parity_root

DSMOE_CASE = "dsmoe-rope2d-e8g2k2"


def dsmoe_case(name: str = DSMOE_CASE) -> str:
    return os.path.join(parity_root(), name)


def tiny_dsmoe(**overrides) -> DSMoETransformer2DModel:
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, mlp_ratio=2.0, num_classes=10, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, n_group=2, topk_group=2,
    )  # fmt: skip
    config.update(overrides)
    torch.manual_seed(0)
    model = DSMoETransformer2DModel(**config).eval()
    with torch.no_grad():  # the default init zeroes nothing, but make the adaLN branches matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8,
    ).eval()  # fmt: skip


def tiny_pipeline(with_vae: bool = True, **model_overrides) -> ClassConditionalMoEPipeline:
    transformer = tiny_dsmoe(**model_overrides)
    pipe = ClassConditionalMoEPipeline(
        transformer=transformer,
        scheduler=get_formulation(transformer.config.formulation).default_scheduler(),
        vae=tiny_vae() if with_vae else None,
        id2label={str(i): name for i, name in enumerate(
            ["tench, Tinca tinca", "goldfish", "great white shark, white shark", "tiger shark", "hammerhead",
             "electric ray", "stingray", "cock", "hen", "ostrich"])},
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
