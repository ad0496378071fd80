"""Key renaming that consumes the source dict, and strict loading with a readable report of what did not fit."""

import re

import torch
from torch import nn

from diffmoe_hf.families import get_family
from diffmoe_hf.models.presets import resolve_preset

from .checkpoint_io import CheckpointError
from .low_memory import init_empty_model


# Keys of the DiT skeleton the original families share (timm PatchEmbed, DiT timestep / label embedders, timm attention,
# block adaLN, final layer), as `rename_keys` rules to the shared diffmoe_hf modules; each family adds its own.
DIT_SKELETON_RENAME_RULES = [
    (r"x_embedder\.proj\.(weight|bias)", r"pos_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"embedding.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"embedding.timestep_embedder.linear_2.\1"),
    (r"y_embedder\.embedding_table\.weight", r"embedding.class_embedder.embedding_table.weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer_blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.modulation.linear.\2"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.proj.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"proj_out.modulation.linear.\1"),
]
QKV_SPLIT = ("attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))


def resolve_checkpoint_preset(family: str, presets: dict, name: str, aliases: dict | None = None) -> str:
    """
    The key of `presets` that `name` (a preset key or alias) refers to, as `diffmoe_hf.models.presets.resolve_preset`
    finds it; an unknown name is a `CheckpointError` that names the family and lists its presets and aliases.
    """
    try:
        return resolve_preset(get_family(family).label, presets, name, aliases)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def rename_keys(source: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """
    Moves every key of `source` matching one of `rules` (`(regex, replacement)`, first full match wins) into a new
    dict under its new name. Matched keys are popped, so whatever remains in `source` was not consumed.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    converted = {}
    for key in list(source):
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                converted[pattern.sub(replacement, key)] = source.pop(key)
                break
    return converted


def _capturing_groups(pattern: str) -> list[tuple[int, int]]:
    """The (start, end) spans of the capturing groups of a regex, in group-number order."""
    spans, opened, i = [], [], 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 1
        elif pattern[i] == "(":
            opened.append((i, not pattern.startswith("(?", i)))
        elif pattern[i] == ")":
            start, capturing = opened.pop()
            if capturing:
                spans.append((start, i + 1))
        i += 1
    return sorted(spans)


def _inverse_rule(pattern: str, replacement: str) -> tuple[re.Pattern, str]:
    """
    The inverse of one `rename_keys` rule whose groups are all top-level: a regex matching the renamed keys (each
    `\\N` of `replacement` matches what group N of `pattern` matches) and the template of the original key.
    """
    groups = _capturing_groups(pattern)
    template, end = "", 0
    for number, (start, stop) in enumerate(groups, 1):
        if start < end:
            raise ValueError(f"Nested group in rename rule {pattern!r}: not invertible.")
        template += re.sub(r"\\(.)", r"\1", pattern[end:start]) + f"\\g<g{number}>"
        end = stop
    template += re.sub(r"\\(.)", r"\1", pattern[end:])
    inverse, seen = "", set()
    for part in re.split(r"(\\\d+)", replacement):
        if re.fullmatch(r"\\\d+", part):
            number = int(part[1:])
            start, stop = groups[number - 1]
            inverse += f"(?P=g{number})" if number in seen else f"(?P<g{number}>{pattern[start + 1 : stop - 1]})"
            seen.add(number)
        else:
            inverse += re.escape(part)
    return re.compile(inverse), template


def original_state_dict(
    model: nn.Module,
    rename_rules: list[tuple[str, str]],
    fused_projections: tuple[tuple[str, tuple[str, ...]], ...] = (QKV_SPLIT,),
) -> dict[str, torch.Tensor]:
    """
    The inverse of `build_converted_model`'s renaming: `model`'s state dict under the original key names, with the
    split projections fused again (`(fused, parts)` pairs). Tensors the original code keeps but the model recomputes
    (fixed position tables) are the caller's to add.

    Raises:
        ValueError: for a key no rule produces.
    """
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for fused, (first, *others) in fused_projections:
        suffix = re.compile(rf"(.*)\.{re.escape(first)}\.(weight|bias)")
        for key in [k for k in state_dict if suffix.fullmatch(k)]:
            prefix, kind = suffix.fullmatch(key).groups()
            parts = [state_dict.pop(key)] + [state_dict.pop(f"{prefix}.{part}.{kind}") for part in others]
            state_dict[f"{prefix}.{fused}.{kind}"] = torch.cat(parts)
    inverses = [
        (*_inverse_rule(pattern, replacement), re.compile(pattern), replacement)
        for pattern, replacement in rename_rules
    ]
    original = {}
    for key, value in state_dict.items():
        for inverse, template, forward, replacement in inverses:
            match = inverse.fullmatch(key)
            source = match and match.expand(template)
            if source and forward.fullmatch(source) and forward.sub(replacement, source) == key:
                original[source] = value
                break
        else:
            raise ValueError(f"No rename rule produces {key!r}.")
    return original


def fixed_pos_embed(model) -> dict[str, torch.Tensor]:
    """The fixed sin-cos `pos_embed` table the original code stores and the model recomputes (`check_fixed_pos_embed`
    reads it back), or nothing for a model without one."""
    table = getattr(model.pos_embed, "pos_embed", None)
    return {} if table is None else {"pos_embed": table.detach().clone()}


def split_fused_projection(state_dict: dict[str, torch.Tensor], fused: str, parts: tuple[str, ...]) -> None:
    """Splits every `<prefix>.<fused>.{weight,bias}` into equal chunks `<prefix>.<part>.{weight,bias}` in place."""
    suffix = re.compile(rf"(.*)\.{re.escape(fused)}\.(weight|bias)")
    for key in [k for k in state_dict if suffix.fullmatch(k)]:
        prefix, kind = suffix.fullmatch(key).groups()
        tensor = state_dict.pop(key)
        if tensor.shape[0] % len(parts):
            raise CheckpointError(f"{key} has {tensor.shape[0]} rows, not divisible into {len(parts)} projections.")
        for part, chunk in zip(parts, tensor.chunk(len(parts))):
            state_dict[f"{prefix}.{part}.{kind}"] = chunk.clone()


def load_converted_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], leftovers=()) -> None:
    """
    Loads `state_dict` into `model` only if it fits exactly: every target key filled with the right shape, no key
    unused, and no unconsumed source key (`leftovers`). Otherwise raises `CheckpointError` listing every problem.

    A model built with `low_memory.init_empty_model` (parameters on the meta device) adopts the tensors of
    `state_dict` as they are (their dtype too: `streamed_save` casts each one when it is written), emptying
    `state_dict`, so no second copy of the weights is made.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for title, items in (
        ("source keys not consumed", sorted(leftovers)),
        ("model keys missing from the checkpoint", missing),
        ("converted keys the model does not have", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = "\n    ".join(items[:40]) + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else "")
            problems.append(f"  {title} ({len(items)}):\n    {shown}")
    if problems:
        raise CheckpointError(
            "The checkpoint does not match the model configuration (wrong config/preset, or not a checkpoint of "
            "this family):\n" + "\n".join(problems)
        )
    if any(param.is_meta for param in model.parameters()):
        adopted = {key: state_dict.pop(key) for key in list(state_dict)}
        model.load_state_dict(adopted, strict=True, assign=True)
        return
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)


def check_fixed_pos_embed(source: dict[str, torch.Tensor], model) -> None:
    """
    Pops the checkpoint's frozen sin-cos `pos_embed` and checks it against the table the model computes itself
    (diffusers' `PatchEmbed` keeps it as a non-persistent buffer). EMA moves the stored table by about 1 ulp and
    half-precision training stores it rounded, so they must agree to the stored precision.
    """
    stored = source.pop("pos_embed", None)
    computed = getattr(model.pos_embed, "pos_embed", None)
    if stored is None and computed is None:
        return
    if stored is None or computed is None or stored.shape != computed.shape:
        raise CheckpointError(
            f"The checkpoint's pos_embed ({None if stored is None else tuple(stored.shape)}) does not fit the "
            f"configured model ({None if computed is None else tuple(computed.shape)}): check the image size, patch "
            "size and positional embedding type (sin-cos table or rotary) in the config."
        )
    error = (stored.float() - computed.float()).abs().max().item()
    if error > max(1e-5, torch.finfo(stored.dtype).eps):
        raise CheckpointError(f"The checkpoint's pos_embed differs from the fixed sin-cos table by {error:.2e}.")


def build_converted_model(
    model_class,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    rename_rules: list[tuple[str, str]],
    family: str,
    fused_projections: tuple[tuple[str, tuple[str, ...]], ...] = (QKV_SPLIT,),
    consume_fixed_tensors=check_fixed_pos_embed,
):
    """
    The conversion every family shares, without a second copy of the weights: build `model_class(**config)` with its
    parameters on the meta device, let `consume_fixed_tensors(source, model)` check and pop tensors the model
    recomputes (fixed position tables), rename the rest with `rename_rules`, split fused projections (`(fused, parts)`
    pairs), and load strictly: the model adopts the source tensors (see `load_converted_state_dict`).

    Args:
        state_dict: the original weights; consumed (emptied) as they move into the model.
        family: the family name used in error messages.

    Returns:
        The loaded model in eval mode.
    """
    try:
        model = init_empty_model(model_class, **config)
    except ValueError as err:
        raise CheckpointError(f"Invalid {family} configuration: {err}") from None
    if consume_fixed_tensors is not None:
        consume_fixed_tensors(state_dict, model)
    converted = rename_keys(state_dict, rename_rules)
    for fused, parts in fused_projections:
        split_fused_projection(converted, fused, parts)
    load_converted_state_dict(model, converted, leftovers=state_dict)
    return model.eval()
