"""Checks that a saved model folder's `config.json` and weights agree, before diffusers loads them.

diffusers builds the model from `config.json` on the meta device and then fills it from the weights: a config that
was edited by hand (or belongs to other weights) loads with tensors left on the meta device ("Cannot copy out of meta
tensor" at the first call), or silently drops weights it has no place for. `check_folder_matches_config` compares the
weights files' tensor names and shapes (read from their headers, no tensor data) with those of the model the config
builds, and says what disagrees in a few lines.
"""

import json
import os
import re
from collections import defaultdict

import torch


WEIGHTS_NAME = "diffusion_pytorch_model"
# a tensor name with a numbered component (`transformer_blocks.3.attn...`): prefix, number, rest
_NUMBERED = re.compile(r"(.*?)\.(\d+)\.(.+)")
MAX_LINES = 8  # lines of each kind of disagreement before "... and N more"


def _index_ranges(indices) -> str:
    """`[4, 5]` -> `"4..5"`, `[1]` -> `"1"`, `[1, 3, 5, 6, 7]` -> `"[1,3,5..7]"`."""
    runs, ordered = [], sorted(indices)
    for index in ordered:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    parts = [str(a) if a == b else f"{a}..{b}" for a, b in runs]
    return parts[0] if len(parts) == 1 else "[" + ",".join(parts) + "]"


def key_patterns(keys) -> list[str]:
    """
    Tensor names summarised by their numbered components, e.g. the 28 names of blocks 4 and 5 as
    `transformer_blocks.4..5.*` and the experts 4..7 of blocks 1 and 3 as `transformer_blocks.[1,3].ff.experts.4..7.*`.
    """
    plain, by_prefix = [], defaultdict(lambda: defaultdict(set))
    for key in keys:
        match = _NUMBERED.fullmatch(key)
        if match is None:
            plain.append(key)
        else:
            prefix, index, rest = match.groups()
            by_prefix[prefix][int(index)].add(rest)
    lines = list(plain)
    for prefix, rests_by_index in by_prefix.items():
        indices_by_rests = defaultdict(list)
        for index, rests in rests_by_index.items():
            indices_by_rests[frozenset(rests)].append(index)
        for rests, indices in indices_by_rests.items():
            inner = key_patterns(rests)
            lines.append(f"{prefix}.{_index_ranges(indices)}.{inner[0] if len(inner) == 1 else '*'}")
    return sorted(lines)


def _shown(lines: list[str]) -> str:
    more = f"\n    ... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else ""
    return "\n    " + "\n    ".join(lines[:MAX_LINES]) + more


def _weights_files(folder: str, variant: str | None) -> list[str]:
    """
    The weights files of a model folder, as diffusers looks for them: `diffusion_pytorch_model[.VARIANT].safetensors`,
    or the shards its `.safetensors.index.json` lists (the same for `.bin`).

    Raises:
        FileNotFoundError: naming the file that is missing (a listed shard, or the weights file itself).
    """
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    for extension in ("safetensors", "bin"):
        single = os.path.join(folder, f"{stem}.{extension}")
        index = f"{single}.index.json"
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
            if missing:
                raise FileNotFoundError(
                    f"{folder} is missing {', '.join(missing)}, listed in {os.path.basename(index)}: copy every shard "
                    "of the model into the folder (or save the model again)."
                )
            return [os.path.join(folder, shard) for shard in shards]
    raise FileNotFoundError(
        f"{folder} has a config.json but no weights: {stem}.safetensors (or a sharded {stem}.safetensors.index.json "
        "with its shards) is missing. Copy the weights file into the folder, or save / convert the model again."
    )


