"""JiT / JiTMoE (yhlleo/EfficientMoE `JiTMoE/`) checkpoints -> `JiTTransformer2DModel`.

Reads `checkpoint-last.pth` (`model`, `model_ema1`, `model_ema2`, `optimizer`, `epoch`, `args`; the sampler uses
`model_ema1`) and bare state dicts, with or without the `Denoiser`'s `net.` prefix. The architecture is the
checkpoint's `args.model` preset (`JiT_models` of `model_jit.py`), a `--preset`, or a config file with the `JiT(...)`
constructor arguments; the sampling parameters (`noise_scale`, `t_eps`, `label_drop_prob`) come from `args`.
"""

import argparse
import logging

from diffmoe_hf.models.transformer_jit import (
    JIT_PRESET_ALIASES,
    JIT_PRESETS,
    JiTTransformer2DModel,
    jit_preset_config,
)

from .checkpoint_io import CheckpointError, LoadedCheckpoint
from .config_sources import read_config_file, require_config_or_preset
from .family_converter import FamilyConverter, deepseek_moe_config, write_original_files
from .state_dict_utils import (
    DIT_SKELETON_RENAME_RULES,
    QKV_SPLIT,
    build_converted_model,
    fixed_pos_embed,
    original_state_dict,
    resolve_checkpoint_preset,
)


logger = logging.getLogger(__name__)

# `JiT.__init__` defaults, for arguments a config file leaves out
_JIT_DEFAULTS = dict(
    input_size=256,
    patch_size=16,
    in_channels=3,
    hidden_size=1024,
    depth=24,
    num_heads=16,
    mlp_ratio=4.0,
    num_classes=1000,
    bottleneck_dim=128,
    in_context_len=32,
    in_context_start=8,
)
# `main_jit.get_args_parser` defaults of the sampling / training parameters the converted config records
_ARGS_DEFAULTS = dict(label_drop_prob=0.1, noise_scale=1.0, t_eps=0.05)

# SwiGLUFFN computes w3(silu(a) * b) for the halves (a, b) of w12
_FUSED = (QKV_SPLIT, ("w12", ("gate_proj", "up_proj")))
_RENAME_RULES = DIT_SKELETON_RENAME_RULES + [
    (r"x_embedder\.proj1\.weight", r"pos_embed.patch_proj.weight"),
    (r"x_embedder\.proj2\.(weight|bias)", r"pos_embed.hidden_proj.\1"),
    (r"in_context_posemb", r"in_context_pos_embed"),
    (r"blocks\.(\d+)\.norm([12])\.weight", r"transformer_blocks.\1.norm\2.weight"),
    (r"blocks\.(\d+)\.attn\.([qk])_norm\.weight", r"transformer_blocks.\1.attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"transformer_blocks.\1.ff.w12.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"transformer_blocks.\1.ff.down_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)", r"transformer_blocks.\1.ff.router.\2"),
    (r"blocks\.(\d+)\.mlp\.experts\.blocks\.(\d+)\.w12\.(weight|bias)", r"transformer_blocks.\1.ff.experts.\2.w12.\3"),
    (r"blocks\.(\d+)\.mlp\.experts\.blocks\.(\d+)\.w3\.(weight|bias)",
     r"transformer_blocks.\1.ff.experts.\2.down_proj.\3"),
    (r"blocks\.(\d+)\.mlp\.shared_experts\.w12\.(weight|bias)", r"transformer_blocks.\1.ff.shared_experts.w12.\2"),
    (r"blocks\.(\d+)\.mlp\.shared_experts\.w3\.(weight|bias)", r"transformer_blocks.\1.ff.shared_experts.down_proj.\2"),
    (r"final_layer\.norm_final\.weight", r"proj_out.norm.weight"),
]  # fmt: skip


