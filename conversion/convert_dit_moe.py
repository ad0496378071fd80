"""DiT-MoE (feizc/DiT-MoE, Fei et al.) checkpoints -> `DiTMoETransformer2DModel`.

Files: train.py dicts `{"model", "ema", "opt", "args"}` (EMA weights by default), bare EMA state dicts, the release
layout `{"ema": state_dict}`, DeepSpeed `"module"` dicts (see `checkpoint_io`); both attention key layouts (timm
`attn.qkv/proj`, and the flash-attention `attn.Wqkv/q_norm/k_norm/out_proj` of the XL/G models).

The architecture is gathered from three sources and must agree:
1. explicit options: `preset`, an architecture (`"DiT-MoE-XL/2"`, or its original name `"DiT-XL/2"`) or a released
   model (`"DiT-MoE-XL/2-8E2A"` or its file name `"dit_moe_xl_8E2A"`, which also fix experts, experts per token and
   formulation); `config_path`, a JSON or YAML file with `models.DiT` constructor arguments (`hidden_size`,
   `num_heads`, `num_experts_per_tok`, ...) at the top level or under `"kwargs"`, optionally `model` / `image_size` as
   in train.py, and `formulation` (or `rf`); and the `num_experts`, `experts_per_token` and `formulation` options (the
   same as the spatial-temporal-moe converter's);
2. the train.py `args` stored in the checkpoint (`model`, `image_size`, `num_classes`, `num_experts`,
   `num_experts_per_tok`, `rf`), overridden by explicit options;
3. the weights, which fix everything except the number of heads (timm layout), the experts per token and the
   formulation; a value from 1. or 2. that contradicts them is an error.

The model is built on the meta device and adopts the source tensors (`low_memory`), so a 16B checkpoint converts with
one copy of its weights in memory.
"""

import os
import re

import torch

from diffmoe_hf.families import get_family
from diffmoe_hf.formulations import FORMULATION_ALIASES, resolve_formulation, rf_flag_formulation
from diffmoe_hf.models.transformer_dit_moe import DIT_MOE_PRESET_ALIASES, DIT_MOE_PRESETS, DiTMoETransformer2DModel

from .checkpoint_io import CheckpointError, LoadedCheckpoint
from .config_sources import SourcedSettings, constructor_kwargs, dit_constructor_arguments, read_config_file
from .family_converter import FamilyConverter, write_original_files
from .state_dict_utils import (
    DIT_SKELETON_RENAME_RULES,
    build_converted_model,
    fixed_pos_embed,
    original_state_dict,
    resolve_checkpoint_preset,
)


# `models.DiT` constructor arguments (upstream names)
CONSTRUCTOR_ARGS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob",
    "num_classes", "num_experts", "num_experts_per_tok", "pretraining_tp", "learn_sigma", "use_flash_attn",
)  # fmt: skip
# train.py-style fields a config file may use besides the constructor arguments
CONFIG_EXTRAS = ("model", "image_size", "rf", "formulation")

# The files of huggingface.co/feizhengcong/DiT-MoE (README table): architecture, experts, experts per token, sampler.
DIT_MOE_RELEASES = {
    "dit_moe_s_8E2A": dict(model="DiT-S/2", num_experts=8, num_experts_per_tok=2, formulation="ddpm-learned-sigma"),
    "dit_moe_s_16E2A": dict(model="DiT-S/2", num_experts=16, num_experts_per_tok=2, formulation="ddpm-learned-sigma"),
    "dit_moe_b_8E2A": dict(model="DiT-B/2", num_experts=8, num_experts_per_tok=2, formulation="ddpm-learned-sigma"),
    "dit_moe_xl_8E2A": dict(model="DiT-XL/2", num_experts=8, num_experts_per_tok=2, formulation="rf-noise-at-1"),
    "dit_moe_g_16E2A": dict(model="DiT-G/2", num_experts=16, num_experts_per_tok=2, formulation="rf-noise-at-1"),
}  # fmt: skip
# the same releases by the names of the paper and its results ("DiT-MoE-XL/2-8E2A": XL/2, 8 experts, 2 active)
DIT_MOE_RELEASE_NAMES = {
    f"DiT-MoE-{release['model'].removeprefix('DiT-')}-{release['num_experts']}E{release['num_experts_per_tok']}A": file
    for file, release in DIT_MOE_RELEASES.items()
}


