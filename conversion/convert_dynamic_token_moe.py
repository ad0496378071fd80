"""DiffMoE (Shi et al. 2025; KwaiVGI/DiffMoE `models/models_DiffMoE.py`, also the DiffMoE baselines of
yhlleo/EfficientMoE) checkpoints -> `DynamicTokenMoETransformer2DModel`. Not Diff-MoE (Cheng et al.).

The architecture is not stored in the checkpoints: it comes from the training yaml (`model.params`, the constructor
arguments of `models_DiffMoE.DiT`) or from a preset name. The calibrated `expert_threshold` and `ema_decay` buffers
are taken from the checkpoint.
"""

from diffmoe_hf.families import get_family
from diffmoe_hf.models.transformer_dynamic_token_moe import (
    _RELEASED_COMMON,
    DYNAMIC_TOKEN_MOE_PRESETS,
    DynamicTokenMoETransformer2DModel,
)

from .checkpoint_io import CheckpointError, LoadedCheckpoint
from .convert_dsmoe import config_from_yaml_or_preset, efficient_moe_dit_config, efficient_moe_dit_params
from .family_converter import FamilyConverter, write_original_files
from .state_dict_utils import (
    DIT_SKELETON_RENAME_RULES,
    build_converted_model,
    fixed_pos_embed,
    original_state_dict,
    resolve_checkpoint_preset,
)


def diffmoe_config_from_params(params: dict) -> dict:
    """Maps `models_DiffMoE.DiT` constructor arguments (yaml `model.params`) to the model config."""
    if params.get("use_swiglu"):
        raise CheckpointError(
            "use_swiglu=True is not supported: every DiffMoE (Shi et al.) config uses GELU-tanh experts."
        )
    moe = params.get("MoE_config")
    if not isinstance(moe, dict) or "capacity" not in moe or "num_experts" not in moe:
        raise CheckpointError(
            "model.params.MoE_config has no num_experts/capacity: this does not look like a DiffMoE "
            "(Shi et al., models_DiffMoE.DiT) config."
        )
    config = efficient_moe_dit_config(params)
    depth, dim = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    return dict(
        config,
        moe_layers=[i for i in range(depth) if i % 2 == 1 or not moe.get("interleave")],
        num_experts=moe["num_experts"],
        moe_intermediate_size=int(dim * config["mlp_ratio"]),  # upstream's experts are as wide as its dense MLPs
        capacity=float(moe["capacity"]),
        # upstream builds one shared MLP (width 8 * hidden_size) whenever n_shared_experts > 0
        shared_expert_intermediate_size=8 * dim if moe.get("n_shared_experts", 0) > 0 else 0,
        capacity_loss_weight=float(params.get("CapacityPred_loss_weight", 0.01)),
    )


def diffmoe_config_from_preset(name: str) -> dict:
    key = resolve_checkpoint_preset("dynamic-token-moe", DYNAMIC_TOKEN_MOE_PRESETS, name)
    return {**_RELEASED_COMMON, **DYNAMIC_TOKEN_MOE_PRESETS[key]}


_RENAME_RULES = DIT_SKELETON_RENAME_RULES + [
    # timm Mlp fc1 / fc2 -> diffusers FeedForward net.0.proj / net.2 (dense layers, experts, shared experts)
    (r"blocks\.(\d+)\.mlp\.((?:experts\.\d+\.|shared_experts\.)?)fc1\.(weight|bias)",
     r"transformer_blocks.\1.ff.\2net.0.proj.\3"),
    (r"blocks\.(\d+)\.mlp\.((?:experts\.\d+\.|shared_experts\.)?)fc2\.(weight|bias)",
     r"transformer_blocks.\1.ff.\2net.2.\3"),
    (r"blocks\.(\d+)\.mlp\.gate_weight", r"transformer_blocks.\1.ff.router.weight"),
    (r"blocks\.(\d+)\.mlp\.capacity_predictor\.0\.(weight|bias)",
     r"transformer_blocks.\1.ff.capacity_predictor.linear_1.\2"),
    (r"blocks\.(\d+)\.mlp\.capacity_predictor\.2\.(weight|bias)",
     r"transformer_blocks.\1.ff.capacity_predictor.linear_2.\2"),
    (r"blocks\.(\d+)\.mlp\.(expert_threshold|ema_decay)", r"transformer_blocks.\1.ff.capacity_predictor.\2"),
]  # fmt: skip


