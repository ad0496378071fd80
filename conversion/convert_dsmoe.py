"""DSMoE (yhlleo/EfficientMoE `DSMoE/`) checkpoints -> `DSMoETransformer2DModel`.

The architecture is not stored in DSMoE checkpoints: it comes from the training yaml (`model.params`, the constructor
arguments of `models_DSMoE.DiT`) or from a released preset name.
"""

from diffmoe_hf.families import get_family
from diffmoe_hf.models.transformer_dsmoe import _RELEASED_COMMON, DSMOE_PRESETS, DSMoETransformer2DModel

from .checkpoint_io import CheckpointError, LoadedCheckpoint
from .config_sources import read_config_file, require_config_or_preset
from .family_converter import FamilyConverter, deepseek_moe_config, write_original_files
from .state_dict_utils import (
    DIT_SKELETON_RENAME_RULES,
    build_converted_model,
    fixed_pos_embed,
    original_state_dict,
    resolve_checkpoint_preset,
)


_ROPE = {"2d": "rope_2d", "1d": "rope_1d", "none": "sincos"}
_NORM = {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}


def read_yaml_model_params(path: str) -> dict:
    """The `model.params` block of an EfficientMoE training yaml (DSMoE, or DiffMoE of Shi et al.)."""
    config = read_config_file(path, "training config")
    params = (config.get("model") or {}).get("params")
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} has no model.params section; pass the yaml the model was trained with.")
    basic = config.get("basic") or {}
    if basic.get("rf") is False:
        raise CheckpointError(f"{path} trains with DDPM (basic.rf: false); only rectified-flow models are supported.")
    return params


def _moe_layers(num_layers: int, moe: dict) -> list[int]:
    """The upstream layer flags: all MoE, or odd layers with `interleave`; then `skip_first2` makes the first two
    (True) or first n (an int) layers dense."""
    flags = [i % 2 == 1 for i in range(num_layers)] if moe.get("interleave") else [True] * num_layers
    skip = moe.get("skip_first2", False)
    if skip is None:
        raise CheckpointError("MoE_config.skip_first2 is missing (the legacy yamls crash upstream too); set it.")
    first_dense = (2 if skip else 0) if isinstance(skip, bool) else int(skip)
    return [i for i, flag in enumerate(flags) if flag and i >= first_dense]


def efficient_moe_dit_config(params: dict) -> dict:
    """
    The DiT fields every yhlleo/EfficientMoE model config shares (its DSMoE and DiffMoE yamls' `model.params`: sizes,
    heads, classes, label dropout), in this package's names, with the original defaults.
    """
    hidden, heads = params.get("hidden_size", 1152), params.get("num_heads", 16)
    head_dim = params.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(f"hidden_size={hidden} with num_heads={heads} and head_dim={head_dim} is not supported.")
    in_channels = params.get("in_channels", 4)
    return dict(
        sample_size=params.get("input_size", 32),
        patch_size=params.get("patch_size", 2),
        in_channels=in_channels,
        out_channels=2 * in_channels if params.get("learn_sigma", True) else in_channels,
        num_layers=params.get("depth", 28),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        mlp_ratio=float(params.get("mlp_ratio", 4.0)),
        num_classes=params.get("num_classes", 1000),
        class_dropout_prob=params.get("class_dropout_prob", 0.1),
    )


def dsmoe_config_from_params(params: dict) -> dict:
    """Maps `models_DSMoE.DiT` constructor arguments (yaml `model.params`) to `DSMoETransformer2DModel` config."""
    for flag in ("use_sinks", "enable_gqa", "use_kda"):
        if params.get(flag):
            raise CheckpointError(
                f"{flag}=True is not supported: no released DSMoE uses it (attention sinks are broken upstream, KDA "
                "needs flash-linear-attention)."
            )
    moe = params.get("MoE_config")
    if not isinstance(moe, dict):
        raise CheckpointError("model.params has no MoE_config; this does not look like a DSMoE config.")
    rope = params.get("rope_type", "none")
    norm = params.get("norm_type", "layernorm")
    if rope not in _ROPE or norm not in _NORM:
        raise CheckpointError(f"Unsupported rope_type={rope!r} or norm_type={norm!r}.")
    config = efficient_moe_dit_config(params)
    return dict(
        config,
        positional_embedding=_ROPE[rope],
        norm_type=_NORM[norm],
        moe_layers=_moe_layers(config["num_layers"], moe),
        num_experts=moe["num_experts"],
        num_experts_per_tok=moe["num_experts_per_tok"],
        moe_intermediate_size=moe["moe_intermediate_size"],
        n_group=moe["n_group"],
        topk_group=moe["topk_group"],
        routed_scaling_factor=float(moe["routed_scaling_factor"]),
        shared_expert_intermediate_size=moe["moe_intermediate_size"] if moe.get("use_shared_expert", True) else 0,
    )


def dsmoe_config_from_preset(name: str) -> dict:
    return {**_RELEASED_COMMON, **DSMOE_PRESETS[resolve_checkpoint_preset("dsmoe", DSMOE_PRESETS, name)]}


_RENAME_RULES = DIT_SKELETON_RENAME_RULES + [
    (r"blocks\.(\d+)\.norm([12])\.weight", r"transformer_blocks.\1.norm\2.weight"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"blocks\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)", r"transformer_blocks.\1.ff.router.\2"),
    (r"blocks\.(\d+)\.mlp\.experts\.blocks\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
     r"transformer_blocks.\1.ff.experts.\2.\3.weight"),
    (r"blocks\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight",
     r"transformer_blocks.\1.ff.shared_experts.\2.weight"),
]  # fmt: skip


