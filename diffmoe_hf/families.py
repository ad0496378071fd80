"""The family registry: one declaration per ported model family, read by everything that deals with families.

A `ModelFamily` holds all the package knows about a family: its id and the names a user types for it, the paper, the
model class, the converter, the formulations, the presets, the published settings of its released checkpoints and the
tiny configurations the tests build. The `diffmoe convert` CLI, `convert_checkpoint`, the training script
(`--model_family`, `--preset`), the benchmarks, the Space, the package's diffusers registration and the tests all read
it. Adding a family is a model file, a converter file and one `register_family(ModelFamily(...))` call.

The converter is named, not imported: `converter` is `"module:attribute"` of a `FamilyConverter`
(`diffmoe_hf.conversion.family_converter`), imported on first use by `ModelFamily.load_converter`. The registry is
part of the core (it imports the models and the published settings) and the core never imports `conversion`, which
depends on the core (its converters build the models and name the families in their messages): a reference resolved
late keeps the registry complete without that cycle, and a core install that only samples never imports the
converters. `tests/test_family_registry.py` resolves every family's converter, so a wrong reference fails there.

Two of the ported papers have nearly the same title: Diff-MoE (Cheng et al., time-aware and space-adaptive experts)
and DiffMoE (Shi et al., dynamic token selection). Their family ids are therefore named after what the models do,
like their classes (`spatial-temporal-moe` = `SpatialTemporalMoETransformer2DModel`, `dynamic-token-moe` =
`DynamicTokenMoETransformer2DModel`); the earlier ids (`diff-moe`, `diffmoe-dts`) stay accepted as aliases. Every place
that takes a family id resolves it with `resolve_family`.
"""

import importlib
from dataclasses import dataclass, field

from .diffusers_registration import register_model_classes, register_transformer_blocks, with_subclasses
from .models import (
    DIT_MOE_PRESET_ALIASES,
    DIT_MOE_PRESETS,
    DSMOE_PRESETS,
    DYNAMIC_TOKEN_MOE_PRESETS,
    JIT_PRESET_ALIASES,
    JIT_PRESETS,
    SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
    SPATIAL_TEMPORAL_MOE_PRESETS,
    DiTMoETransformer2DModel,
    DSMoETransformer2DModel,
    DynamicTokenMoETransformer2DModel,
    JiTTransformer2DModel,
    SpatialTemporalMoETransformer2DModel,
)
from .models.blocks import AdaLNZeroTransformerBlock
from .published_settings import DIT_MOE_PUBLISHED, DSMOE_PUBLISHED, JITMOE_PUBLISHED, PublishedSettings