def _stored_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every tensor in the weights files, read without loading the tensors."""
    shapes = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        else:
            state_dict = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({key: tuple(value.shape) for key, value in state_dict.items()})
    return shapes


def _expected_shapes(model_class, config: dict, folder: str) -> dict[str, tuple[int, ...]]:
    """
    Tensor name -> shape of every tensor `model_class.from_config(config)` saves, built without memory (with every
    expert, also when an expert-parallel rank loads only its own: the folder holds the full model).

    Raises:
        ValueError: when the config builds no model (the constructor's message, with the file it came from).
    """
    from accelerate import init_empty_weights

    from .moe.layers.expert_placement import holding_all_experts

    try:
        with init_empty_weights(include_buffers=False), holding_all_experts():
            model = model_class.from_config(config)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{os.path.join(folder, 'config.json')} describes no valid {model_class.__name__}: {err} Restore the "
            "config.json saved with the weights."
        ) from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_folder_matches_config(model_class, folder: str, variant: str | None = None) -> None:
    """
    Refuses a local model folder whose weights do not fit the model its `config.json` describes, before any weights
    are read: a missing weights file or shard, tensors the model has no place for, tensors it needs and the files lack,
    and shapes that differ. Folders of pre-quantized models (a `quantization_config` in `config.json`) store other
    shapes and are left to diffusers.

    Args:
        model_class: a diffusers `ModelMixin` class.
        folder: the folder with `config.json` and the weights (the `subfolder` already joined).
        variant: diffusers' weights variant (`"fp16"` for `diffusion_pytorch_model.fp16.safetensors`).

    Raises:
        FileNotFoundError: for a missing weights file, naming it.
        ValueError: naming the config field or the tensors that disagree.
    """
    config = model_class.load_config(folder)
    if config.get("quantization_config") is not None:
        return
    files = _weights_files(folder, variant)
    stored = _stored_shapes(files)
    expected = _expected_shapes(model_class, config, folder)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [
        f"tensor {key} has shape {list(stored[key])}, the config implies {list(expected[key])}"
        for key in sorted(set(stored) & set(expected))
        if stored[key] != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    blocks = {
        name: {int(m.group(1)) for m in map(re.compile(r"transformer_blocks\.(\d+)\..*").fullmatch, keys) if m}
        for name, keys in (("stored", stored), ("expected", expected))
    }
    if blocks["stored"] != blocks["expected"] and "num_layers" in config:
        problems.append(
            f"config num_layers={config['num_layers']} but the weights have transformer_blocks."
            f"{_index_ranges(blocks['stored']) if blocks['stored'] else '(none)'}"
        )
    if missing:
        problems.append(
            f"tensors the config needs and the weights lack ({len(missing)}):{_shown(key_patterns(missing))}"
        )
    if unexpected:
        problems.append(
            f"tensors in the weights the config has no place for ({len(unexpected)}):"
            f"{_shown(key_patterns(unexpected))}"
        )
    if mismatched:
        problems.append(f"shapes that differ ({len(mismatched)}):{_shown(mismatched)}")
    weights = os.path.basename(files[0]) if len(files) == 1 else f"{len(files)} weight shards"
    raise ValueError(
        f"{folder}: config.json does not match the weights ({weights}) for a {model_class.__name__}:\n  "
        + "\n  ".join(problems)
        + "\nThe config was edited or belongs to other weights: restore the config.json saved with these weights, "
        "or convert / save the model again."
    )


def check_no_tensor_left_on_meta(model: torch.nn.Module, source: str) -> None:
    """
    Refuses a model that loading left with tensors on the meta device: weights that had no values for some of the
    tensors the config builds (diffusers only warns, and the first call then fails with "Cannot copy out of meta
    tensor"). The check for any source, a Hub repo id included; local folders are compared before loading.

    Raises:
        ValueError: naming the tensors without values, summarised by `key_patterns`.
    """
    empty = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if empty:
        raise ValueError(
            f"{source}: the weights hold no values for {len(empty)} tensors of the model its config.json builds:"
            f"{_shown(key_patterns(empty))}\nThe config and the weights belong to different models (e.g. an edited "
            "num_layers); use the config.json that was saved with these weights."
        )
