from .dispatch import ExpertSegments, combine_segments, dispatch, grouped_linear, segments_from_topk
from .experts import GroupedExperts, SwiGLU, SwiGLUExperts
from .layers import DeepSeekMoE, SoftmaxTopKMoE
from .routers import SigmoidGroupLimitedRouter, SoftmaxTopKRouter, moe_aux_loss
