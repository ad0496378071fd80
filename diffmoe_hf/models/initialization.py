"""
The pieces of a fresh model's initialisation that the families share; each transformer class composes them in its
own `_initialize_family_weights` into the state in which its original code base leaves a newly built model.

Every original follows DiT's `initialize_weights`, run after the whole model is built (`initialize_dit`):

1. every `nn.Linear` gets a Xavier-uniform weight and a zero bias (`apply(_basic_init)`): this also reaches the
   expert projections and any `nn.Linear` a MoE layer initialised on its own, so their own inits do not survive;
2. the patch embedding's convolution gets a Xavier-uniform weight as if flattened to a Linear, and a zero bias;
3. the label table and both timestep-MLP weights are drawn from N(0, 0.02²);
4. the adaLN modulation of every block and of the output layer, and the output projection, are zeroed (adaLN-Zero):
   every block starts as the identity and the model's output is exactly 0.

What the walk of step 1 does not reach keeps the init of its constructor unless the family sets it: routers held as
bare parameters (`initialize_sigmoid_routers`, `initialize_softmax_routers`, or the family's own), norm gains (ones),
depthwise convolutions (PyTorch's default, `torch_default_conv`), learned position embeddings.

Where a port splits a fused original Linear into several (timm's `qkv` into `to_q/to_k/to_v`, JiT's SwiGLU `w12` into
`gate_proj/up_proj`), each part is drawn with the bound of the fused matrix (its summed output width, `fused_xavier`),
so the weights have the original distribution.

`DiTForwardMixin.initialize_weights` runs the class's `_initialize_family_weights` under `torch.no_grad()`, and skips
a model whose parameters are all on the meta device (diffusers' `from_pretrained` and the converters build one before
loading its weights): loading never initialises twice. Every draw goes through a `torch.nn.init` function looked up
at call time, which diffusers' `no_init_weights` makes a no-op.
"""

import math

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from .moe import SigmoidGroupLimitedRouter, SoftmaxTopKRouter


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


def fused_xavier(*linears: nn.Linear) -> None:
    """The parts of one original fused `nn.Linear`: Xavier-uniform with the fused matrix's fans, zero biases."""
    fan_out = sum(linear.out_features for linear in linears)
    for linear in linears:
        _xavier_uniform(linear.weight, linear.in_features, fan_out)
        _zero_bias(linear)


def flattened_conv_xavier(conv: nn.Conv2d) -> None:
    """DiT's patch-embedding init: Xavier-uniform of the (out, in * k * k) flattened kernel, zero bias."""
    weight = conv.weight
    _xavier_uniform(weight, weight[0].numel(), weight.shape[0])
    _zero_bias(conv)


def torch_default_conv(conv: nn.Conv2d) -> None:
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


def initialize_dit(model: nn.Module) -> None:
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
        fused_xavier(block.attn.to_q, block.attn.to_k, block.attn.to_v)
    _reset_norm_gains(model)

    if isinstance(getattr(model.pos_embed, "proj", None), nn.Conv2d):  # diffusers' PatchEmbed
        flattened_conv_xavier(model.pos_embed.proj)
    nn.init.normal_(model.embedding.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.embedding.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(model.embedding.timestep_embedder.linear_2.weight, std=0.02)

    for block in model.transformer_blocks:
        _zero(block.modulation.linear)
    _zero(model.proj_out.modulation.linear)
    _zero(model.proj_out.proj)


def initialize_sigmoid_routers(model: nn.Module) -> None:
    """`TopkRouter` of DSMoE: kaiming-normal weight (std sqrt(2 / D)), zero correction bias."""
    for module in model.modules():
        if isinstance(module, SigmoidGroupLimitedRouter):
            nn.init.kaiming_normal_(module.weight)
            nn.init.constant_(module.e_score_correction_bias, 0.0)


def initialize_softmax_routers(model: nn.Module) -> None:
    """`MoEGate.reset_parameters` of DiT-MoE and Diff-MoE (Cheng et al.): kaiming-uniform with a = sqrt(5), U(±1/sqrt(D))."""
    for module in model.modules():
        if isinstance(module, SoftmaxTopKRouter):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
