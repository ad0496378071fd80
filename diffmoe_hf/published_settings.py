"""Published sampling and evaluation settings of the released checkpoints (data about the released models), and
their record in converted folders.

For each released model: the sampler, steps and guidance its authors used for their reported FID / IS, the
`diffmoe evaluate` protocol that measures the same way, and the published numbers (ImageNet, FID-50K). Each family's
registration (`diffmoe_hf.families`) lists its releases (`DSMOE_PUBLISHED`, `JITMOE_PUBLISHED`, `DIT_MOE_PUBLISHED`).
The converter recognises a released architecture from the converted config (`families.match_published_settings`)
and writes `published_settings.json` into the folder, the default guidance scale into `model_index.json` and a table
into the model card; `diffmoe sample` then uses these settings unless told otherwise (`read_folder_settings`).

Sources: the READMEs of yhlleo/EfficientMoE (DSMoE and JiTMoE tables, the JiTMoE training scripts' `--cfg 2.9
--interval_min 0.1 --interval_max 1.0`, JiT's default of 50 Heun steps; "we follow the evaluation protocols of
DiffMoE and JiT") and of feizc/DiT-MoE (released checkpoints, their samplers), and the DiT-MoE paper (arXiv
2407.11633: FID-50K with 250 DDPM steps, Table 2 and section 3.5). Where a source does not state a value it is
`None` here, never guessed.
"""

import json
import os
from dataclasses import asdict, dataclass

from diffmoe_hf.models.transformer_dsmoe import DSMOE_PRESETS


SETTINGS_FILE = "published_settings.json"

DSMOE_SOURCE = "yhlleo/EfficientMoE README (700K training steps, FID-50K)"
JIT_SOURCE = "yhlleo/EfficientMoE README (200 epochs, FID-50K, CFG interval) and JiTMoE/train_jit_*.sh"
DIT_MOE_SOURCE = "DiT-MoE paper (arXiv 2407.11633), feizc/DiT-MoE README"


@dataclass(frozen=True)
class PublishedResult:
    """One published row: the guidance it was measured at and the metrics (None where not published)."""

    guidance_scale: float | None
    fid: float | None
    inception_score: float | None = None
    sfid: float | None = None
    precision: float | None = None
    recall: float | None = None
    dataset: str = "ImageNet 256x256"


@dataclass(frozen=True)
class PublishedSettings:
    """
    The published sampling and evaluation settings of one released model.

    Args:
        name: The released model's name.
        family: The `diffmoe convert` family id.
        architecture: Config values that identify the release (all must match the converted config).
        scheduler: The diffusers scheduler class that reproduces the published sampler.
        num_inference_steps: Sampling steps of the published evaluation.
        guidance_scale: The default guidance scale (the best published row's).
        protocol: The `diffmoe evaluate --protocol` that measures as the authors did.
        results: The published numbers.
        source: Where they come from.
        guidance_interval: `(low, high)` in model time, or None.
        guidance_channels: Guide only the first N latent channels (the original DiT `forward_with_cfg`), or None.
        notes: What the sources leave open.
    """

    name: str
    family: str
    architecture: dict
    scheduler: str
    num_inference_steps: int
    guidance_scale: float | None
    protocol: str
    results: tuple[PublishedResult, ...]
    source: str
    guidance_interval: tuple[float, float] | None = None
    guidance_channels: int | None = None
    notes: str = ""

    def sampling(self) -> dict:
        """The pipeline call settings `diffmoe sample` takes as defaults."""
        chosen = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
            "guidance_channels": self.guidance_channels,
            "scheduler": self.scheduler,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    def to_json(self) -> str:
        record = asdict(self)
        record["sampling"] = self.sampling()
        return json.dumps(record, indent=2) + "\n"


def _dsmoe(size: str, fid_1: float, is_1: float, fid_15: float, is_15: float) -> PublishedSettings:
    preset = DSMOE_PRESETS[f"DSMoE-{size}"]
    architecture = {
        k: preset[k]
        for k in ("num_layers", "num_attention_heads", "attention_head_dim", "num_experts", "num_experts_per_tok")
    }
    return PublishedSettings(
        name=f"DSMoE-{size}",
        family="dsmoe",
        architecture={**architecture, "sample_size": 32, "num_classes": 1000},
        scheduler="FlowMatchEulerDiscreteScheduler",
        num_inference_steps=250,
        guidance_scale=1.5,
        protocol="float-features",
        source=DSMOE_SOURCE,
        results=(PublishedResult(1.0, fid_1, is_1), PublishedResult(1.5, fid_15, is_15)),
        notes="Evaluated as DiffMoE (Shi et al.) does (Inception features of un-rounded pixels against ADM's "
        "VIRTUAL_imagenet256 statistics): sample with --keep-float and evaluate with --protocol float-features.",
    )


