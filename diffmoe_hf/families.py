"""The model families and the names a user types for them.

Two of the ported papers have nearly the same title: Diff-MoE (Cheng et al., time-aware and space-adaptive experts)
and DiffMoE (Shi et al., dynamic token selection). Their family ids are therefore named after what the models do,
like their classes (`spatial-temporal-moe` = `SpatialTemporalMoETransformer2DModel`, `dynamic-token-moe` =
`DynamicTokenMoETransformer2DModel`); the earlier ids (`diff-moe`, `diffmoe-dts`) stay accepted as aliases. Every place
that takes a family id (`diffmoe convert FAMILY`, `convert_checkpoint`, the training script's `--model_family`)
resolves it with `resolve_family`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """
    One ported family.

    Args:
        id: The family id (`diffmoe convert ID`).
        class_name: The transformer class in `diffmoe_hf.models`.
        paper: The paper's model name and authors, e.g. `"Diff-MoE, Cheng et al."`.
        summary: What sets the family apart, a few words.
        label: How messages name the family: its class name without `Transformer2DModel`, with the paper where the
            two differ, e.g. `"SpatialTemporalMoE (Diff-MoE, Cheng et al.)"`.
        aliases: Other ids accepted for this family (earlier names).
    """

    id: str
    class_name: str
    paper: str
    summary: str
    label: str
    aliases: tuple[str, ...] = ()

    def name_with_aliases(self) -> str:
        """The id and its aliases, e.g. `"spatial-temporal-moe (alias: diff-moe)"`."""
        return f"{self.id} (alias: {', '.join(self.aliases)})" if self.aliases else self.id

    def describe(self) -> str:
        """Two lines for `--help`: the id with its aliases, then paper, summary and class."""
        return f"{self.name_with_aliases()}\n    {self.paper}: {self.summary} ({self.class_name})"


FAMILIES = {
    family.id: family
    for family in (
        ModelFamily(
            "dsmoe", "DSMoETransformer2DModel", "DSMoE, Liu et al. 2025", "DeepSeek-style experts",
            label="DSMoE (Liu et al. 2025)",
        ),
        ModelFamily(
            "jit", "JiTTransformer2DModel", "JiT, Li & He 2025, and JiTMoE, Liu et al. 2025",
            "pixel-space x-prediction", label="JiT / JiTMoE (Li & He 2025; Liu et al. 2025)",
        ),
        ModelFamily(
            "spatial-temporal-moe", "SpatialTemporalMoETransformer2DModel", "Diff-MoE, Cheng et al.",
            "time-aware and space-adaptive experts", label="SpatialTemporalMoE (Diff-MoE, Cheng et al.)",
            aliases=("diff-moe",),
        ),
        ModelFamily(
            "dynamic-token-moe", "DynamicTokenMoETransformer2DModel", "DiffMoE, Shi et al. 2025",
            "dynamic token selection over the batch", label="DynamicTokenMoE (DiffMoE, Shi et al. 2025)",
            aliases=("diffmoe-dts",),
        ),
        ModelFamily(
            "dit-moe", "DiTMoETransformer2DModel", "DiT-MoE, Fei et al. 2024", "DiT with softmax top-k experts",
            label="DiTMoE (DiT-MoE, Fei et al. 2024)",
        ),
    )
}  # fmt: skip
FAMILY_ALIASES = {alias: family.id for family in FAMILIES.values() for alias in family.aliases}


def family_names() -> list[str]:
    """Every accepted family name: the ids, then the aliases."""
    return [*FAMILIES, *FAMILY_ALIASES]


def resolve_family(name: str) -> str:
    """
    The family id for `name`, a family id or one of its aliases.

    Raises:
        ValueError: for an unknown name, listing the families with their aliases.
    """
    name = FAMILY_ALIASES.get(name, name)
    if name not in FAMILIES:
        known = "; ".join(f"{family.name_with_aliases()}: {family.paper}" for family in FAMILIES.values())
        raise ValueError(f"Unknown model family {name!r}; supported: {known}.")
    return name


def get_family(name: str) -> ModelFamily:
    """The `ModelFamily` of a family id or alias (see `resolve_family`)."""
    return FAMILIES[resolve_family(name)]
