"""Tiny models and folders shared by the tests (CPU, seconds). The families and their tiny configurations come from
the registry (`diffmoe_hf.families`); no test module lists families of its own."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.normalization import RMSNorm
from torch import nn

from diffmoe_hf import ClassConditionalMoEPipeline, DSMoETransformer2DModel
from diffmoe_hf.families import FAMILIES, get_family
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.models.moe import GroupedExperts

from .conftest import REPO_ROOT, parity_root


DSMOE_CASE = "dsmoe-rope2d-e8g2k2"

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23, twice the unit roundoff of float32


def float32_tolerance(reference: torch.Tensor, reduction_size: int, depth: int = 1) -> float:
    """
    Absolute tolerance for two float32 evaluations of the same computation that may add in another order (another
    GEMM kernel, thread split or batch size, as on a different CPU), derived from the computation, not from a run.

    A float32 dot product of length K is within K * u * sum|x_i * y_i| of the exact value (u = eps / 2, the standard
    forward error bound), so two evaluations differ by at most K * eps of that sum; each of `depth` stacked layers adds
    its own. The sum of |terms| is taken as twice the result's scale (moderate cancellation), and the scale is at least
    1: the models' blocks work on layer-normalised (unit-scale) activations, so rounding errors are of that size even
    where an output itself is small.

    Args:
        reference: One of the two results.
        reduction_size: K, the longest dot product (GEMM inner dimension, or number of summed terms) on the way.
        depth: Number of such reductions stacked one after the other.
    """
    scale = max(reference.detach().abs().max().item(), 1.0) if reference.numel() else 1.0
    return 2 * depth * reduction_size * FLOAT32_EPS * scale


def model_float32_tolerance(
    model: nn.Module, reference: torch.Tensor, tokens: int | None = None, calls: int = 1
) -> float:
    """
    `float32_tolerance` of a whole transformer's result: the longest dot product is the widest `nn.Linear` input or
    the sum over `tokens` (attention over a sample's tokens, by default those of the (B, C, H, W) `reference`; a weight
    gradient sums over all tokens of the batch), and every block plus the embedding and the output layer is one level
    of depth, for each of `calls` passes through the model (sampling steps; 2 for a forward and its backward).
    """
    widest = max(module.in_features for module in model.modules() if isinstance(module, nn.Linear))
    if tokens is None:
        tokens = reference.shape[-2] * reference.shape[-1] // model.config.patch_size**2
        tokens += getattr(model.config, "in_context_len", 0) or 0
    return float32_tolerance(reference, max(widest, tokens), depth=calls * (model.config.num_layers + 2))


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, msg: str = "") -> None:
    """`actual` equals `expected` up to `tolerance` (from `float32_tolerance`); same shape, dtype and NaN pattern."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance, msg=lambda m: f"{msg} {m}".strip())


def token_routing(model: nn.Module, *args) -> dict[str, list[torch.Tensor]]:
    """The (S, k) expert ids (sorted per token) every token-choice MoE layer of `model` picked in one forward on
    `args`, by layer name."""
    from diffmoe_hf.routing import record_routing

    with torch.no_grad(), record_routing(model) as routing:
        model(*args)
    return {name: [ids.sort(-1).values for ids in layer.expert_ids] for name, layer in routing.items()}


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """
    Replaces every parameter of `model` by a seeded random draw, so that every branch of a tiny test model matters
    and its routing is not degenerate. A fresh model is initialised as the original code does (adaLN-Zero: every
    block is the identity and the output is exactly 0), where two computations a test compares would agree trivially.

    Weight matrices and kernels get N(0, 1 / fan_in) (fan_in: the last dim, or in * k * k for a 4-D convolution
    kernel), so activations keep unit scale; norm gains get 1 + N(0, 0.1^2); every other parameter (biases, norm
    biases) N(0, 0.1^2). Buffers (fixed tables, DiffMoE thresholds) are left as they are. The draw depends only on
    `seed` and the parameter shapes, not on the global RNG. Returns `model`.
    """
    norms = (nn.LayerNorm, nn.RMSNorm, RMSNorm, nn.GroupNorm)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, norms) and getattr(m, "weight", None) is not None}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if id(parameter) in gains:
                value = 1 + 0.1 * noise
            elif parameter.dim() >= 2:
                fan_in = parameter[0].numel() if parameter.dim() == 4 else parameter.shape[-1]
                value = noise / math.sqrt(fan_in)
            else:
                value = 0.1 * noise
            parameter.copy_(value)
    return model