def convert_dsmoe(checkpoint: LoadedCheckpoint, config: dict) -> DSMoETransformer2DModel:
    """
    Builds a `DSMoETransformer2DModel` with `config` and fills it from `checkpoint`, consuming every source key.

    Raises:
        CheckpointError: listing unconsumed, missing and mismatched keys when checkpoint and config disagree.
    """
    return build_converted_model(
        DSMoETransformer2DModel,
        config,
        checkpoint.state_dict,
        _RENAME_RULES,
        "DSMoE",
    )


def config_from_yaml_or_preset(config_path, preset, from_params, from_preset, family: str, presets) -> dict:
    """
    The architecture of a family whose checkpoints do not record it (`family`: `"dsmoe"` or `"dynamic-token-moe"`):
    `from_params` applied to the training yaml's `model.params`, or `from_preset(preset)`; exactly one of
    `config_path` and `preset` is needed.
    """
    require_config_or_preset(config_path, preset, "the training yaml")
    if config_path is not None:
        return from_params(read_yaml_model_params(config_path))
    if preset is not None:
        return from_preset(preset)
    raise CheckpointError(
        f"{get_family(family).label} checkpoints do not store their architecture: pass the training yaml (--config "
        "ORIGINAL.yaml) or "
        f"a preset (--preset, one of {', '.join(presets)})."
    )


def build_dsmoe_transformer(
    checkpoint: LoadedCheckpoint, config_path: str | None = None, preset: str | None = None
) -> DSMoETransformer2DModel:
    """Converts a DSMoE checkpoint whose architecture is given by its training yaml or a released preset name."""
    config = config_from_yaml_or_preset(
        config_path, preset, dsmoe_config_from_params, dsmoe_config_from_preset, "dsmoe", DSMOE_PRESETS
    )
    return convert_dsmoe(checkpoint, config)


DSMOE_MODEL_CARD = dict(
    family="DSMoE",
    paper="Efficient Training of Diffusion Mixture-of-Experts Models: A Practical Recipe (Liu et al., 2025)",
    paper_url="https://arxiv.org/abs/2512.01252",
    upstream="https://github.com/yhlleo/EfficientMoE (DSMoE/)",
    license="other",
    license_note="The upstream repository ships no license file; check the original release before redistributing.",
    sampler=(
        "Rectified flow, Euler, t_i = i/N from noise (t = 0) to data (t = 1), classifier-free guidance with "
        "separate conditional and null-class passes. `FlowMatchEulerDiscreteScheduler(shift=1.0)` with sigmas "
        "1 - i/N reproduces it; the paper evaluates with 250 steps at guidance 1.0 and 1.5."
    ),
    default_steps=250,
    default_guidance=1.5,
    results=(
        "ImageNet 256x256, 700K steps, FID-50K (upstream README):\n\n"
        "| model | activated params | FID (cfg 1.0) | FID (cfg 1.5) |\n|---|---|---|---|\n"
        "| DSMoE-S-E16 | 33M | 39.84 | 14.53 |\n| DSMoE-S-E48 | 30M | 40.20 | 14.81 |\n"
        "| DSMoE-B-E16 | 132M | 20.33 | 4.50 |\n| DSMoE-B-E48 | 118M | 19.46 | 4.27 |\n"
        "| DSMoE-L-E16 | 465M | 9.80 | 2.59 |\n| DSMoE-L-E48 | 436M | 9.19 | 2.55 |\n"
        "| DSMoE-3B-E16 | 965M | 7.52 | 2.38 |"
    ),
)


def efficient_moe_dit_params(config) -> dict:
    """The inverse of `efficient_moe_dit_config`: the shared DiT fields of a model `config` as yaml `model.params`."""
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        learn_sigma=config["out_channels"] == 2 * config["in_channels"],
        depth=config["num_layers"],
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        num_heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"],
        mlp_ratio=float(config["mlp_ratio"]),
        num_classes=config["num_classes"],
        class_dropout_prob=config["class_dropout_prob"],
    )


def _moe_layer_flags(num_layers: int, moe_layers: list[int]) -> dict:
    """The inverse of `_moe_layers`: the `interleave` / `skip_first2` flags that give `moe_layers`."""
    for interleave in (False, True):
        first = moe_layers[0] if moe_layers else num_layers
        candidate = {"interleave": interleave, "skip_first2": first if interleave is False else first - 1}
        if _moe_layers(num_layers, candidate) == list(moe_layers):
            return candidate
    raise ValueError(f"moe_layers={moe_layers} is no layout of the original DSMoE code.")


def write_original_dsmoe(model: DSMoETransformer2DModel, folder: str) -> dict:
    """`model` as the original DSMoE code saves it, with its training yaml (see `FamilyConverter.write_original`)."""
    config = model.config
    moe = dict(deepseek_moe_config(config, "DSMoE"), **_moe_layer_flags(config["num_layers"], config["moe_layers"]))
    rope = {value: key for key, value in _ROPE.items()}[config["positional_embedding"]]
    norm = {value: key for key, value in _NORM.items()}[config["norm_type"]]
    params = dict(efficient_moe_dit_params(config), rope_type=rope, norm_type=norm, MoE_config=moe)
    state_dict = {**original_state_dict(model, _RENAME_RULES), **fixed_pos_embed(model)}
    return write_original_files(folder, state_dict, {"model": {"params": params}})


DSMOE_CONVERTER = FamilyConverter(build_dsmoe_transformer, DSMOE_MODEL_CARD, write_original_dsmoe)
