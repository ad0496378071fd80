"""adaLN-Zero pieces and the patch-output layer shared by every DiT-style family."""

from collections.abc import Callable

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from .attention import SelfAttention


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` with (B, D) shift/scale broadcast over the tokens of (B, N, D) `x`."""
    return hidden_states * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def make_norm(norm_type: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """
    The pre-attention / pre-MLP norm of a block.

    `"layer_norm"`: LayerNorm without affine parameters (DiT). `"rms_norm"`: RMSNorm with a learnable gain, computed in
    the input dtype (the DeepSeek-V3 RMSNorm used by DSMoE; diffusers' `RMSNorm` is numerically identical).
    """
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=eps, elementwise_affine=True)
    raise ValueError(f"Unknown norm_type {norm_type!r}: expected 'layer_norm' or 'rms_norm'.")


class AdaLNModulation(nn.Module):
    """
    `Linear(SiLU(c))` split into `num_chunks` (B, D) tensors.

    For a DiT block (`num_chunks=6`) the order is shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; for
    the output layer (`num_chunks=2`) it is shift, scale.
    """

    def __init__(self, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, num_chunks * dim)

    def forward(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.act(conditioning)).chunk(self.num_chunks, dim=1)


class PatchOutputLayer(nn.Module):
    """
    DiT's final layer: adaLN-modulated norm, then a Linear to `patch_size**2 * out_channels` values per token.

    Args:
        dim (`int`): Hidden width D.
        patch_size (`int`): Patch side p.
        out_channels (`int`): Output channels per pixel (2C for learned-sigma models).
        norm_type (`str`): `"layer_norm"` (DiT, DSMoE even with RMSNorm blocks) or `"rms_norm"` (JiT).
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm_type: str = "layer_norm"):
        super().__init__()
        self.norm = make_norm(norm_type, dim)
        self.modulation = AdaLNModulation(dim, 2)
        self.proj = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens, (B, D) conditioning -> (B, N, p*p*out_channels)."""
        shift, scale = self.modulation(conditioning)
        return self.proj(modulate(self.norm(hidden_states), shift, scale))


def unpatchify(tokens: torch.Tensor, patch_size: int, out_channels: int, height: int, width: int) -> torch.Tensor:
    """
    (B, N, p*p*C) per-patch values in raster order, laid out (row-in-patch, col-in-patch, channel) with the channel
    fastest -> (B, C, height, width) image, `height`/`width` in pixels of the model's input.
    """
    grid_h, grid_w = height // patch_size, width // patch_size
    tokens = tokens.reshape(tokens.shape[0], grid_h, grid_w, patch_size, patch_size, out_channels)
    return torch.einsum("nhwpqc->nchpwq", tokens).reshape(tokens.shape[0], out_channels, height, width)


class AdaLNZeroTransformerBlock(nn.Module):
    """
    The DiT block with adaLN-Zero conditioning, shared by the families whose blocks differ only in their norms,
    attention options and feed-forward module:

        x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * ff(modulate(norm2(x), shift_mlp, scale_mlp))

    Args:
        dim (`int`): Token width D.
        num_attention_heads (`int`), attention_head_dim (`int`): Attention shape.
        feed_forward (`nn.Module`): Dense MLP or MoE layer mapping (B, N, D) -> (B, N, D).
        norm_type (`str`): `"layer_norm"` or `"rms_norm"` for norm1/norm2.
        qk_norm (`str`, *optional*): Per-head q/k norm of the attention.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        feed_forward: nn.Module,
        norm_type: str = "layer_norm",
        qk_norm: str | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm_type, dim)
        self.attn = SelfAttention(dim, num_attention_heads, attention_head_dim, bias=True, qk_norm=qk_norm)
        self.norm2 = make_norm(norm_type, dim)
        self.ff = feed_forward
        self.modulation = AdaLNModulation(dim, 6)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor, rotary_emb=None) -> torch.Tensor:
        """(B, N, D) tokens, (B, D) conditioning, optional `RotaryTables` -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(conditioning)
        attn_input = modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.attn(attn_input, rotary_emb=rotary_emb)
        ff_input = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(ff_input)


class AdaLNZeroMoETransformerBlock(AdaLNZeroTransformerBlock):
    """
    `AdaLNZeroTransformerBlock` whose feed-forward is a MoE layer, in models that mix dense and MoE blocks (DSMoE,
    JiTMoE, DiffMoE of Shi et al.). It computes exactly what the parent class computes; being a class of its own with
    its own `forward`, `compile_repeated_blocks` compiles the dense and the MoE blocks as two repeated blocks, one
    graph each, instead of recompiling one `forward` whenever the kind of feed-forward changes from one block to the
    next.
    """

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor, rotary_emb=None) -> torch.Tensor:
        """(B, N, D) tokens, (B, D) conditioning, optional `RotaryTables` -> (B, N, D)."""
        return super().forward(hidden_states, conditioning, rotary_emb=rotary_emb)


def adaln_zero_blocks(
    num_layers: int,
    moe_layers: list[int],
    dense_feed_forward: Callable[[], nn.Module],
    moe_feed_forward: Callable[[], nn.Module],
    **block_kwargs,
) -> nn.ModuleList:
    """
    The blocks of a model that mixes dense and MoE feed-forwards (DSMoE, JiT / JiTMoE, DiffMoE of Shi et al.): block i is an
    `AdaLNZeroMoETransformerBlock` around a new `moe_feed_forward()` if i is in `moe_layers`, else an
    `AdaLNZeroTransformerBlock` around a new `dense_feed_forward()`; `block_kwargs` (dim, attention shape, norms) go to
    every block.
    """
    blocks = []
    for index in range(num_layers):
        if index in moe_layers:
            blocks.append(AdaLNZeroMoETransformerBlock(feed_forward=moe_feed_forward(), **block_kwargs))
        else:
            blocks.append(AdaLNZeroTransformerBlock(feed_forward=dense_feed_forward(), **block_kwargs))
    return nn.ModuleList(blocks)
