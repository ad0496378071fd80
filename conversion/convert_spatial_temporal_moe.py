"""Diff-MoE (Cheng et al., kunncheng/Diff-MoE; not DiffMoE of Shi et al.) checkpoints ->
`SpatialTemporalMoETransformer2DModel`.

Where the architecture comes from, in order of precedence:
1. explicit options: `preset` (a `DiT_models` name), `num_experts`, `experts_per_token`, `formulation`;
2. `config_path`: a JSON or YAML file with the original `DiT(**kwargs)` constructor arguments (`hidden_size`, `depth`,
   `num_heads`, `mlp_ratio`, `n_shared_experts`, `num_experts`, `num_experts_per_tok`, ...), at the top level or under
   a `kwargs` key, optionally with `formulation` / `rf`; for models built without a preset;
3. the training `args` stored in train.py checkpoints (`model`, `num_experts`, `num_experts_per_tok`, `rf`).

Every size that the weights determine (width, depth, patch, experts, hidden widths, classes) is read from the weights
and cross-checked against those settings. The number of attention heads and of experts per token cannot be read from
the weights: a bare state dict needs them from a preset / config file / option. `pretraining_tp` (tensor-parallel
slicing of the expert matmuls) only changes the float summation order and is ignored, as is the original's
`rank` argument (the original always uses 64; the port reads it from the weights).
"""

import logging
import math
import re

import torch

from diffmoe_hf.families import get_family
from diffmoe_hf.formulations import FORMULATION_ALIASES, resolve_formulation, rf_flag_formulation
from diffmoe_hf.models.transformer_spatial_temporal_moe import (
    SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
    SPATIAL_TEMPORAL_MOE_PRESETS,
    SpatialTemporalMoETransformer2DModel,
)

from .checkpoint_io import CheckpointError, LoadedCheckpoint
from .config_sources import (
    SourcedSettings,
    constructor_kwargs,
    dit_constructor_arguments,
    read_config_file,
    require_config_or_preset,
)
from .family_converter import FamilyConverter, write_original_files
from .state_dict_utils import (
    DIT_SKELETON_RENAME_RULES,
    build_converted_model,
    original_state_dict,
    resolve_checkpoint_preset,
)


logger = logging.getLogger(__name__)

# `DiT(**kwargs)` defaults of the original models.py
_UPSTREAM_DEFAULTS = dict(class_dropout_prob=0.1, num_experts_per_tok=2, mlp_ratio=4, n_shared_experts=2)

_RENAME_RULES = DIT_SKELETON_RENAME_RULES + [
    (r"blocks\.(\d+)\.dwconv\.(weight|bias)", r"transformer_blocks.\1.depthwise_conv.\2"),
    (r"blocks\.(\d+)\.moe\.gate\.weight", r"transformer_blocks.\1.ff.router.weight"),
    (r"blocks\.(\d+)\.moe\.se\.(0|2)\.weight", r"transformer_blocks.\1.ff.recalibration.\2.weight"),
    (r"blocks\.(\d+)\.moe\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)\.weight",
     r"transformer_blocks.\1.ff.\2.\3.weight"),
    (r"blocks\.(\d+)\.moe\.(experts\.\d+|shared_experts)\.adaLN_modulation\.0\.weight",
     r"transformer_blocks.\1.ff.\2.modulation.linear_1.weight"),
    (r"blocks\.(\d+)\.moe\.(experts\.\d+|shared_experts)\.adaLN_modulation\.2\.(weight|bias)",
     r"transformer_blocks.\1.ff.\2.modulation.linear_2.\3"),
]  # fmt: skip


def read_constructor_kwargs(path: str) -> dict:
    """The original `DiT(**kwargs)` arguments from a JSON/YAML file (top level, or under `kwargs`)."""
    what = "Diff-MoE (Cheng et al.) constructor arguments"
    return constructor_kwargs(read_config_file(path, what), path, what)


