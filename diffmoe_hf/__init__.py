"""Diffusion Mixture-of-Experts transformers for diffusers.

Every model and pipeline module is imported eagerly: diffusers resolves classes of non-diffusers libraries recorded in
`model_index.json` only through `sys.modules`.
"""

from diffusers import ModelMixin

from .formulations import FORMULATIONS, get_formulation
from .models import DSMOE_PRESETS, DSMoETransformer2DModel
from .models import SPATIAL_TEMPORAL_MOE_PRESETS, SpatialTemporalMoETransformer2DModel
from .pipelines import ClassConditionalMoEPipeline

__version__ = "0.1.0"

__all__ = [
    "DSMOE_PRESETS",
    "FORMULATIONS",
    "ClassConditionalMoEPipeline",
    "DSMoETransformer2DModel",
    "SPATIAL_TEMPORAL_MOE_PRESETS",
    "SpatialTemporalMoETransformer2DModel",
    "ModelMixin",
    "get_formulation",
]
