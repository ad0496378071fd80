from .transformer_dsmoe import DSMOE_PRESETS, DSMoETransformer2DModel
from .transformer_jit import JIT_PRESETS, JiTTransformer2DModel
