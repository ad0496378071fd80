"""Diffusion Mixture-of-Experts transformers for diffusers.

Every model and pipeline module is imported eagerly: diffusers resolves classes of non-diffusers libraries recorded in
`model_index.json` only through `sys.modules`.
"""

from diffusers import ModelMixin

from .embedded_models import default_models
from .formulations import FORMULATIONS, get_formulation
from .models import (
    DIT_MOE_PRESETS,
    DSMOE_PRESETS,
    DYNAMIC_TOKEN_MOE_PRESETS,
    JIT_PRESETS,
    SPATIAL_TEMPORAL_MOE_PRESETS,
    DiTMoETransformer2DModel,
    DSMoETransformer2DModel,
    DynamicTokenMoETransformer2DModel,
    JiTTransformer2DModel,
    SpatialTemporalMoETransformer2DModel,
)
from .pipelines import ClassConditionalMoEPipeline

__version__ = "0.1.0"

__all__ = [
    "DIT_MOE_PRESETS",
    "DSMOE_PRESETS",
    "DYNAMIC_TOKEN_MOE_PRESETS",
    "FORMULATIONS",
    "JIT_PRESETS",
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
]