def dsmoe_case(name: str = DSMOE_CASE) -> str:
    return os.path.join(parity_root(), name)


def registered_families() -> list[str]:
    """The ids of every registered family, for `pytest.mark.parametrize`."""
    return list(FAMILIES)


def tiny_variants() -> list[tuple[str, str]]:
    """`(family id, tiny variant)` for every registered tiny configuration."""
    return [(family.id, variant) for family in FAMILIES.values() for variant in family.tiny]


def tiny_model(family: str, variant: str | None = None, seed: int = 0, **overrides) -> nn.Module:
    """The registered tiny model of `family` (`variant`, default the first; config `overrides` applied) in eval mode,
    with random weights (`randomize_weights(seed)`)."""
    torch.manual_seed(0)  # callers draw their inputs from the global generator after this
    return randomize_weights(get_family(family).tiny_model(variant, **overrides).eval(), seed)


def model_inputs(model: nn.Module, batch_size: int = 2) -> dict:
    """Seeded keyword inputs of a forward of `model`: (B, C, H, W) latents or images, timesteps in [0, 1), labels."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    return dict(
        hidden_states=torch.randn(shape, generator=generator),
        timestep=torch.rand(batch_size, generator=generator),
        class_labels=torch.randint(0, config.num_classes, (batch_size,), generator=generator),
    )


def expert_banks(model: nn.Module) -> list[GroupedExperts]:
    """Every expert bank of `model`, in module order (the order a forward calls them)."""
    return [module for module in model.modules() if isinstance(module, GroupedExperts)]


def tiny_dsmoe(**overrides) -> DSMoETransformer2DModel:
    return tiny_model("dsmoe", **overrides)


def unwritable_folder(tmp_path, kind: str) -> str:
    """A folder nothing new can be written into: `"read-only"` (mode 0555; skips as root, which ignores permission
    bits) or `"/sys"` (sysfs takes no new files or folders even from root; skips where there is none)."""
    if kind == "read-only":
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("this user may write into read-only folders (root)")
        return str(folder)
    if not os.path.isdir(kind):
        pytest.skip("no sysfs here")
    return kind


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()


def tiny_pipeline(with_vae: bool = True, **model_overrides) -> ClassConditionalMoEPipeline:
    transformer = tiny_dsmoe(**model_overrides)
    pipe = ClassConditionalMoEPipeline(
        transformer=transformer,
        scheduler=get_formulation(transformer.config.formulation).default_scheduler(),
        vae=tiny_vae() if with_vae else None,
        id2label={
            str(i): name
            for i, name in enumerate(
                [
                    "tench, Tinca tinca",
                    "goldfish",
                    "great white shark, white shark",
                    "tiger shark",
                    "hammerhead",
                    "electric ray",
                    "stingray",
                    "cock",
                    "hen",
                    "ostrich",
                ]
            )
        },
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inception_state_dict() -> dict[str, torch.Tensor]:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict (keys and shapes of the standard file) with He-normal
    convolutions, so that features vary between images through all 94 layers."""
    from unittest import mock

    from diffmoe_hf.evaluation.inception import load_inception_module

    module = load_inception_module()
    network_class = module.FeatureExtractorInceptionV3
    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(network_class, "load_state_dict", lambda self, state: None),
    ):
        shapes = network_class("inception-v3-compat", ["2048"]).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in shapes.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=generator) * (2 / fan_in) ** 0.5
        state[key] = value
    return state


def run_memory_worker(module: str, folder) -> dict:
    """
    Runs the memory-measuring test worker `module` (e.g. `"tests.conversion_memory_worker"`) on `folder` in a fresh
    process and returns the JSON record it prints last. glibc's allocator is told to return large blocks to the system
    at once (MALLOC_MMAP_THRESHOLD_), so the worker's RssAnon counts what it holds, not what the allocator caches.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", module, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
