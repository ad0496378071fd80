from .backends import EXPERT_BACKENDS, default_expert_backend, reads_weights_directly, resolve_expert_backend
from .dispatch import (
    ExpertSegments,
    combine_segments,
    dispatch,
    grouped_linear,
    segments_from_expert_choice,
    segments_from_topk,
)
from .dynamic_token import CapacityPredictor, DynamicTokenMoE
from .experts import GeluMLPExperts, GroupedExperts, StackedLinearExperts, SwiGLU, SwiGLUExperts, set_expert_backend
from .layers import DeepSeekMoE, SoftmaxTopKMoE
from .routers import SigmoidGroupLimitedRouter, SoftmaxTopKRouter, moe_aux_loss
from .spatial_temporal_moe import LowRankModulation, ModulatedSwiGLU, ModulatedSwiGLUExperts, SpatialTemporalMoE
