"""Diffusion Mixture-of-Experts transformers for diffusers.

Every model and pipeline module is imported eagerly: diffusers resolves classes of non-diffusers libraries recorded in
`model_index.json` only through `sys.modules`. Importing the package also registers its classes with diffusers
(`diffusers_registration`), so that `DiffusionPipeline.from_pretrained`, `diffusers.AutoModel` and the cache hooks of
`transformer.enable_cache` work with them.
"""

from diffusers import ModelMixin

from .diffusers_registration import register_with_diffusers, with_subclasses
from .embedded_models import default_models
from .families import FAMILIES, resolve_family
from .formulations import FORMULATIONS, get_formulation
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
from .pipelines import ClassConditionalMoEPipeline


register_with_diffusers(
    pipeline_classes=[ClassConditionalMoEPipeline],
    model_classes=[
        DiTMoETransformer2DModel,
        DSMoETransformer2DModel,
        DynamicTokenMoETransformer2DModel,
        JiTTransformer2DModel,
        SpatialTemporalMoETransformer2DModel,
    ],
    # every family's blocks derive from it (the MoE blocks, Diff-MoE's SpatialTemporalMoEBlock), all imported above
    block_classes=with_subclasses(AdaLNZeroTransformerBlock),
)

__version__ = "0.1.0"

__all__ = [
    "DIT_MOE_PRESET_ALIASES",
    "DIT_MOE_PRESETS",
    "DSMOE_PRESETS",
    "DYNAMIC_TOKEN_MOE_PRESETS",
    "FAMILIES",
    "FORMULATIONS",
    "JIT_PRESET_ALIASES",
    "JIT_PRESETS",
    "SPATIAL_TEMPORAL_MOE_PRESET_ALIASES",
    "SPATIAL_TEMPORAL_MOE_PRESETS",
    "ClassConditionalMoEPipeline",
    "DiTMoETransformer2DModel",
    "DSMoETransformer2DModel",
    "DynamicTokenMoETransformer2DModel",
    "JiTTransformer2DModel",
    "SpatialTemporalMoETransformer2DModel",
    "ModelMixin",
    "default_models",
    "get_formulation",
    "resolve_family",
]
