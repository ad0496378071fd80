"""The MoE code every family shares, split like megablocks into layers and ops.

- `layers/`: `nn.Module`s a model builds: the routers (`routers`), the expert banks (`experts`), the registry of
  expert backends, the functions that run a bank's experts (`expert_backends`), the token-choice SwiGLU MoE layer
  of DSMoE, JiTMoE and DiT-MoE (`swiglu_moe`) and its DeepSeek-style variant (`deepseek_moe`), which experts a bank
  builds (`expert_placement`) and the expert-parallel backend that sends rows to the rank of their expert
  (`expert_parallel`).
- `ops/`: tensor functions and custom ops with no parameters: the routing layout (`routing_layout`: routed pairs
  sorted into per-expert segments and combined back) and the grouped GEMMs that run all experts at once
  (`grouped_gemm`, `mkl_grouped_gemm`), and routing statistics reduced over ranks (`rank_reductions`).

A MoE layer routes its tokens (router -> expert ids and weights), lays the routing out as `ExpertSegments`, and calls
its bank's `forward_routed`, which gathers the rows, runs every expert on its segment through the bank's expert
backend and sums the weighted outputs back onto the tokens. In training mode the layers report their auxiliary losses
and statistics to the call's `MoECollector` (`collector`), which the model's forward opens and returns in its output.
MoE layers used by one family only live next to that family's model (`diffmoe_hf/models/transformer_dit_moe.py`,
`dynamic_token_moe_layer.py`, `spatial_temporal_moe_layer.py`).
"""

from .collector import MoECollector, active_moe_collector
from .layers.deepseek_moe import DeepSeekMoE
from .layers.expert_backends import (
    EXPERT_BACKENDS,
    ExpertBackend,
    default_expert_backend,
    expert_backend_names,
    expert_parameters,
    reads_weights_directly,
    register_expert_backend,
    resolve_expert_backend,
    stacked_expert_parameters,
)
from .layers.expert_parallel import run_expert_parallel
from .layers.expert_placement import (
    OtherRanksExpertsUnused,
    expert_block,
    expert_placement,
    expert_rank_seed,
    holding_all_experts,
    holding_experts,
    holds_every_expert,
    placed_expert_ids,
)
from .layers.experts import (
    GeluMLPExperts,
    GroupedExperts,
    SwiGLU,
    SwiGLUExperts,
    expert_banks,
    set_expert_backend,
    swiglu_activation,
)
from .layers.routers import SigmoidGroupLimitedRouter, SoftmaxTopKRouter, assignments_per_expert
from .layers.swiglu_moe import SwiGLUTokenChoiceMoE
from .ops.grouped_gemm import grouped_linear, segment_linear, segment_mm
from .ops.routing_layout import ExpertSegments, combine_segments, segments_from_expert_choice, segments_from_topk
