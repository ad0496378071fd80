"""
Fresh-model initialisation of every family: the state in which each original code base leaves a newly built model.

Every original follows DiT's `initialize_weights`, run after the whole model is built:

1. every `nn.Linear` gets a Xavier-uniform weight and a zero bias (`apply(_basic_init)`): this also reaches the
   expert projections and any `nn.Linear` a MoE layer initialised on its own, so their own inits do not survive;
2. the patch embedding's convolution gets a Xavier-uniform weight as if flattened to a Linear, and a zero bias;
3. the label table and both timestep-MLP weights are drawn from N(0, 0.02²);
4. the adaLN modulation of every block and of the output layer, and the output projection, are zeroed (adaLN-Zero):
   every block starts as the identity and the model's output is exactly 0.

What the walk of step 1 does not reach keeps the init of its constructor: routers held as bare parameters, norm gains
(ones), depthwise convolutions (PyTorch's default), learned position embeddings.

Where a port splits a fused original Linear into several (timm's `qkv` into `to_q/to_k/to_v`, JiT's SwiGLU `w12` into
`gate_proj/up_proj`), each part is drawn with the bound of the fused matrix (its summed output width), so the weights
have the original distribution.

One deliberate difference: JiTMoE's router weight is `torch.empty` upstream, never initialised; it gets DSMoE's
kaiming-normal init here (`initialize_jit_weights`).

A model whose parameters are all on the meta device (diffusers' `from_pretrained` and the converters build one before
loading its weights) has no values to initialise and is skipped, so loading never initialises twice; every draw also
goes through a `torch.nn.init` function looked up at call time, which diffusers' `no_init_weights` makes a no-op.
"""

import math

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from .dynamic_token_moe_layer import DynamicTokenMoE
from .moe import SigmoidGroupLimitedRouter, SoftmaxTopKRouter, SwiGLU


def _xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """Xavier-uniform (gain 1) for a matrix with `fan_in` inputs and `fan_out` outputs: U(±sqrt(6 / (in + out)))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


def _zero_bias(module: nn.Module) -> None:
    if module.bias is not None:
        nn.init.constant_(module.bias, 0.0)


def _zero(module: nn.Module) -> None:
    nn.init.constant_(module.weight, 0.0)
    _zero_bias(module)


def _fused_xavier(*linears: nn.Linear) -> None:
    """The parts of one original fused `nn.Linear`: Xavier-uniform with the fused matrix's fans, zero biases."""
    fan_out = sum(linear.out_features for linear in linears)
    for linear in linears:
        _xavier_uniform(linear.weight, linear.in_features, fan_out)
        _zero_bias(linear)


def _flattened_conv_xavier(conv: nn.Conv2d) -> None:
    """DiT's patch-embedding init: Xavier-uniform of the (out, in * k * k) flattened kernel, zero bias."""
    weight = conv.weight
    _xavier_uniform(weight, weight[0].numel(), weight.shape[0])
    _zero_bias(conv)


def _torch_default_conv(conv: nn.Conv2d) -> None:
    """PyTorch's default `nn.Conv2d` init (kaiming-uniform with a = sqrt(5), bias U(±1/sqrt(fan_in)))."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        nn.init.uniform_(conv.bias, -bound, bound)


def _reset_norm_gains(model: nn.Module) -> None:
    """Norm gains as built: weight 1, bias 0 (no original init touches them)."""
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm, RMSNorm)):
            if module.weight is not None:
                nn.init.constant_(module.weight, 1.0)
            if getattr(module, "bias", None) is not None:
                nn.init.constant_(module.bias, 0.0)


def _initialize_dit(model: nn.Module) -> None:
    """
    Steps 1-4 of the module docstring for a transformer with `embedding` (`TimestepClassEmbedding`), `pos_embed`,
    `transformer_blocks` (each with `attn` and `modulation`) and `proj_out` (`PatchOutputLayer`); the attention's
    q/k/v are one fused Linear in every original.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _xavier_uniform(module.weight, module.in_features, module.out_features)
            _zero_bias(module)
    for block in model.transformer_blocks:
        _fused_xavier(block.attn.to_q, block.attn.to_k, block.attn.to_v)
    _reset_norm_gains(model)

    if isinstance(getattr(model.pos_embed, "proj", None), nn.Conv2d):  # diffusers' PatchEmbed
        _flattened_conv_xavier(model.pos_embed.proj)
    nn.init.normal_(model.embedding.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.embedding.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(model.embedding.timestep_embedder.linear_2.weight, std=0.02)

    for block in model.transformer_blocks:
        _zero(block.modulation.linear)
    _zero(model.proj_out.modulation.linear)
    _zero(model.proj_out.proj)


def _initialize_sigmoid_routers(model: nn.Module) -> None:
    """`TopkRouter` of DSMoE: kaiming-normal weight (std sqrt(2 / D)), zero correction bias."""
    for module in model.modules():
        if isinstance(module, SigmoidGroupLimitedRouter):
            nn.init.kaiming_normal_(module.weight)
            nn.init.constant_(module.e_score_correction_bias, 0.0)


def _initialize_softmax_routers(model: nn.Module) -> None:
    """`MoEGate.reset_parameters` of DiT-MoE and Diff-MoE (Cheng et al.): kaiming-uniform with a = sqrt(5), U(±1/sqrt(D))."""
    for module in model.modules():
        if isinstance(module, SoftmaxTopKRouter):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))