@dataclass(frozen=True)
class ModelFamily:
    """
    One ported family.

    Args:
        id: The family id (`diffmoe convert ID`, `--model_family ID`).
        model_class: The transformer class (a diffusers `ModelMixin` with `from_preset`).
        paper: The paper's model name and authors, e.g. `"Diff-MoE, Cheng et al."`.
        summary: What sets the family apart, a few words.
        label: How messages name the family: its class name without `Transformer2DModel`, with the paper where the
            two differ, e.g. `"SpatialTemporalMoE (Diff-MoE, Cheng et al.)"`.
        converter: `"module:attribute"` of the family's `FamilyConverter` (see the module docstring).
        formulations: The formulations (`diffmoe_hf.formulations`) the family's models are trained with.
        presets: The released architectures, preset key -> constructor arguments (the dict of the model file).
        tiny: Named tiny configurations (constructor arguments, seconds on a CPU) for tests and quick benchmarks; the
            first is the default. A family with variants (dense JiT and JiTMoE, with and without a shared expert)
            names each.
        preset_aliases: Other names of the presets (the original code's), alias -> preset key.
        published: The published settings of the family's released checkpoints.
        aliases: Other ids accepted for this family (earlier names).
    """

    id: str
    model_class: type
    paper: str
    summary: str
    label: str
    converter: str
    formulations: tuple[str, ...]
    presets: dict[str, dict]
    tiny: dict[str, dict]
    preset_aliases: dict[str, str] = field(default_factory=dict)
    published: tuple[PublishedSettings, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def class_name(self) -> str:
        return self.model_class.__name__

    def name_with_aliases(self) -> str:
        """The id and its aliases, e.g. `"spatial-temporal-moe (alias: diff-moe)"`."""
        return f"{self.id} (alias: {', '.join(self.aliases)})" if self.aliases else self.id

    def describe(self) -> str:
        """Two lines for `--help`: the id with its aliases, then paper, summary and class."""
        return f"{self.name_with_aliases()}\n    {self.paper}: {self.summary} ({self.class_name})"

    def tiny_config(self, variant: str | None = None, **overrides) -> dict:
        """A copy of tiny configuration `variant` (default: the first) with `overrides` applied."""
        variant = next(iter(self.tiny)) if variant is None else variant
        if variant not in self.tiny:
            raise ValueError(f"{self.label} has no tiny configuration {variant!r}; it has {', '.join(self.tiny)}.")
        return {**self.tiny[variant], **overrides}

    def tiny_model(self, variant: str | None = None, **overrides):
        """A fresh `model_class(**tiny_config(variant, **overrides))`, initialised as the family's original code."""
        return self.model_class(**self.tiny_config(variant, **overrides))

    def load_converter(self):
        """The family's `FamilyConverter`, imported from `converter` (which needs the conversion sub-package)."""
        module, _, attribute = self.converter.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def published_settings_of(self, config) -> PublishedSettings | None:
        """The published settings of the released model whose architecture `config` has, or None."""
        for settings in self.published:
            if all(config.get(k) == v for k, v in settings.architecture.items()):
                return settings
        return None


FAMILIES: dict[str, ModelFamily] = {}
FAMILY_ALIASES: dict[str, str] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """
    Adds `family` to the registry (its id and aliases become names every command accepts), makes its model class
    loadable by diffusers' own loaders and its transformer blocks (every `AdaLNZeroTransformerBlock` subclass defined
    so far) known to diffusers' cache hooks (`diffusers_registration`). Returns `family`.

    Raises:
        ValueError: if its id or an alias is already a family name.
    """
    taken = sorted({family.id, *family.aliases} & {*FAMILIES, *FAMILY_ALIASES})
    if taken:
        raise ValueError(f"{', '.join(taken)} already name a registered family.")
    FAMILIES[family.id] = family
    FAMILY_ALIASES.update(dict.fromkeys(family.aliases, family.id))
    register_model_classes([family.model_class])
    register_transformer_blocks(with_subclasses(AdaLNZeroTransformerBlock))
    return family


_CONVERSION = "diffmoe_hf.conversion"
# the latent families' tiny token grid: 4 x 8 x 8 latents in 2 x 2 patches
_TINY_LATENT = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_classes=10)

_DSMOE_TINY = dict(
    _TINY_LATENT,
    num_attention_heads=2,
    attention_head_dim=8,
    mlp_ratio=2.0,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    shared_expert_intermediate_size=8,
    n_group=2,
    topk_group=2,
)
register_family(
    ModelFamily(
        "dsmoe",
        DSMoETransformer2DModel,
        "DSMoE, Liu et al. 2025",
        "DeepSeek-style experts",
        label="DSMoE (Liu et al. 2025)",
        converter=f"{_CONVERSION}.convert_dsmoe:DSMOE_CONVERTER",
        formulations=("rf-noise-at-0",),
        presets=DSMOE_PRESETS,
        published=DSMOE_PUBLISHED,
        tiny={"default": _DSMOE_TINY, "rms-norm": dict(_DSMOE_TINY, norm_type="rms_norm")},
    )
)

_JIT_TINY = dict(
    sample_size=16,
    patch_size=4,
    num_layers=4,
    num_attention_heads=2,
    attention_head_dim=8,
    mlp_ratio=1.0,
    num_classes=10,
    bottleneck_dim=4,
    in_context_len=2,
    in_context_start=1,
)
register_family(
    ModelFamily(
        "jit",
        JiTTransformer2DModel,
        "JiT, Li & He 2025, and JiTMoE, Liu et al. 2025",
        "pixel-space x-prediction",
        label="JiT / JiTMoE (Li & He 2025; Liu et al. 2025)",
        converter=f"{_CONVERSION}.convert_jit:JIT_CONVERTER",
        formulations=("jit-xpred",),
        presets=JIT_PRESETS,
        preset_aliases=JIT_PRESET_ALIASES,
        published=JITMOE_PUBLISHED,
        tiny={
            "jitmoe": dict(
                _JIT_TINY, moe_layers=[1, 3], num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=8
            ),
            "dense": dict(_JIT_TINY, moe_layers="none"),
        },
    )
)

