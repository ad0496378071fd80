"""Looking up a family's named architectures (presets), by their key or by an alias.

Preset keys name their family (`"DiT-MoE-XL/2"`, `"Diff-MoE-XL/2"`, `"DSMoE-S-E16"`, ...) and no key belongs to two
families. Aliases are other names of the same architecture: the names the original code records in a checkpoint's
`args.model` (`"DiT-XL/2"` in both DiT-MoE and Diff-MoE of Cheng et al.) and the spellings of the Hub releases. They
are looked up only within their own family, so the same alias may mean a different architecture in another family.
A model file passes its family's label (`ModelFamily.label` of `diffmoe_hf.families`, which reads the model files and
so cannot be read from here) for the error message; `tests/test_names.py` checks the two agree.
"""


def resolve_preset(label: str, presets: dict[str, dict], name: str, aliases: dict[str, str] | None = None) -> str:
    """
    The key of `presets` that `name` refers to: `name` itself, or the key that `aliases` maps it to.

    Args:
        label: How the error message names the family, e.g. `"DSMoE (Liu et al. 2025)"`.
        presets: The family's presets, key -> constructor arguments.
        name: A preset key or alias.
        aliases: alias -> preset key.

    Raises:
        ValueError: naming the family and listing its presets and aliases when `name` is neither.
    """
    aliases = aliases or {}
    key = aliases.get(name, name)
    if key not in presets:
        listed = f" (aliases: {', '.join(f'{alias} = {key}' for alias, key in aliases.items())})" if aliases else ""
        raise ValueError(f"Unknown {label} preset {name!r}; available: {', '.join(presets)}{listed}.")
    return key


def preset_config(
    label: str, presets: dict[str, dict], name: str, *defaults: dict, aliases: dict[str, str] | None = None
) -> dict:
    """
    Constructor arguments of preset `name` (a key or alias, see `resolve_preset`) on top of the family-wide
    `defaults` (later dicts win).
    """
    merged = {}
    for config in (*defaults, presets[resolve_preset(label, presets, name, aliases)]):
        merged.update(config)
    return merged