def initialize_dsmoe_weights(model: nn.Module) -> None:
    """
    DSMoE (yhlleo/EfficientMoE `DSMoE/models/models_DSMoE.py`, `DiT.initialize_weights` with `init_MoeMLP=False` as
    in every released config): the DiT init (fused q/k/v; the dense SiLU MLPs, experts and shared expert are plain
    Linears), routers kaiming-normal with a zero correction bias, RMSNorm gains 1.
    """
    _initialize_dit(model)
    _initialize_sigmoid_routers(model)


def initialize_jit_weights(model: nn.Module) -> None:
    """
    JiT / JiTMoE (yhlleo/EfficientMoE `JiTMoE/model_jit.py`, `JiT.initialize_weights`; `JiTMoE/moe.py`): the DiT init
    with both bottleneck convolutions Xavier-initialised as flattened Linears (the 1x1 one with a zero bias), the
    SwiGLU `w12` (dense layers, experts, shared expert) fused over gate and up, the in-context position embedding
    N(0, 0.02²), RMSNorm and q/k-norm gains 1.

    Deliberate difference: the original router weight is `torch.empty` and never initialised (whatever memory held);
    here it gets DSMoE's kaiming-normal init (same router, same repository), with a zero correction bias.
    """
    _initialize_dit(model)
    for module in model.modules():
        if isinstance(module, SwiGLU):
            _fused_xavier(module.gate_proj, module.up_proj)
    _flattened_conv_xavier(model.pos_embed.patch_proj)
    _flattened_conv_xavier(model.pos_embed.hidden_proj)
    if model.in_context_pos_embed is not None:
        nn.init.normal_(model.in_context_pos_embed, std=0.02)
    _initialize_sigmoid_routers(model)


def initialize_dynamic_token_moe_weights(model: nn.Module) -> None:
    """
    DiffMoE of Shi et al. (KwaiVGI/DiffMoE `models/models_DiffMoE.py`, also yhlleo/EfficientMoE
    `DSMoE/models/models_DiffMoE.py`: `DiT.initialize_weights`): the DiT init (experts, shared expert and the
    capacity predictor are plain Linears), the router N(0, 0.006²) (a bare parameter upstream, which the Linear walk
    does not reach), the capacity thresholds 0.
    """
    _initialize_dit(model)
    for module in model.modules():
        if isinstance(module, DynamicTokenMoE):
            nn.init.normal_(module.router.weight, std=0.006)
            nn.init.constant_(module.capacity_predictor.expert_threshold, 0.0)


def initialize_dit_moe_weights(model: nn.Module) -> None:
    """
    DiT-MoE (feizc/DiT-MoE `models.py`, `DiT.initialize_weights`): the DiT init (experts and shared expert are plain
    Linears, q/k/v fused in both the timm and the flash layout, q/k LayerNorm gains 1 and biases 0), routers
    kaiming-uniform (`MoEGate.reset_parameters`, not reached by the Linear walk).
    """
    _initialize_dit(model)
    _initialize_softmax_routers(model)


def initialize_spatial_temporal_moe_weights(model: nn.Module) -> None:
    """
    Diff-MoE of Cheng et al. (kunncheng/Diff-MoE `models.py`, `DiT.initialize_weights`): the DiT init, which runs after
    the experts set their own adaLN (kaiming-uniform bottleneck, zeroed output) and so replaces it by Xavier-uniform
    weights and zero biases: only the block-level adaLN and the output layer start at zero. The recalibration
    (`se`) Linears are Xavier too; routers are kaiming-uniform (`MoEGate.reset_parameters`); the 5x5 depthwise
    convolutions keep PyTorch's default init.
    """
    _initialize_dit(model)
    _initialize_softmax_routers(model)
    for block in model.transformer_blocks:
        _torch_default_conv(block.depthwise_conv)


_FAMILY_INITIALIZERS = {
    "DSMoETransformer2DModel": initialize_dsmoe_weights,
    "JiTTransformer2DModel": initialize_jit_weights,
    "DynamicTokenMoETransformer2DModel": initialize_dynamic_token_moe_weights,
    "DiTMoETransformer2DModel": initialize_dit_moe_weights,
    "SpatialTemporalMoETransformer2DModel": initialize_spatial_temporal_moe_weights,
}


@torch.no_grad()
def initialize_weights(model: nn.Module) -> None:
    """
    Initialises every parameter of `model` (one of the five transformer classes, or a subclass) as the family's
    original code initialises a new model; see the module docstring and the `initialize_*_weights` functions.

    Raises:
        TypeError: for a model of no known family.
    """
    if all(parameter.is_meta for parameter in model.parameters()):
        return  # built on the meta device (`init_empty_weights`, `from_pretrained`): no values to initialise
    for cls in type(model).__mro__:
        initializer = _FAMILY_INITIALIZERS.get(cls.__name__)
        if initializer is not None:
            initializer(model)
            return
    known = ", ".join(_FAMILY_INITIALIZERS)
    raise TypeError(f"No weight initialisation is known for {type(model).__name__}; expected {known} or a subclass.")