def _as_dict(args) -> dict:
    if args is None:
        return {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def _sampling_config(args: dict) -> dict:
    values = {key: args.get(key, default) for key, default in _ARGS_DEFAULTS.items()}
    return dict(
        class_dropout_prob=float(values["label_drop_prob"]),
        noise_scale=float(values["noise_scale"]),
        t_eps=float(values["t_eps"]),
    )


def jit_config_from_kwargs(kwargs: dict, args: dict | None = None) -> dict:
    """
    Maps `model_jit.JiT` constructor arguments (plus the training `args` for the sampling parameters) to
    `JiTTransformer2DModel` config. As upstream, a `moe_config` makes the odd blocks MoE only with `interleave: true`
    and gives an all-dense model otherwise.
    """
    unknown = sorted(set(kwargs) - set(_JIT_DEFAULTS) - {"moe_config", "attn_drop", "proj_drop"})
    if unknown:
        raise CheckpointError(f"Unknown JiT constructor arguments {unknown}; is this a JiT config?")
    kw = {**_JIT_DEFAULTS, **kwargs}
    hidden, heads, depth = kw["hidden_size"], kw["num_heads"], kw["depth"]
    if hidden % heads:
        raise CheckpointError(f"hidden_size={hidden} is not divisible by num_heads={heads}.")
    config = dict(
        sample_size=kw["input_size"],
        patch_size=kw["patch_size"],
        in_channels=kw["in_channels"],
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        mlp_ratio=float(kw["mlp_ratio"]),
        num_classes=kw["num_classes"],
        bottleneck_dim=kw["bottleneck_dim"],
        in_context_len=kw["in_context_len"],
        in_context_start=kw["in_context_start"],
        moe_layers=[],
        **_sampling_config(args or {}),
    )
    moe = kw.get("moe_config")
    if moe:
        if moe.get("hidden_size", hidden) != hidden:
            raise CheckpointError(f"moe_config.hidden_size={moe['hidden_size']} differs from hidden_size={hidden}.")
        if not moe.get("interleave"):
            logger.warning("moe_config has interleave=False: the original JiT builds an all-dense model (no MoE).")
        else:
            config.update(
                moe_layers=list(range(1, depth, 2)),
                num_experts=moe["num_experts"],
                num_experts_per_tok=moe["num_experts_per_tok"],
                moe_intermediate_size=moe["moe_intermediate_size"],
                n_group=moe["n_group"],
                topk_group=moe["topk_group"],
                routed_scaling_factor=float(moe["routed_scaling_factor"]),
                shared_expert_intermediate_size=(
                    moe["moe_intermediate_size"] if moe.get("use_shared_expert", True) else 0
                ),
            )
    return config


def jit_config_from_preset(name: str, args: dict | None = None) -> dict:
    """A released preset, at the image size and class count of the training `args` (256 / 1000 without args)."""
    try:
        config = jit_preset_config(name)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    args = args or {}
    if "img_size" in args:
        config["sample_size"] = int(args["img_size"])
    if "class_num" in args:
        config["num_classes"] = int(args["class_num"])
    return {**config, **_sampling_config(args)}


def read_jit_config_file(path: str) -> tuple[dict, dict]:
    """
    Reads a YAML or JSON file holding the `JiT(...)` constructor arguments, either bare or as the `net_kwargs` of an
    argument record (which may also hold the training `args`). Returns `(constructor kwargs, args)`.
    """
    record = read_config_file(path, "JiT constructor arguments")
    if isinstance(record.get("net_kwargs"), dict):
        return record["net_kwargs"], record.get("args") or {}
    if {"depth", "hidden_size"} & set(record):
        return record, {}
    raise CheckpointError(
        f"{path} holds neither JiT constructor arguments (depth, hidden_size, ...) nor a `net_kwargs` section."
    )


def convert_jit(checkpoint: LoadedCheckpoint, config: dict) -> JiTTransformer2DModel:
    """
    Builds a `JiTTransformer2DModel` with `config` and fills it from `checkpoint`, consuming every source key.

    Raises:
        CheckpointError: listing unconsumed, missing and mismatched keys when checkpoint and config disagree.
    """
    return build_converted_model(JiTTransformer2DModel, config, checkpoint.state_dict, _RENAME_RULES, "JiT", _FUSED)


def _same_preset(first: str, second: str) -> bool:
    try:
        return resolve_checkpoint_preset("jit", JIT_PRESETS, first, JIT_PRESET_ALIASES) == resolve_checkpoint_preset(
            "jit", JIT_PRESETS, second, JIT_PRESET_ALIASES
        )
    except ValueError:
        return first == second


def build_jit_transformer(
    checkpoint: LoadedCheckpoint, config_path: str | None = None, preset: str | None = None
) -> JiTTransformer2DModel:
    """
    Converts a JiT / JiTMoE checkpoint. The architecture comes from `config_path` (constructor arguments, for
    custom models), else `preset`, else the checkpoint's `args.model`; a `preset` that contradicts `args.model` is
    refused.
    """
    args = _as_dict(checkpoint.args)
    require_config_or_preset(config_path, preset, "a JiT config file")
    if config_path is not None:
        kwargs, file_args = read_jit_config_file(config_path)
        config = jit_config_from_kwargs(kwargs, args or file_args)
    else:
        trained_as = args.get("model")
        if preset is not None and trained_as is not None and not _same_preset(preset, trained_as):
            raise CheckpointError(
                f"--preset {preset!r} contradicts the checkpoint, which was trained as {trained_as!r}."
            )
        name = preset if preset is not None else trained_as
        if name is None:
            raise CheckpointError(
                "This checkpoint does not record its architecture (no args.model): pass a preset (--preset, e.g. "
                "JiTMoE-B/16-E16) or a config file with the JiT constructor arguments (--config)."
            )
        config = jit_config_from_preset(name, args)
    return convert_jit(checkpoint, config)


JIT_MODEL_CARD = dict(
    family="JiT",
    paper="Efficient Training of Diffusion Mixture-of-Experts Models: A Practical Recipe (Liu et al., 2025); JiT: "
    "Back to Basics: Let Denoising Generative Models Denoise (Li & He, 2025)",
    paper_url="https://arxiv.org/abs/2512.01252",
    upstream="https://github.com/yhlleo/EfficientMoE (JiTMoE/)",
    license="other",
    license_note="The upstream repository ships no license file; check the original release before redistributing.",
    sampler=(
        "Pixel-space flow (t = 0 noise, t = 1 data) with an x-predicting model, turned into the velocity "
        "(x - z) / max(1 - t, t_eps). Heun on the grid t_i = i/N with a final Euler step "
        "(`FlowMatchHeunDiscreteScheduler`, the default here; `FlowMatchEulerDiscreteScheduler` gives the Euler "
        "sampler), classifier-free guidance only for 0.1 < t < 1.0 (`guidance_interval`). The released scripts "
        "sample with 50 steps at guidance 2.9."
    ),
    default_steps=50,
    default_guidance=2.9,
    results="See the upstream README (ImageNet 256x256, FID-50K, JiTMoE-B/16-E16 and JiTMoE-L/16-E16).",
)


def write_original_jit(model: JiTTransformer2DModel, folder: str) -> dict:
    """`model` as the original JiT code saves it, with its `JiT(...)` arguments and the training args that set the
    sampling parameters (see `FamilyConverter.write_original`)."""
    config = model.config
    depth, dim = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    net_kwargs = dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        hidden_size=dim,
        depth=depth,
        num_heads=config["num_attention_heads"],
        mlp_ratio=float(config["mlp_ratio"]),
        num_classes=config["num_classes"],
        bottleneck_dim=config["bottleneck_dim"],
        in_context_len=config["in_context_len"],
        in_context_start=config["in_context_start"],
    )
    if list(config["moe_layers"]) == list(range(1, depth, 2)):
        net_kwargs["moe_config"] = dict(hidden_size=dim, interleave=True, **deepseek_moe_config(config, "JiTMoE"))
    elif config["moe_layers"]:
        raise ValueError("The original JiT has MoE in the odd blocks or in none.")
    args = dict(label_drop_prob=config["class_dropout_prob"], noise_scale=config["noise_scale"], t_eps=config["t_eps"])
    state_dict = {**original_state_dict(model, _RENAME_RULES, _FUSED), **fixed_pos_embed(model)}
    return write_original_files(folder, state_dict, {"net_kwargs": net_kwargs, "args": args})


JIT_CONVERTER = FamilyConverter(build_jit_transformer, JIT_MODEL_CARD, write_original_jit)
