"""Looking up a family's named architectures (presets), by their key or by an alias.

Preset keys name their family (`"DiT-MoE-XL/2"`, `"Diff-MoE-XL/2"`, `"DSMoE-S-E16"`, ...) and no key belongs to two
families. Aliases are other names of the same architecture: the names the original code records in a checkpoint's
`args.model` (`"DiT-XL/2"` in both DiT-MoE and Diff-MoE of Cheng et al.) and the spellings of the Hub releases. They
are looked up only within their own family, so the same alias may mean a different architecture in another family.
"""

from diffmoe_hf.families import get_family


def resolve_preset(family: str, presets: dict[str, dict], name: str, aliases: dict[str, str] | None = None) -> str:
    """
    The key of `presets` that `name` refers to: `name` itself, or the key that `aliases` maps it to.

    Args:
        family: The family id (`diffmoe_hf.families`), for the error message.
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
        raise ValueError(
            f"Unknown {get_family(family).label} preset {name!r}; available: {', '.join(presets)}{listed}."
        )
    return key


def preset_config(
    family: str, presets: dict[str, dict], name: str, *defaults: dict, aliases: dict[str, str] | None = None
) -> dict:
    """
    Constructor arguments of preset `name` (a key or alias, see `resolve_preset`) on top of the family-wide
    `defaults` (later dicts win).
    """
    merged = {}
    for config in (*defaults, presets[resolve_preset(family, presets, name, aliases)]):
        merged.update(config)
    return merged
