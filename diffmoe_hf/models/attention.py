"""Self-attention with the rotary-embedding variants of the ported families.

The module follows diffusers' attention conventions (`to_q/to_k/to_v/to_out.0` LoRA targets, a swappable processor,
`dispatch_attention_fn` for the kernel), so attention backends, LoRA and `fuse_qkv_projections` work as for any
diffusers transformer.

Rotary variants (head dim `hd`, tokens in raster order, token `n = r * grid_w + c`):

| name | used by | pairing | angles |
|---|---|---|---|
| `rope_1d` | DSMoE | dim j with j + hd/2 ("rotate half") | token index n, inv freq `1e4^(-2j/hd)` |
| `rope_2d` | DSMoE | inside each half of hd, dim j with j + hd/4 | first half: row r, second half: column c |
| `rope_2d_interleaved` | JiT | adjacent dims (2i, 2i+1) | first half: row r, second half: column c |
| `rope_2d_alternating` | Diff-MoE (Cheng et al.) | adjacent dims (2i, 2i+1) | pair i: c (i even) or r (i odd), inv freq `1e4^(-4(i//2)/hd)` |
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn


ROTARY_TYPES = ("rope_1d", "rope_2d", "rope_2d_interleaved", "rope_2d_alternating")


class RotaryTables(NamedTuple):
    """Per-token rotation tables for one image grid: `cos`, `sin` of shape (N, hd), plus how dims are paired."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    num_sections: int


def rotary_tables(
    rotary_type: str, head_dim: int, grid_h: int, grid_w: int, device=None, theta: float = 10000.0
) -> RotaryTables:
    """
    Builds the rotation tables of `rotary_type` (see the module docstring) for a `grid_h x grid_w` token grid.

    Tables are float32 (as in the original models); `apply_rotary` computes in the input dtype.
    """
    if rotary_type == "rope_1d":
        if head_dim % 2:
            raise ValueError(f"rope_1d needs an even head dim, got {head_dim}.")
        cos, sin = get_1d_rotary_pos_embed(
            head_dim, grid_h * grid_w, theta=theta, use_real=True, repeat_interleave_real=False
        )
        return RotaryTables(cos.to(device), sin.to(device), interleaved=False, num_sections=1)
    if rotary_type in ("rope_2d", "rope_2d_interleaved"):
        if head_dim % 4:
            raise ValueError(f"{rotary_type} needs a head dim divisible by 4, got {head_dim}.")
        interleaved = rotary_type == "rope_2d_interleaved"
        rows = torch.arange(grid_h).repeat_interleave(grid_w)
        cols = torch.arange(grid_w).repeat(grid_h)
        tables = [
            get_1d_rotary_pos_embed(
                head_dim // 2, positions, theta=theta, use_real=True, repeat_interleave_real=interleaved
            )
            for positions in (rows, cols)
        ]
        cos = torch.cat([tables[0][0], tables[1][0]], dim=-1)
        sin = torch.cat([tables[0][1], tables[1][1]], dim=-1)
        return RotaryTables(cos.to(device), sin.to(device), interleaved=interleaved, num_sections=2)
    if rotary_type == "rope_2d_alternating":
        # the per-axis interleaved tables hold each frequency twice ([f0, f0, f1, f1, ...]); Diff-MoE (Cheng et al.)
        # alternates whole pairs between the axes: channels (4j, 4j+1) rotate with the column, (4j+2, 4j+3) with the
        # row
        if head_dim % 4:
            raise ValueError(f"{rotary_type} needs a head dim divisible by 4, got {head_dim}.")
        rows = torch.arange(grid_h).repeat_interleave(grid_w)
        cols = torch.arange(grid_w).repeat(grid_h)
        (col_cos, col_sin), (row_cos, row_sin) = (
            get_1d_rotary_pos_embed(head_dim // 2, positions, theta=theta, use_real=True, repeat_interleave_real=True)
            for positions in (cols, rows)
        )
        cos = torch.stack([col_cos.unflatten(-1, (-1, 2)), row_cos.unflatten(-1, (-1, 2))], dim=-2).flatten(-3)
        sin = torch.stack([col_sin.unflatten(-1, (-1, 2)), row_sin.unflatten(-1, (-1, 2))], dim=-2).flatten(-3)
        return RotaryTables(cos.to(device), sin.to(device), interleaved=True, num_sections=2)
    raise ValueError(f"Unknown rotary type {rotary_type!r}; expected one of {ROTARY_TYPES}.")


def pad_rotary_tables(tables: RotaryTables, num_prefix_tokens: int) -> RotaryTables:
    """Prepends `num_prefix_tokens` identity rotations (cos 1, sin 0), for tokens that carry no position."""
    cos = F.pad(tables.cos, (0, 0, num_prefix_tokens, 0), value=1.0)
    sin = F.pad(tables.sin, (0, 0, num_prefix_tokens, 0), value=0.0)
    return tables._replace(cos=cos, sin=sin)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotates (B, N, H, hd) queries or keys by (N, hd) tables; see the module docstring for the pairings."""
    cos = tables.cos[None, :, None, :].to(x.dtype)
    sin = tables.sin[None, :, None, :].to(x.dtype)
    if tables.interleaved:
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    else:
        first, second = x.unflatten(-1, (tables.num_sections, 2, -1)).unbind(-2)
        rotated = torch.stack([-second, first], dim=-2).flatten(-3)
    return x * cos + rotated * sin


class SelfAttnProcessor:
    """Default processor: q/k/v projections, optional q/k norm, rotary embedding, `dispatch_attention_fn`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self, attn: "SelfAttention", hidden_states: torch.Tensor, rotary_emb: RotaryTables | None = None
    ) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, rotary_emb), apply_rotary(key, rotary_emb)
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class SelfAttention(nn.Module, AttentionModuleMixin):
    """
    Multi-head self-attention over image tokens.

    Args:
        dim (`int`): Token width D.
        heads (`int`): Number of heads H.
        dim_head (`int`): Head width hd (H * hd need not equal D).
        bias (`bool`): Bias on the q/k/v projections.
        qk_norm (`str`, *optional*): Per-head norm on q and k: `None`, `"rms_norm"` (JiT) or `"layer_norm"`
            (affine LayerNorm, DiT-MoE's flash-attention layout).
        eps (`float`): Epsilon of the q/k norm.
    """

    _default_processor_cls = SelfAttnProcessor
    _available_processors = [SelfAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        bias: bool = True,
        out_bias: bool = True,
        qk_norm: str | None = None,
        eps: float = 1e-6,
        processor=None,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = dim_head
        self.inner_dim = heads * dim_head
        self.use_bias = bias
        self.is_cross_attention = False
        self.fused_projections = False
        self.to_q = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=out_bias), nn.Dropout(0.0)])
        if qk_norm is None:
            self.norm_q, self.norm_k = nn.Identity(), nn.Identity()
        elif qk_norm == "rms_norm":
            self.norm_q, self.norm_k = nn.RMSNorm(dim_head, eps=eps), nn.RMSNorm(dim_head, eps=eps)
        elif qk_norm == "layer_norm":
            self.norm_q, self.norm_k = nn.LayerNorm(dim_head, eps=eps), nn.LayerNorm(dim_head, eps=eps)
        else:
            raise ValueError(f"Unknown qk_norm {qk_norm!r}: expected None, 'rms_norm' or 'layer_norm'.")
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, rotary_emb: RotaryTables | None = None) -> torch.Tensor:
        """(B, N, D) tokens -> (B, N, D)."""
        return self.processor(self, hidden_states, rotary_emb=rotary_emb)