def _jitmoe(size: str, fid: float, inception_score: float) -> PublishedSettings:
    layers, heads = {"B": (10, 12), "L": (20, 16)}[size]
    return PublishedSettings(
        name=f"JiTMoE-{size}/16-E16",
        family="jit",
        architecture={
            "num_layers": layers,
            "num_attention_heads": heads,
            "patch_size": 16,
            "num_experts": 16,
            "sample_size": 256,
            "num_classes": 1000,
        },
        scheduler="FlowMatchHeunDiscreteScheduler",
        num_inference_steps=50,
        guidance_scale=2.9,
        guidance_interval=(0.1, 1.0),
        protocol="jit",
        source=JIT_SOURCE,
        results=(PublishedResult(2.9, fid, inception_score),),
        notes="JiT evaluates with torch-fidelity against its own ImageNet 256 statistics file (mu, sigma): pass that "
        "file as --reference with --protocol jit.",
    )


def _dit_moe(name: str, architecture: dict, results: tuple, notes: str) -> PublishedSettings:
    rectified_flow = architecture["num_layers"] >= 28  # the released XL and G checkpoints are rectified-flow models
    return PublishedSettings(
        name=name,
        family="dit-moe",
        architecture={**architecture, "num_classes": 1000},
        scheduler="FlowMatchEulerDiscreteScheduler" if rectified_flow else "DDPMScheduler",
        num_inference_steps=250,
        guidance_scale=1.5,
        guidance_channels=None if rectified_flow else 3,
        protocol="adm",
        source=DIT_MOE_SOURCE,
        results=results,
        notes=notes + " The paper reports FID-50K with 250 sampling steps in ADM's evaluator and does not state "
        "the guidance scale of its tables; 1.5 is the README's sampling example.",
    )


def _dit_moe_architecture(layers: int, heads: int, head_dim: int, experts: int) -> dict:
    return {
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "patch_size": 2,
        "num_experts": experts,
        "num_experts_per_tok": 2,
    }


_UNREPORTED = "The paper shows this model's FID only as training curves (Figure 3), with no table value."

DSMOE_PUBLISHED = (
    _dsmoe("S-E16", 39.84, 38.63, 14.53, 97.55),
    _dsmoe("S-E48", 40.20, 38.09, 14.81, 96.51),
    _dsmoe("B-E16", 20.33, 71.42, 4.50, 186.79),
    _dsmoe("B-E48", 19.46, 72.69, 4.27, 191.03),
    _dsmoe("L-E16", 9.80, 115.45, 2.59, 272.55),
    _dsmoe("L-E48", 9.19, 118.52, 2.55, 278.35),
    _dsmoe("3B-E16", 7.52, 135.29, 2.38, 304.93),
)
JITMOE_PUBLISHED = (_jitmoe("B", 4.23, 245.53), _jitmoe("L", 3.10, 311.34))
DIT_MOE_PUBLISHED = (
    _dit_moe("DiT-MoE-S/2-8E2A", {**_dit_moe_architecture(12, 6, 64, 8), "sample_size": 32},
             (PublishedResult(None, None),), _UNREPORTED),
    _dit_moe("DiT-MoE-S/2-16E2A", {**_dit_moe_architecture(12, 6, 64, 16), "sample_size": 32},
             (PublishedResult(None, None),), _UNREPORTED),
    _dit_moe("DiT-MoE-B/2-8E2A", {**_dit_moe_architecture(12, 12, 64, 8), "sample_size": 32},
             (PublishedResult(None, None),), _UNREPORTED),
    _dit_moe("DiT-MoE-XL/2-8E2A", {**_dit_moe_architecture(28, 16, 72, 8), "sample_size": 32},
             (PublishedResult(None, 1.72, 315.73, 4.47, 0.83, 0.64),), "Table 2."),
    _dit_moe("DiT-MoE-G/2-16E2A", _dit_moe_architecture(40, 16, 88, 16),
             (PublishedResult(None, 1.80, dataset="ImageNet 512x512"),),
             "Section 3.5 (512x512; no other metric published)."),
)  # fmt: skip


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_card_section(settings: PublishedSettings) -> str:
    """The model card's "Published evaluation" section: sampler, protocol and the published numbers."""
    interval = f", guidance interval {settings.guidance_interval}" if settings.guidance_interval else ""
    channels = ""
    if settings.guidance_channels:
        channels = f", guidance on latent channels 0..{settings.guidance_channels - 1}"
    rows = "\n".join(
        f"| {r.dataset} | {_number(r.guidance_scale, 1)} | {_number(r.fid)} | {_number(r.sfid)} | "
        f"{_number(r.inception_score)} | {_number(r.precision)} | {_number(r.recall)} |"
        for r in settings.results
    )
    return f"""
## Published evaluation ({settings.name})

Sampler: `{settings.scheduler}`, {settings.num_inference_steps} steps, guidance {settings.guidance_scale}{interval}
{channels}. `diffmoe sample` uses these settings by default (`published_settings.json`); measure with
`diffmoe evaluate --protocol {settings.protocol}`. {settings.notes}

| data | guidance | FID-50K | sFID | IS | precision | recall |
|---|---|---|---|---|---|---|
{rows}

Source: {settings.source}.
"""


def read_folder_settings(model: str) -> dict | None:
    """
    The sampling settings recorded in a converted folder (or a Hub repo already in the local cache), or `None`.

    Args:
        model: A local folder or a Hub repo id.
    """
    path = os.path.join(model, SETTINGS_FILE)
    if not os.path.isdir(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, SETTINGS_FILE)
        path = cached if isinstance(cached, str) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["sampling"]
