"""The transformers, one file per family, and the modules they share.

| file | model | paper |
|---|---|---|
| `transformer_dsmoe.py` | `DSMoETransformer2DModel` | DSMoE (Liu et al. 2025) |
| `transformer_jit.py` | `JiTTransformer2DModel` | JiT and JiTMoE (Li & He 2025; Liu et al. 2025) |
| `transformer_dit_moe.py` | `DiTMoETransformer2DModel` | DiT-MoE (Fei et al. 2024) |
| `transformer_dynamic_token_moe.py` (+ `dynamic_token_moe_layer.py`) | `DynamicTokenMoETransformer2DModel` | DiffMoE (Shi et al. 2025) |
| `transformer_spatial_temporal_moe.py` (+ `spatial_temporal_moe_layer.py`) | `SpatialTemporalMoETransformer2DModel` | Diff-MoE (Cheng et al.) |

Shared: `modeling_common.py` (the DiT forward with its per-family hooks, the MoE output, `moe_layers` handling),
`blocks.py` (the adaLN-Zero DiT block and output layer), `attention.py` (self-attention with the rotary variants),
`embeddings.py` (timestep and class embedding), `initialization.py` (the pieces each family's
`_initialize_family_weights` composes into its original initialisation), `presets.py` (preset lookup with aliases),
`validation.py` (input checks), and `moe/` (routers, expert banks, the token-choice MoE layer, routing layout,
grouped GEMMs, the output collector).
"""

from .transformer_dit_moe import DIT_MOE_PRESET_ALIASES, DIT_MOE_PRESETS, DiTMoETransformer2DModel
from .transformer_dsmoe import DSMOE_PRESETS, DSMoETransformer2DModel
from .transformer_dynamic_token_moe import DYNAMIC_TOKEN_MOE_PRESETS, DynamicTokenMoETransformer2DModel
from .transformer_jit import JIT_PRESET_ALIASES, JIT_PRESETS, JiTTransformer2DModel
from .transformer_spatial_temporal_moe import (
    SPATIAL_TEMPORAL_MOE_PRESET_ALIASES,
    SPATIAL_TEMPORAL_MOE_PRESETS,
    SpatialTemporalMoETransformer2DModel,
)
