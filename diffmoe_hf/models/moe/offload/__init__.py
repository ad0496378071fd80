"""Tiered memory for routed experts: `enable_expert_offload(model, tier)` keeps attention, norms, embeddings, routers
and shared experts resident and puts the routed experts in host RAM, on disk or in 8 bits (`tiers`), with what each
tier keeps resident computed from the parameter shapes (`memory_plan`) and the disk tier's memory mapping
(`mapped_experts`)."""

from .memory_plan import EXPERT_OFFLOAD_TIERS, ExpertMemoryPlan, expert_linears, plan_expert_offload
from .tiers import check_expert_offload, enable_expert_offload
