"""Diffusion Mixture-of-Experts transformers for diffusers.

This module gathers the whole package, and with `diffusers_registration` it is the only one allowed to (every other
module imports only its own layer and those below it; `tests/test_import_layers.py` checks this): it imports every
family (`families` registers each family's model class and transformer blocks with diffusers) and the pipeline, and
registers the pipeline with diffusers. Every model and pipeline module is imported eagerly: diffusers resolves classes
of non-diffusers libraries recorded in `model_index.json` only through `sys.modules`. After `import diffmoe_hf`,
`DiffusionPipeline.from_pretrained`, `diffusers.AutoModel` and the cache hooks of `transformer.enable_cache` work
with the package's folders.
"""

from diffusers import ModelMixin

from .diffusers_registration import register_classes_in_diffusers_namespace
from .embedded_models import default_models
from .families import FAMILIES, get_family, register_family, resolve_family
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
)
from .pipelines import ClassConditionalMoEPipeline


# the model class of every registered family under its own name (`diffmoe_hf.DSMoETransformer2DModel`, ...)
globals().update({family.class_name: family.model_class for family in FAMILIES.values()})
register_classes_in_diffusers_namespace([ClassConditionalMoEPipeline])

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
    "ModelMixin",
    "default_models",
    "get_family",
    "get_formulation",
    "register_family",
    "resolve_family",
    *(family.class_name for family in FAMILIES.values()),
]
