from .transformer_dit_moe import DIT_MOE_PRESET_ALIASES, DIT_MOE_PRESETS, DiTMoETransformer2DModel
from .transformer_dsmoe import DSMOE_PRESETS, DSMoETransformer2DModel
from .transformer_dynamic_token_moe import DYNAMIC_TOKEN_MOE_PRESETS, DynamicTokenMoETransformer2DModel
from .transformer_jit import JIT_PRESET_ALIASES, JIT_PRESETS, JiTTransformer2DModel
from .transformer_spatial_temporal_moe import (
    SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
    SPATIAL_TEMPORAL_MOE_PRESETS,
    SpatialTemporalMoETransformer2DModel,
)
