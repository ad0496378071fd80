"""The DeepSeek-style MoE feed-forward shared by DSMoE and JiTMoE: a sigmoid group-limited router over SwiGLU experts,
plus shared experts."""

from .routers import SigmoidGroupLimitedRouter
from .swiglu_moe import SwiGLUTokenChoiceMoE


class DeepSeekMoE(SwiGLUTokenChoiceMoE):
    """
    DeepSeek-style MoE feed-forward (DSMoE, JiTMoE): sigmoid group-limited routing over SwiGLU experts, plus shared
    SwiGLU experts that every token passes through. Without shared experts the layer adds its own input instead (as
    the original DSMoE / JiTMoE code does).

    Args:
        dim (`int`): Token width D.
        num_experts (`int`): Routed experts E.
        num_experts_per_tok (`int`): Experts per token k.
        intermediate_size (`int`): Hidden width of each routed expert.
        n_group (`int`), topk_group (`int`), routed_scaling_factor (`float`): See `SigmoidGroupLimitedRouter`.
        shared_expert_intermediate_size (`int`): Hidden width of the shared SwiGLU (upstream's `n_shared_experts`
            experts fused into one of their summed width); 0 for none, and the layer adds its input instead.
        bias (`bool`): Biases on the expert projections (JiTMoE) or not (DSMoE).
    """

    adds_input_without_shared_experts = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        intermediate_size: int,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        shared_expert_intermediate_size: int = 0,
        bias: bool = False,
    ):
        router = SigmoidGroupLimitedRouter(
            dim=dim,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
        )
        super().__init__(
            router=router,
            dim=dim,
            num_experts=num_experts,
            intermediate_size=intermediate_size,
            shared_expert_intermediate_size=shared_expert_intermediate_size,
            bias=bias,
        )