_SPATIAL_TEMPORAL_TINY = dict(
    _TINY_LATENT,
    num_attention_heads=4,
    attention_head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=32,
    modulation_rank=8,
)
register_family(
    ModelFamily(
        "spatial-temporal-moe",
        SpatialTemporalMoETransformer2DModel,
        "Diff-MoE, Cheng et al.",
        "time-aware and space-adaptive experts",
        label="SpatialTemporalMoE (Diff-MoE, Cheng et al.)",
        converter=f"{_CONVERSION}.convert_spatial_temporal_moe:SPATIAL_TEMPORAL_MOE_CONVERTER",
        formulations=("ddpm-learned-sigma", "rf-noise-at-1"),
        presets=SPATIAL_TEMPORAL_MOE_PRESETS,
        preset_aliases=SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
        aliases=("diff-moe",),
        tiny={
            "shared-expert": _SPATIAL_TEMPORAL_TINY,
            "no-shared-expert": dict(_SPATIAL_TEMPORAL_TINY, shared_expert_intermediate_size=0),
        },
    )
)

_DYNAMIC_TOKEN_TINY = dict(
    _TINY_LATENT, num_attention_heads=2, attention_head_dim=4, mlp_ratio=1.0, num_experts=4, moe_intermediate_size=8
)
register_family(
    ModelFamily(
        "dynamic-token-moe",
        DynamicTokenMoETransformer2DModel,
        "DiffMoE, Shi et al. 2025",
        "dynamic token selection over the batch",
        label="DynamicTokenMoE (DiffMoE, Shi et al. 2025)",
        converter=f"{_CONVERSION}.convert_dynamic_token_moe:DYNAMIC_TOKEN_MOE_CONVERTER",
        formulations=("rf-noise-at-0",),
        presets=DYNAMIC_TOKEN_MOE_PRESETS,
        aliases=("diffmoe-dts",),
        tiny={
            "shared-expert": dict(_DYNAMIC_TOKEN_TINY, shared_expert_intermediate_size=64),
            "no-shared-expert": dict(_DYNAMIC_TOKEN_TINY, shared_expert_intermediate_size=0),
        },
    )
)

_DIT_MOE_TINY = dict(
    _TINY_LATENT,
    num_attention_heads=4,
    attention_head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=64,
)
register_family(
    ModelFamily(
        "dit-moe",
        DiTMoETransformer2DModel,
        "DiT-MoE, Fei et al. 2024",
        "DiT with softmax top-k experts",
        label="DiTMoE (DiT-MoE, Fei et al. 2024)",
        converter=f"{_CONVERSION}.convert_dit_moe:DIT_MOE_CONVERTER",
        formulations=("ddpm-learned-sigma", "rf-noise-at-1"),
        presets=DIT_MOE_PRESETS,
        preset_aliases=DIT_MOE_PRESET_ALIASES,
        published=DIT_MOE_PUBLISHED,
        # the rectified-flow variant first (the Diff-MoE tiny model covers DDPM with learned sigma)
        tiny={
            "rectified-flow": dict(_DIT_MOE_TINY, formulation="rf-noise-at-1"),
            "ddpm": _DIT_MOE_TINY,
            "qk-norm": dict(_DIT_MOE_TINY, qk_norm="layer_norm"),
        },
    )
)


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


def family_of_model(model) -> ModelFamily:
    """The registered family whose model class `model` is an instance of (the most derived one)."""
    matches = [family for family in FAMILIES.values() if isinstance(model, family.model_class)]
    if not matches:
        raise ValueError(f"{type(model).__name__} is not the model class of a registered family.")
    return max(matches, key=lambda family: len(family.model_class.__mro__))


def published_settings() -> tuple[PublishedSettings, ...]:
    """Every released model's published settings, family by family."""
    return tuple(settings for family in FAMILIES.values() for settings in family.published)


def match_published_settings(family: str, config) -> PublishedSettings | None:
    """The published settings of the released model of `family` (an id or alias) whose architecture `config` has, or
    None."""
    return get_family(family).published_settings_of(config)