def convert_dynamic_token_moe(checkpoint: LoadedCheckpoint, config: dict) -> DynamicTokenMoETransformer2DModel:
    """
    Builds a `DynamicTokenMoETransformer2DModel` with `config` and fills it from `checkpoint`, consuming every key.

    Raises:
        CheckpointError: listing unconsumed, missing and mismatched keys when checkpoint and config disagree.
    """
    return build_converted_model(
        DynamicTokenMoETransformer2DModel,
        config,
        checkpoint.state_dict,
        _RENAME_RULES,
        get_family("dynamic-token-moe").label,
    )


def build_dynamic_token_moe_transformer(
    checkpoint: LoadedCheckpoint, config_path: str | None = None, preset: str | None = None
) -> DynamicTokenMoETransformer2DModel:
    """Converts a DiffMoE (Shi et al.) checkpoint whose architecture is given by its training yaml or a preset name."""
    config = config_from_yaml_or_preset(
        config_path,
        preset,
        diffmoe_config_from_params,
        diffmoe_config_from_preset,
        "dynamic-token-moe",
        DYNAMIC_TOKEN_MOE_PRESETS,
    )
    return convert_dynamic_token_moe(checkpoint, config)


DIFFMOE_DTS_MODEL_CARD = dict(
    family="DiffMoE",
    paper="DiffMoE: Dynamic Token Selection for Scalable Diffusion Transformers (Shi et al., 2025)",
    paper_url="https://arxiv.org/abs/2503.14487",
    upstream="https://github.com/KwaiVGI/DiffMoE (DiffMoE baselines also in https://github.com/yhlleo/EfficientMoE)",
    license="apache-2.0",
    license_note="The upstream code is Apache-2.0; check the license of the original weights before redistributing.",
    sampler=(
        "Rectified flow, Euler, t_i = i/N from noise (t = 0) to data (t = 1), classifier-free guidance with "
        "separate conditional and null-class passes. `FlowMatchEulerDiscreteScheduler(shift=1.0)` with sigmas "
        "1 - i/N reproduces it. DiffMoE routes over the tokens of the whole batch, so a sample depends on the other "
        "samples generated with it (and on the batch size); the pipeline runs the conditional and unconditional "
        "batches as separate calls, as the original sampler does."
    ),
    default_steps=250,
    default_guidance=1.5,
    experts="{config.num_experts} experts choosing their tokens from the batch (dynamic capacity at inference)",
    results="See the DiffMoE paper and the EfficientMoE paper (DiffMoE baselines) for FID numbers.",
)


def write_original_dynamic_token_moe(model: DynamicTokenMoETransformer2DModel, folder: str) -> dict:
    """`model` as the original DiffMoE (Shi et al.) code saves it, with its training yaml (see
    `FamilyConverter.write_original`)."""
    config = model.config
    depth, dim = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    interleave = list(config["moe_layers"]) == list(range(1, depth, 2))
    if not interleave and list(config["moe_layers"]) != list(range(depth)):
        raise ValueError("The original DiffMoE has MoE in every block or in the odd ones.")
    if config["shared_expert_intermediate_size"] not in (0, 8 * dim):
        raise ValueError("The original DiffMoE's shared MLP is 8 * hidden_size wide (or absent).")
    moe = dict(
        num_experts=config["num_experts"],
        capacity=float(config["capacity"]),
        interleave=interleave,
        n_shared_experts=int(config["shared_expert_intermediate_size"] > 0),
    )
    params = dict(
        efficient_moe_dit_params(config),
        MoE_config=moe,
        CapacityPred_loss_weight=float(config["capacity_loss_weight"]),
    )
    state_dict = {**original_state_dict(model, _RENAME_RULES), **fixed_pos_embed(model)}
    return write_original_files(folder, state_dict, {"model": {"params": params}})


DYNAMIC_TOKEN_MOE_CONVERTER = FamilyConverter(
    build_dynamic_token_moe_transformer, DIFFMOE_DTS_MODEL_CARD, write_original_dynamic_token_moe
)
