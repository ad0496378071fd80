"""`convert_checkpoint`: original checkpoint -> Hub-ready pipeline folder, for every supported family."""

import inspect
import json
import logging
import os

from diffmoe_hf.dtypes import DTYPES
from diffmoe_hf.families import get_family, match_published_settings, resolve_family
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.labels import imagenet_id2label
from diffmoe_hf.pipelines import ClassConditionalMoEPipeline
from diffmoe_hf.published_settings import SETTINGS_FILE, model_card_section

from .checkpoint_io import load_original_checkpoint
from .finite_weights import check_finite_after_cast, check_finite_checkpoint
from .hub_folder import (
    check_output_dir,
    check_shard_size,
    push_folder_to_hub,
    recover_interrupted_save,
    save_folder_atomically,
)
from .model_card import render_model_card
from .streamed_save import save_pipeline_transformer_streamed
from .vae_source import check_vae_source, load_vae


logger = logging.getLogger(__name__)


def family_options(family: str) -> list[str]:
    """
    The family-specific keyword arguments `convert_checkpoint` accepts for `family` (a family id or alias), beyond
    config_path and preset.
    """
    parameters = inspect.signature(get_family(family).load_converter().build).parameters
    return [name for name in list(parameters)[1:] if name not in ("config_path", "preset")]


def _check_input_files(config_path: str | None, id2label_path: str | None) -> None:
    """Refuses missing input files, and folders given for them, before the (possibly long) checkpoint load."""
    for path, option in ((config_path, "--config"), (id2label_path, "--id2label")):
        if path is not None and os.path.isdir(path):
            raise IsADirectoryError(f"{option} {path} is a folder: give the file ({option} FILE).")
    if config_path is not None and not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"Config file {config_path} does not exist (--config): give the original training config (.yaml) that "
            "produced the checkpoint or the model's constructor kwargs as .json/.yaml (or, for a released "
            "architecture, --preset NAME)."
        )
    if id2label_path is not None and not os.path.isfile(id2label_path):
        raise FileNotFoundError(f"Class-name file {id2label_path} does not exist (--id2label).")


def _load_id2label(path: str | None, num_classes: int) -> dict[str, str] | None:
    if path is None:
        return imagenet_id2label() if num_classes == 1000 else None
    example = '{"0": "tench, Tinca tinca", "1": "goldfish", ...}'
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"Class-name file {path} (--id2label) is not valid JSON ({err}); it must map class ids "
            f"to names, e.g. {example}."
        ) from None
    if not isinstance(names, dict):
        raise ValueError(
            f"Class-name file {path} (--id2label) holds a JSON {type(names).__name__}, not an object "
            f"mapping class ids to names, e.g. {example}."
        )
    id2label = {str(k).strip(): str(v) for k, v in names.items()}
    if set(id2label) != {str(i) for i in range(num_classes)}:
        raise ValueError(
            f"Class-name file {path} (--id2label) must name exactly the classes 0..{num_classes - 1} "
            f"of this model, one name each, e.g. {example}."
        )
    return id2label


def build_pipeline(transformer, vae_path: str | None = None, id2label_path: str | None = None):
    """A `ClassConditionalMoEPipeline` around a converted transformer, with the scheduler of its formulation."""
    vae = None if vae_path is None else load_vae(vae_path)
    scheduler = get_formulation(transformer.config.formulation).default_scheduler()
    id2label = _load_id2label(id2label_path, transformer.config.num_classes)
    return ClassConditionalMoEPipeline(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label)


def convert_checkpoint(
    family: str,
    checkpoint_path: str,
    output_dir: str,
    config_path: str | None = None,
    preset: str | None = None,
    weights: str = "ema",
    dtype: str = "fp32",
    vae_path: str | None = None,
    id2label_path: str | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    max_shard_size: str = "5GB",
    hub_layout: str = "package",
    push_to_hub: str | None = None,
    token: str | None = None,
    **options,
) -> str:
    """
    Converts an original checkpoint into a diffusers folder: `transformer/` (safetensors + config), `scheduler/`
    reproducing the upstream sampler, `model_index.json` (with class names), optional `vae/`, and a model card.
    Nothing is written unless the whole conversion succeeds.

    Args:
        family: a registered family id or one of its aliases (`diffmoe_hf.families.family_names()`).
        checkpoint_path: original `.pt`/`.pth` or `.safetensors` file.
        output_dir: folder to create; an existing non-empty one is refused unless `overwrite`.
        config_path, preset: the architecture, for families whose checkpoints do not record it.
        weights: `"ema"` (default) or `"model"`.
        dtype: `"fp32"`, `"fp16"` or `"bf16"` for the saved transformer (routers stay fp32).
        vae_path: `AutoencoderKL` folder (or Hub repo id) to include as `vae/` (`vae_source.load_vae`).
        id2label_path: JSON `{class id: "name, synonym"}`; ImageNet names are used for 1000-class models.
        trust_checkpoint: allow arbitrary pickled objects in the checkpoint.
        max_shard_size: shard size for the safetensors files.
        hub_layout: `"package"` or `"remote_code"` (adds shims for `DiffusionPipeline.from_pretrained`).
        push_to_hub: repo id to upload the finished folder to.
        options: family-specific settings (`family_options(family)`), e.g. for `"spatial-temporal-moe"`:
            `num_experts`, `experts_per_token`, `formulation` (`"ddpm"` or `"rf"`).

    Returns:
        `output_dir`.
    """
    checkpoint_path, output_dir = os.fspath(checkpoint_path), os.fspath(output_dir)
    family = resolve_family(family)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    unknown = sorted(set(options) - set(family_options(family)))
    if unknown:
        raise ValueError(
            f"The {family} converter does not take {', '.join(unknown)}; its options are: "
            f"{', '.join(['config_path', 'preset', *family_options(family)])}."
        )
    for action in recover_interrupted_save(output_dir):
        logger.warning(action)
    check_output_dir(output_dir, overwrite)
    check_shard_size(max_shard_size)
    _check_input_files(config_path, id2label_path)
    if vae_path is not None:
        check_vae_source(vae_path)
    converter = get_family(family).load_converter()
    checkpoint = load_original_checkpoint(
        checkpoint_path, weights=weights, trust_checkpoint=trust_checkpoint, mmap=True
    )
    check_finite_checkpoint(checkpoint.state_dict, checkpoint_path, checkpoint.source)
    transformer = converter.build(checkpoint, config_path=config_path, preset=preset, **options)
    # the transformer keeps the checkpoint's (memory-mapped) tensors; each is cast when its shard is written
    check_finite_after_cast(transformer, dtype)
    save_pipeline_transformer_streamed(transformer, DTYPES[dtype])
    pipeline = build_pipeline(transformer, vae_path, id2label_path)
    card = render_model_card(
        converter.model_card,
        family,
        transformer,
        os.path.basename(checkpoint_path),
        checkpoint.source,
        dtype,
        hub_layout,
    )
    extra_files = {"README.md": card}
    published = match_published_settings(family, transformer.config)
    if published is not None:  # a released model: its published sampler and numbers go into the folder
        pipeline.register_to_config(default_guidance_scale=published.guidance_scale)
        extra_files = {"README.md": card + model_card_section(published), SETTINGS_FILE: published.to_json()}
    save_folder_atomically(pipeline, output_dir, overwrite, max_shard_size, extra_files, hub_layout)
    if push_to_hub:
        push_folder_to_hub(output_dir, push_to_hub, token=token)
    return output_dir