def _preset_settings(name: str) -> dict:
    """A `DiT_models` preset (a key of `SPATIAL_TEMPORAL_MOE_PRESETS` or an original name) as constructor arguments."""
    key = resolve_checkpoint_preset(
        "spatial-temporal-moe", SPATIAL_TEMPORAL_MOE_PRESETS, name, SPATIAL_TEMPORAL_MOE_PRESET_ALIASES
    )
    preset = SPATIAL_TEMPORAL_MOE_PRESETS[key]
    fields = dit_constructor_arguments(preset)
    return dict(
        fields,
        intermediate_size=preset["moe_intermediate_size"],
        n_shared_experts=preset["shared_expert_intermediate_size"] // fields["hidden_size"],
    )


def _declared_settings(
    checkpoint: LoadedCheckpoint, config_path, preset, num_experts, experts_per_token, formulation
) -> SourcedSettings:
    """The settings of every source, a later source overriding an earlier one, each with where it came from."""
    settings = SourcedSettings()

    def update(values: dict, source: str):
        settings.put_all(values, source, override=True)

    args = vars(checkpoint.args) if checkpoint.args is not None else {}
    if args.get("model") is not None and preset is None and config_path is None:
        update(_preset_settings(args["model"]), f"args.model={args['model']!r}")
    update(
        {k: args[k] for k in ("num_experts", "num_experts_per_tok", "num_classes", "rf") if args.get(k) is not None},
        "the checkpoint's args",
    )
    if args.get("image_size") is not None:
        update({"input_size": args["image_size"] // 8}, f"args.image_size={args['image_size']} (VAE factor 8)")
    require_config_or_preset(config_path, preset, "the constructor arguments")
    if config_path is not None:
        update({k: v for k, v in _UPSTREAM_DEFAULTS.items() if k not in settings}, "the original DiT defaults")
        update(read_constructor_kwargs(config_path), config_path)
    if preset is not None:
        update(_preset_settings(preset), f"preset={preset!r}")
    update({"num_experts": num_experts} if num_experts is not None else {}, "the num_experts option")
    update(
        {"num_experts_per_tok": experts_per_token} if experts_per_token is not None else {},
        "the experts_per_token option",
    )
    update({"formulation": formulation} if formulation is not None else {}, "the formulation option")
    return settings


def _weight_shapes(state_dict: dict[str, torch.Tensor]) -> dict:
    """Every size the weights determine."""
    required = (
        "x_embedder.proj.weight",
        "blocks.0.moe.gate.weight",
        "blocks.0.moe.experts.0.gate_proj.weight",
        "blocks.0.moe.experts.0.adaLN_modulation.0.weight",
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
    )
    missing = [k for k in required if k not in state_dict]
    if missing:
        dit_moe = missing == ["blocks.0.moe.experts.0.adaLN_modulation.0.weight"]
        hint = " (its experts have no adaLN, as in DiT-MoE: use the dit-moe converter)" if dit_moe else ""
        raise CheckpointError(f"Not a Diff-MoE (Cheng et al.) checkpoint: missing {', '.join(missing)}{hint}.")
    dim, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    shared = state_dict.get("blocks.0.moe.shared_experts.gate_proj.weight")
    return dict(
        hidden_size=dim,
        in_channels=in_channels,
        patch_size=patch_size,
        depth=len([k for k in state_dict if re.fullmatch(r"blocks\.\d+\.adaLN_modulation\.1\.weight", k)]),
        num_experts=state_dict["blocks.0.moe.gate.weight"].shape[0],
        intermediate_size=state_dict["blocks.0.moe.experts.0.gate_proj.weight"].shape[0],
        shared_expert_intermediate_size=0 if shared is None else shared.shape[0],
        rank=state_dict["blocks.0.moe.experts.0.adaLN_modulation.0.weight"].shape[0],
        out_channels=state_dict["final_layer.linear.weight"].shape[0] // patch_size**2,
        embedding_rows=state_dict["y_embedder.embedding_table.weight"].shape[0],
    )


def _check_zero_pos_embed(source: dict[str, torch.Tensor], patch_size: int, dim: int) -> int | None:
    """
    Consumes the original `pos_embed` ([1, T, D], all zeros: the port has no absolute position embedding) and returns
    the latent side it implies, or None when the checkpoint has none.
    """
    pos_embed = source.pop("pos_embed", None)
    if pos_embed is None:
        return None
    if pos_embed.ndim != 3 or pos_embed.shape[-1] != dim:
        raise CheckpointError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected [1, T, {dim}].")
    if pos_embed.abs().max().item() != 0:
        raise CheckpointError(
            "pos_embed is not zero, but Diff-MoE (Cheng et al.) keeps it at zero (positions come from 2-D RoPE): this "
            "looks like a DiT-MoE checkpoint (sin-cos pos_embed); use the dit-moe converter."
        )
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        raise CheckpointError(f"pos_embed has {pos_embed.shape[1]} tokens, not a square grid.")
    return side * patch_size


def spatial_temporal_moe_config(
    checkpoint: LoadedCheckpoint,
    config_path: str | None = None,
    preset: str | None = None,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    formulation: str | None = None,
) -> dict:
    """
    The `SpatialTemporalMoETransformer2DModel` config of a Diff-MoE checkpoint (see the module docstring).

    Raises:
        CheckpointError: when the heads or experts per token are unknown, or a setting contradicts the weights.
    """
    settings = _declared_settings(checkpoint, config_path, preset, num_experts, experts_per_token, formulation)
    origin = dict(settings.origin)  # plus the sources of the sizes derived below
    if settings.get("use_flash_attn"):
        raise CheckpointError(
            "use_flash_attn=True: the original Diff-MoE (Cheng et al.) block refuses flash attention too."
        )
    shapes = _weight_shapes(checkpoint.state_dict)
    dim = shapes["hidden_size"]

    # settings that must agree with the weights
    expected = {
        "hidden_size": dim,
        "depth": shapes["depth"],
        "patch_size": shapes["patch_size"],
        "in_channels": shapes["in_channels"],
        "num_experts": shapes["num_experts"],
        "intermediate_size": shapes["intermediate_size"],
    }
    declared = {key: settings[key] for key in expected if key in settings}
    if "mlp_ratio" in settings and "intermediate_size" not in settings:
        declared["intermediate_size"] = int(settings["mlp_ratio"] * dim)
        origin["intermediate_size"] = f"{origin['mlp_ratio']} (mlp_ratio={settings['mlp_ratio']})"
    if "n_shared_experts" in settings:
        n_shared = settings["n_shared_experts"]
        declared["shared_expert_intermediate_size"] = int((n_shared or 0) * dim)
        origin["shared_expert_intermediate_size"] = f"{origin['n_shared_experts']} (n_shared_experts={n_shared})"
        expected["shared_expert_intermediate_size"] = shapes["shared_expert_intermediate_size"]
    if "learn_sigma" in settings:
        declared["out_channels"] = shapes["in_channels"] * (2 if settings["learn_sigma"] else 1)
        origin["out_channels"] = f"{origin['learn_sigma']} (learn_sigma={settings['learn_sigma']})"
        expected["out_channels"] = shapes["out_channels"]
    class_dropout_prob = float(settings.get("class_dropout_prob", _UPSTREAM_DEFAULTS["class_dropout_prob"]))
    num_classes = shapes["embedding_rows"] - (1 if class_dropout_prob > 0 else 0)
    if "num_classes" in settings:
        declared["num_classes"], expected["num_classes"] = settings["num_classes"], num_classes
    conflicts = [
        f"{key}={declared[key]} (from {origin.get(key, key)}) but the weights have {expected[key]}"
        for key in declared
        if declared[key] != expected[key]
    ]
    if conflicts:
        raise CheckpointError(
            "The Diff-MoE (Cheng et al.) settings contradict the checkpoint:\n  " + "\n  ".join(conflicts)
        )

    # settings the weights cannot give
    heads = settings.get("num_heads")
    if heads is None:
        raise CheckpointError(
            "The number of attention heads is not stored in the weights: pass the preset the model was trained with "
            f"(preset=..., one of {', '.join(SPATIAL_TEMPORAL_MOE_PRESETS)}) or its constructor arguments "
            "(config_path=JSON/YAML with num_heads)."
        )
    if dim % heads or (dim // heads) % 4:
        raise CheckpointError(
            f"num_heads={heads} (from {origin['num_heads']}) does not fit hidden size {dim}: the head dim must be an "
            "integer divisible by 4."
        )
    top_k = settings.get("num_experts_per_tok")
    if top_k is None:
        raise CheckpointError(
            "The number of experts per token is not stored in the weights: pass experts_per_token "
            "(--experts-per-token; release names encode it, e.g. 8E2A = 8 experts, 2 active)."
        )
    if not 1 <= top_k <= shapes["num_experts"]:
        raise CheckpointError(f"experts_per_token={top_k} must be between 1 and {shapes['num_experts']}.")

    sample_size = _check_zero_pos_embed(dict(checkpoint.state_dict), shapes["patch_size"], dim)
    if sample_size is not None and settings.get("input_size", sample_size) != sample_size:
        raise CheckpointError(
            f"input_size={settings['input_size']} (from {origin['input_size']}) but the checkpoint's pos_embed is for "
            f"a {sample_size}x{sample_size} latent."
        )
    if sample_size is None:
        sample_size = settings.get("input_size", 32)
    return dict(
        sample_size=sample_size,
        patch_size=shapes["patch_size"],
        in_channels=shapes["in_channels"],
        out_channels=shapes["out_channels"],
        num_layers=shapes["depth"],
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
        num_experts=shapes["num_experts"],
        num_experts_per_tok=top_k,
        moe_intermediate_size=shapes["intermediate_size"],
        shared_expert_intermediate_size=shapes["shared_expert_intermediate_size"],
        modulation_rank=shapes["rank"],
        formulation=_formulation(settings, checkpoint.state_dict, shapes),
    )


def _formulation(settings: SourcedSettings, state_dict: dict[str, torch.Tensor], shapes: dict) -> str:
    if "formulation" in settings:
        try:  # Diff-MoE trains either way: the formulations of the short names ddpm and rf
            return resolve_formulation(settings["formulation"], FORMULATION_ALIASES.values())
        except ValueError as err:
            raise CheckpointError(f"{err} (from {settings.origin['formulation']}).") from None
    if "rf" in settings:
        return rf_flag_formulation(settings["rf"])
    # rectified-flow training never updates the learned-sigma rows of the output layer, which start at zero
    sigma_rows = state_dict["final_layer.linear.weight"].unflatten(0, (-1, shapes["out_channels"]))
    if shapes["out_channels"] > shapes["in_channels"] and not sigma_rows[:, shapes["in_channels"] :].any():
        logger.warning(
            "The checkpoint does not say how it was trained and its learned-sigma outputs are exactly zero, as after "
            "rectified-flow training; converting it as DDPM anyway. Pass formulation='rf' if it is a RF model."
        )
    return "ddpm-learned-sigma"


def convert_spatial_temporal_moe(checkpoint: LoadedCheckpoint, config: dict) -> SpatialTemporalMoETransformer2DModel:
    """
    Builds a `SpatialTemporalMoETransformer2DModel` with `config` and fills it from `checkpoint`, consuming every
    source key.

    Raises:
        CheckpointError: listing unconsumed, missing and mismatched keys when checkpoint and config disagree.
    """
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return build_converted_model(
        SpatialTemporalMoETransformer2DModel,
        config,
        checkpoint.state_dict,
        _RENAME_RULES,
        get_family("spatial-temporal-moe").label,
        consume_fixed_tensors=lambda source, model: _check_zero_pos_embed(source, config["patch_size"], width),
    )


def build_spatial_temporal_moe_transformer(
    checkpoint: LoadedCheckpoint,
    config_path: str | None = None,
    preset: str | None = None,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    formulation: str | None = None,
) -> SpatialTemporalMoETransformer2DModel:
    """
    Converts a Diff-MoE (Cheng et al.) checkpoint (train.py dict with `args`, `{"ema": ...}`, or a bare state dict).

    Args:
        checkpoint: the loaded original checkpoint.
        config_path: JSON/YAML with the original `DiT(**kwargs)` arguments, for models built without a preset.
        preset: a key of `SPATIAL_TEMPORAL_MOE_PRESETS` (e.g. `"Diff-MoE-XL/2"`, `"Diff-MoE-B/2_v2"`) or its original
            `DiT_models` name (`"DiT-XL/2"`), for checkpoints without `args`.
        num_experts: routed experts (read from the weights; checked when given).
        experts_per_token: experts per token k (`num_experts_per_tok`).
        formulation: `"ddpm"` (`ddpm-learned-sigma`) or `"rf"` (`rf-noise-at-1`); default: from `args.rf`, else DDPM.
    """
    config = spatial_temporal_moe_config(checkpoint, config_path, preset, num_experts, experts_per_token, formulation)
    return convert_spatial_temporal_moe(checkpoint, config)


SPATIAL_TEMPORAL_MOE_MODEL_CARD = dict(
    family="Diff-MoE",
    paper="Diffusion Transformer with Time-Aware and Space-Adaptive Experts (Cheng et al.)",
    paper_url="https://github.com/kunncheng/Diff-MoE",
    upstream="https://github.com/kunncheng/Diff-MoE",
    license="other",
    license_note="Check the license of the original repository before redistributing converted weights.",
    sampler=(
        "DDPM checkpoints: the original sampler is ancestral DDPM with learned variance over 250 evenly spaced steps "
        '(`DDPMScheduler(variance_type="learned_range")`, the scheduler in this folder); `DDIMScheduler` (eta 0) '
        "reproduces the original `ddimN` respacing exactly and `DPMSolverMultistepScheduler` is a faster option. The "
        "original classifier-free guidance acts on latent channels 0..2 only: pass `guidance_channels=3` to the "
        "pipeline to reproduce it (the default guides all channels). Rectified-flow checkpoints: Euler from t = 1 "
        "(noise) with t_i = i/N (`FlowMatchEulerDiscreteScheduler(shift=1.0)`, model time = timestep / 1000)."
    ),
    default_steps=250,
    default_guidance=1.5,
    results="No checkpoints were released with the original code; see the paper for ImageNet 256x256 results.",
)


def write_original_spatial_temporal_moe(model: SpatialTemporalMoETransformer2DModel, folder: str) -> dict:
    """`model` as the original Diff-MoE (Cheng et al.) code saves it, with its `DiT(**kwargs)` arguments and
    formulation (see `FamilyConverter.write_original`)."""
    config = model.config
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config["shared_expert_intermediate_size"] % dim:
        raise ValueError("The original Diff-MoE's shared experts are a multiple of hidden_size wide.")
    kwargs = dict(
        input_size=config["sample_size"],
        hidden_size=dim,
        depth=config["num_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=config["moe_intermediate_size"] / dim,
        class_dropout_prob=config["class_dropout_prob"],
        num_classes=config["num_classes"],
        num_experts=config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        n_shared_experts=config["shared_expert_intermediate_size"] // dim,
        learn_sigma=config["out_channels"] == 2 * config["in_channels"],
    )
    state_dict = original_state_dict(model, _RENAME_RULES)
    return write_original_files(folder, state_dict, {"kwargs": kwargs, "formulation": config["formulation"]})


SPATIAL_TEMPORAL_MOE_CONVERTER = FamilyConverter(
    build_spatial_temporal_moe_transformer, SPATIAL_TEMPORAL_MOE_MODEL_CARD, write_original_spatial_temporal_moe
)