def _is_architecture(name) -> bool:
    """Whether `name` is a key of `DIT_MOE_PRESETS` or one of its aliases (the original `DiT_models` names)."""
    return name in DIT_MOE_PRESETS or name in DIT_MOE_PRESET_ALIASES


def _preset_fields(name: str, origin: str) -> dict:
    """Upstream architecture fields of a preset key or original `DiT_models` name."""
    try:
        preset = DIT_MOE_PRESETS[resolve_checkpoint_preset("dit-moe", DIT_MOE_PRESETS, name, DIT_MOE_PRESET_ALIASES)]
    except CheckpointError as err:
        raise CheckpointError(f"{err} (from {origin})") from None
    return dit_constructor_arguments(preset)


def _train_fields(fields: dict, origin: str) -> SourcedSettings:
    """Constructor fields plus `formulation` from train.py-style fields (`model`, `image_size`, `rf` included)."""
    fields = dict(fields)
    out = SourcedSettings()
    model = fields.pop("model", None)
    if model is not None:
        for key, value in _preset_fields(model, origin).items():
            out.put(key, value, f"{origin}, model={model!r}")
    image_size = fields.pop("image_size", None)
    if image_size is not None:
        if image_size % 8:
            raise CheckpointError(f"image_size={image_size} ({origin}) is not a multiple of the VAE factor 8.")
        out.put("input_size", image_size // 8, f"{origin}, image_size={image_size}")
    rf = fields.pop("rf", None)
    if rf is not None:
        out.put("formulation", rf_flag_formulation(rf), f"{origin}, rf={rf!r}")
    if "formulation" in fields:
        try:  # DiT-MoE trains either way: the formulations of the short names ddpm and rf
            fields["formulation"] = resolve_formulation(fields["formulation"], FORMULATION_ALIASES.values())
        except ValueError as err:
            raise CheckpointError(f"{err} ({origin}; DiT-MoE models use DDPM or rectified flow)") from None
    for key, value in fields.items():
        out.put(key, value, origin)
    return out


def read_dit_moe_config(path: str) -> dict:
    """
    The constructor arguments of a JSON/YAML config: a mapping of `models.DiT` arguments (plus `model`, `image_size`,
    `rf`, `formulation`), or a construction record with the arguments under `"kwargs"` and an optional top-level
    `formulation` / `rf`.
    """
    what = "DiT-MoE constructor arguments"
    fields = constructor_kwargs(read_config_file(path, what), path, what)
    unknown = sorted(set(fields) - set(CONSTRUCTOR_ARGS) - set(CONFIG_EXTRAS))
    if unknown:
        raise CheckpointError(
            f"{path} has keys that are not DiT-MoE constructor arguments: {unknown}. Known: "
            f"{', '.join(CONSTRUCTOR_ARGS + CONFIG_EXTRAS)}."
        )
    return fields


def _explicit_fields(config_path: str | None, preset: str | None, options: dict) -> SourcedSettings:
    """The fields the user gives: options, then a preset, then a config file; they must agree."""
    explicit = SourcedSettings()
    for key, value in _train_fields({k: v for k, v in options.items() if v is not None}, "option").items():
        name = {"num_experts_per_tok": "experts_per_token"}.get(key, key)
        explicit.put(key, value, f"the {name} option")
    if preset is not None:
        name = os.path.splitext(os.path.basename(preset))[0] if preset.endswith(".pt") else preset
        if DIT_MOE_RELEASE_NAMES.get(name, name) in DIT_MOE_RELEASES:
            explicit.merge(_train_fields(DIT_MOE_RELEASES[DIT_MOE_RELEASE_NAMES.get(name, name)], f"preset {name}"))
        elif _is_architecture(name):
            for key, value in _preset_fields(name, "preset").items():
                explicit.put(key, value, f"preset {name}")
        else:
            aliases = ", ".join(f"{alias} = {key}" for alias, key in DIT_MOE_PRESET_ALIASES.items())
            raise CheckpointError(
                f"Unknown {get_family('dit-moe').label} preset {preset!r}; use an architecture "
                f"({', '.join(DIT_MOE_PRESETS)}; aliases: {aliases}) or a released model "
                f"({', '.join(DIT_MOE_RELEASE_NAMES)}, or by file name: {', '.join(DIT_MOE_RELEASES)})."
            )
    if config_path is not None:
        explicit.merge(_train_fields(read_dit_moe_config(config_path), config_path))
    return explicit


def _recorded_fields(checkpoint: LoadedCheckpoint) -> SourcedSettings:
    """The architecture recorded in train.py `args` (empty for bare and release files)."""
    if checkpoint.args is None:
        return SourcedSettings()
    args = vars(checkpoint.args)
    fields = {
        key: args[key]
        for key in ("image_size", "num_classes", "num_experts", "num_experts_per_tok", "rf")
        if args.get(key) is not None
    }
    if _is_architecture(args.get("model")):
        fields["model"] = args["model"]
    return _train_fields(fields, "checkpoint args")


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def infer_from_weights(state_dict: dict[str, torch.Tensor], class_dropout_prob: float) -> dict:
    """The architecture fields (upstream names) that the shapes of a DiT-MoE state dict determine."""
    required = (
        "x_embedder.proj.weight",
        "blocks.0.moe.gate.weight",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "blocks.0.moe.experts.0.gate_proj.weight",
    )
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise CheckpointError(
            f"This does not look like a DiT-MoE state dict: missing {absent} (found e.g. {sorted(state_dict)[:5]})."
        )
    if "blocks.0.dwconv.weight" in state_dict or "blocks.0.moe.se.0.weight" in state_dict:
        raise CheckpointError(
            "This is a Diff-MoE (Cheng et al.) checkpoint (depthwise conv and expert recalibration weights): use the "
            "spatial-temporal-moe converter."
        )
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    flash = {"Wqkv" in key for key in state_dict if re.fullmatch(r"blocks\.\d+\.attn\.(qkv|Wqkv)\.weight", key)}
    if len(flash) > 1:
        raise CheckpointError("The checkpoint mixes the timm (attn.qkv) and flash (attn.Wqkv) attention layouts.")
    table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    out_rows = state_dict["final_layer.linear.weight"].shape[0]
    if out_rows not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise CheckpointError(f"final_layer.linear has {out_rows} rows; expected p²·C or p²·2C.")
    fields = dict(
        hidden_size=hidden,
        in_channels=in_channels,
        patch_size=patch,
        depth=1 + max(int(_BLOCK_KEY.match(key).group(1)) for key in state_dict if _BLOCK_KEY.match(key)),
        num_experts=state_dict["blocks.0.moe.gate.weight"].shape[0],
        moe_intermediate_size=state_dict["blocks.0.moe.experts.0.gate_proj.weight"].shape[0],
        num_classes=table_rows - (1 if class_dropout_prob > 0 else 0),
        learn_sigma=out_rows == 2 * patch * patch * in_channels,
        use_flash_attn=flash == {True},
    )
    shared = state_dict.get("blocks.0.moe.shared_experts.gate_proj.weight")
    fields["shared_expert_intermediate_size"] = 0 if shared is None else shared.shape[0]
    if "pos_embed" in state_dict:
        grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
        fields["input_size"] = grid * patch
    if fields["use_flash_attn"]:
        fields["num_heads"] = hidden // state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    return fields


def dit_moe_config(
    checkpoint: LoadedCheckpoint,
    config_path: str | None = None,
    preset: str | None = None,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    formulation: str | None = None,
) -> dict:
    """
    The `DiTMoETransformer2DModel` config of `checkpoint` (see the module docstring for the sources).

    Args:
        checkpoint: the loaded original checkpoint.
        config_path, preset: see the module docstring.
        num_experts, experts_per_token, formulation: explicit settings (`formulation`: `"ddpm-learned-sigma"` /
            `"ddpm"` or `"rf-noise-at-1"` / `"rf"`); `num_experts` is only checked against the weights.

    Raises:
        CheckpointError: when sources contradict each other or the weights, or a field no source gives is needed.
    """
    options = dict(num_experts=num_experts, num_experts_per_tok=experts_per_token, formulation=formulation)
    explicit = _explicit_fields(config_path, preset, options)
    fields = _recorded_fields(checkpoint)
    fields.merge(explicit, override=True)
    if "class_dropout_prob" not in fields:  # the upstream default; it decides whether the label table has a null row
        fields.put("class_dropout_prob", 0.1, "default")

    for key, value in infer_from_weights(checkpoint.state_dict, fields["class_dropout_prob"]).items():
        if key in fields and fields[key] != value:
            raise CheckpointError(
                f"{fields.describe(key)} contradicts the checkpoint weights, which have {key}={value!r}."
            )
        fields.put(key, value, "checkpoint weights")
    if "mlp_ratio" in fields and fields["mlp_ratio"] * fields["hidden_size"] != fields["moe_intermediate_size"]:
        raise CheckpointError(
            f"{fields.describe('mlp_ratio')} contradicts the checkpoint weights, whose experts are "
            f"{fields['moe_intermediate_size']} wide for hidden size {fields['hidden_size']}."
        )

    missing = [key for key in ("num_heads", "num_experts_per_tok", "formulation", "input_size") if key not in fields]
    if missing:
        raise CheckpointError(
            f"The DiT-MoE architecture is incomplete: {', '.join(missing)} cannot be read from this checkpoint. Pass a "
            f"preset (e.g. a released model, {', '.join(DIT_MOE_RELEASE_NAMES)}, or an architecture such as "
            "DiT-MoE-S/2), a config file with the original constructor arguments (num_heads, num_experts_per_tok, "
            "...) and formulation, and/or the experts_per_token and formulation ('ddpm' or 'rf') options."
        )
    hidden, heads = fields["hidden_size"], fields["num_heads"]
    if hidden % heads:
        raise CheckpointError(f"hidden_size={hidden} is not divisible by {fields.describe('num_heads')}.")
    if not 1 <= fields["num_experts_per_tok"] <= fields["num_experts"]:
        raise CheckpointError(
            f"{fields.describe('num_experts_per_tok')} must be between 1 and the {fields['num_experts']} experts."
        )
    in_channels = fields["in_channels"]
    return dict(
        sample_size=fields["input_size"],
        patch_size=fields["patch_size"],
        in_channels=in_channels,
        out_channels=2 * in_channels if fields["learn_sigma"] else in_channels,
        num_layers=fields["depth"],
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        num_classes=fields["num_classes"],
        class_dropout_prob=fields["class_dropout_prob"],
        num_experts=fields["num_experts"],
        num_experts_per_tok=fields["num_experts_per_tok"],
        moe_intermediate_size=fields["moe_intermediate_size"],
        shared_expert_intermediate_size=fields["shared_expert_intermediate_size"],
        qk_norm="layer_norm" if fields["use_flash_attn"] else None,
        formulation=fields["formulation"],
    )


_RENAME_RULES = DIT_SKELETON_RENAME_RULES + [
    (r"blocks\.(\d+)\.attn\.Wqkv\.(weight|bias)", r"transformer_blocks.\1.attn.qkv.\2"),  # flash layout
    (r"blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"blocks\.(\d+)\.attn\.q_norm\.(weight|bias)", r"transformer_blocks.\1.attn.norm_q.\2"),
    (r"blocks\.(\d+)\.attn\.k_norm\.(weight|bias)", r"transformer_blocks.\1.attn.norm_k.\2"),
    (r"blocks\.(\d+)\.moe\.gate\.weight", r"transformer_blocks.\1.ff.router.weight"),
    (r"blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
     r"transformer_blocks.\1.ff.experts.\2.\3.weight"),
    (r"blocks\.(\d+)\.moe\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight",
     r"transformer_blocks.\1.ff.shared_experts.\2.weight"),
]  # fmt: skip


def convert_dit_moe(checkpoint: LoadedCheckpoint, config: dict) -> DiTMoETransformer2DModel:
    """
    Builds a `DiTMoETransformer2DModel` with `config` on the meta device and fills it with the tensors of
    `checkpoint`, consuming `checkpoint.state_dict` (its tensors become the model's parameters).

    Raises:
        CheckpointError: listing unconsumed, missing and mismatched keys when checkpoint and config disagree.
    """
    return build_converted_model(DiTMoETransformer2DModel, config, checkpoint.state_dict, _RENAME_RULES, "DiT-MoE")


def build_dit_moe_transformer(
    checkpoint: LoadedCheckpoint,
    config_path: str | None = None,
    preset: str | None = None,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    formulation: str | None = None,
) -> DiTMoETransformer2DModel:
    """
    Converts a DiT-MoE checkpoint; the options complete or override what the checkpoint records (see
    `dit_moe_config`).
    """
    config = dit_moe_config(checkpoint, config_path, preset, num_experts, experts_per_token, formulation)
    return convert_dit_moe(checkpoint, config)


DIT_MOE_MODEL_CARD = dict(
    family="DiT-MoE",
    paper="Scaling Diffusion Transformers to 16 Billion Parameters (Fei et al., 2024)",
    paper_url="https://arxiv.org/abs/2407.11633",
    upstream="https://github.com/feizc/DiT-MoE",
    license="other",
    license_note="The upstream repository ships no license file; check the original release before redistributing.",
    sampler=(
        "DDPM models (`ddpm-learned-sigma`, DiT-MoE-S/B): the folder's `DDPMScheduler` (linear betas, learned-range "
        "variance, `linspace` spacing) reproduces the original ancestral sampler on its evenly respaced grid; "
        "`DDIMScheduler.from_config(pipe.scheduler.config)` reproduces the original `ddimN` DDIM sampler (eta 0). "
        "The original guidance (`forward_with_cfg`) mixes only latent channels 0..2: pass `guidance_channels=3` to "
        "the pipeline to reproduce it exactly (the default guides all channels). Rectified-flow models "
        "(`rf-noise-at-1`, DiT-MoE-XL/G): Euler from t = 1 (noise) to 0 at t_i = i/N with guidance on the "
        "velocity; the folder's `FlowMatchEulerDiscreteScheduler(shift=1.0)` with sigmas i/N reproduces it (the "
        "original RF script uses 50 steps and guidance 7)."
    ),
    default_steps=50,
    default_guidance=4.0,
    results=(
        "ImageNet 256x256 class-conditional; see the paper for FID-50K of the released models "
        "(DiT-MoE-S/2-8E2A, -S/2-16E2A, -B/2-8E2A, -XL/2-8E2A, -G/2-16E2A)."
    ),
)


def original_dit_moe_state_dict(model: DiTMoETransformer2DModel) -> dict[str, torch.Tensor]:
    """The `models.DiT` state dict of `model`: the flash attention layout for a model with q/k norms, else timm's."""
    rules = _RENAME_RULES
    if model.config["qk_norm"] is not None:  # the first rule that produces a key wins: the flash names first
        rules = sorted(_RENAME_RULES, key=lambda rule: not re.search(r"Wqkv|out_proj", rule[0]))
    return {**original_state_dict(model, rules), **fixed_pos_embed(model)}


def write_original_dit_moe(model: DiTMoETransformer2DModel, folder: str) -> dict:
    """`model` as the original DiT-MoE code saves it (the flash attention layout for a model with q/k norms, else
    timm's), with its `models.DiT` arguments and formulation (see `FamilyConverter.write_original`)."""
    config = model.config
    flash = config["qk_norm"] is not None
    if flash and config["qk_norm"] != "layer_norm":
        raise ValueError("The original flash attention layout has LayerNorm q/k norms.")
    arguments = dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        depth=config["num_layers"],
        num_heads=config["num_attention_heads"],
        class_dropout_prob=config["class_dropout_prob"],
        num_classes=config["num_classes"],
        num_experts=config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        learn_sigma=config["out_channels"] == 2 * config["in_channels"],
        use_flash_attn=flash,
        formulation=config["formulation"],
    )
    return write_original_files(folder, original_dit_moe_state_dict(model), arguments)


DIT_MOE_CONVERTER = FamilyConverter(build_dit_moe_transformer, DIT_MOE_MODEL_CARD, write_original_dit_moe)
