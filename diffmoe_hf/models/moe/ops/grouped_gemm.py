"""Grouped GEMMs: every expert's `nn.Linear` on its contiguous segment of expert-sorted rows, as few kernel calls as the
device allows.

- `segment_linear`: one GEMM per (expert, projection) on the experts' own weights (no stacked copy), all of them as one
  MKL grouped GEMM for float32 on x86 CPUs (`mkl_grouped_gemm`); the segment sizes are read on the host inside the
  custom op, so `torch.compile(fullgraph=True)` traces it.
- `grouped_linear`: one `F.grouped_mm` (`segment_mm`) over (E, out, in) stacked weights where it has a kernel (CUDA
  bf16), else one `torch.mm` per segment. On CUDA nothing on this path moves data to the host.

They are the projections of the `"segment_linear"` and `"grouped_mm"` expert backends
(`diffmoe_hf.models.moe.layers.expert_backends`).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .mkl_grouped_gemm import grouped_matmul_
from .routing_layout import ExpertSegments


def _grouped_mm_usable(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` has a kernel for these operands: CPU (any float type) or CUDA bf16, with 16-byte
    aligned inner dimensions (in and out features)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if rows.device.type == "cuda":
        supported_dtype = rows.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    else:
        supported_dtype = rows.device.type == "cpu" and rows.dtype == weight.dtype
    elements_per_16_bytes = max(1, 16 // rows.element_size())
    return (
        supported_dtype
        and rows.shape[-1] % elements_per_16_bytes == 0
        and weight.shape[1] % elements_per_16_bytes == 0
    )


@torch.library.custom_op("diffmoe_hf::segment_mm", mutates_args=())
def segment_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """
    `rows[segment e] @ weight[e].T` for every expert segment, as one grouped GEMM.

    A custom op around `F.grouped_mm` because the stock fake kernel only admits bf16 (so fp32 CPU models could not
    be traced by `torch.compile`); the backward pass is two more grouped GEMMs.

    Args:
        rows: (R, in) rows sorted by expert; weight: (E, out, in); offsets: (E,) int32 segment end offsets.
    """
    return F.grouped_mm(rows, weight.transpose(1, 2), offs=offsets)


@segment_mm.register_fake
def _(rows, weight, offsets):
    return rows.new_empty(rows.shape[0], weight.shape[1])


def _segment_mm_setup(ctx, inputs, output):
    rows, weight, offsets = inputs
    ctx.save_for_backward(rows, weight, offsets)


def _segment_mm_backward(ctx, grad_out):
    rows, weight, offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_rows = segment_mm(grad_out, weight.transpose(1, 2).contiguous(), offsets)
    grad_weight = F.grouped_mm(grad_out.t(), rows, offs=offsets)  # (E, out, in): per-segment grad_out.T @ rows
    return grad_rows, grad_weight, None


segment_mm.register_autograd(_segment_mm_backward, setup_context=_segment_mm_setup)


class _Block(NamedTuple):
    """One (expert, projection) GEMM of `segment_linear`: rows `start:end`, output columns `column:column + width`,
    weight `index` of the expert-major list."""

    index: int
    start: int
    end: int
    column: int
    width: int


def _blocks(offsets: torch.Tensor, widths: list[int]) -> list[_Block]:
    """The GEMMs of every non-empty segment, for P = `len(widths)` projections per expert."""
    blocks, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            column = 0
            for part, width in enumerate(widths):
                blocks.append(_Block(expert * len(widths) + part, start, end, column, width))
                column += width
        start = end
    return blocks


def _matmul_into(outs: list[torch.Tensor], lefts: list[torch.Tensor], rights: list[torch.Tensor], accumulate: bool):
    """`outs[i] (+)= lefts[i] @ rights[i]`: one MKL grouped GEMM for float32 on x86 CPUs, else one GEMM each."""
    if grouped_matmul_(outs, lefts, rights, accumulate):
        return
    for out, left, right in zip(outs, lefts, rights):
        if accumulate:
            out.addmm_(left, right)
        else:
            torch.mm(left, right, out=out)


@torch.library.custom_op("diffmoe_hf::segment_linear", mutates_args=())
def segment_linear(
    rows: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], offsets: torch.Tensor
) -> torch.Tensor:
    """
    Expert e's `nn.Linear` projections on its segment of rows, reading the experts' own weights (no stacked copy).

    With E = `offsets.numel()` experts and P = `len(weights) // E` projections per expert (e.g. gate and up), rows
    of segment e get `concat_p(rows @ weights[e * P + p].T + biases[e * P + p])`: one GEMM per (expert, projection),
    written in place into its block of the output (on a bias copied there first, as `torch.addmm` does). For float32
    on x86 all of them run as one MKL grouped GEMM (`mkl_grouped_gemm`), which threads across the GEMMs instead of
    within each; elsewhere they run one after the other. This is the path where `F.grouped_mm` has no kernel of its
    own (on CPU it is a loop of GEMMs): it avoids stacking the expert weights (a copy of all of them per training
    step) and a per-row bias gather. A custom op (with a custom-op backward), so `torch.compile(fullgraph=True)`
    traces it although it reads the segment sizes on the host.

    Args:
        rows: (R, in) rows sorted by expert.
        weights: E * P tensors (out_p, in), expert-major.
        biases: as many (out_p,) biases, or an empty list.
        offsets: (E,) int32 segment end offsets.

    Returns:
        (R, sum_p out_p).
    """
    num_parts = len(weights) // offsets.numel()
    widths = [w.shape[0] for w in weights[:num_parts]]
    out = rows.new_empty(rows.shape[0], sum(widths))
    blocks = _blocks(offsets, widths)
    targets = [out[b.start : b.end, b.column : b.column + b.width] for b in blocks]
    if biases:
        for block, target in zip(blocks, targets):
            target.copy_(biases[block.index])
    lefts = [rows[b.start : b.end] for b in blocks]
    _matmul_into(targets, lefts, [weights[b.index].t() for b in blocks], accumulate=bool(biases))
    return out


@segment_linear.register_fake
def _(rows, weights, biases, offsets):
    num_parts = len(weights) // offsets.numel()
    return rows.new_empty(rows.shape[0], sum(w.shape[0] for w in weights[:num_parts]))


@torch.library.custom_op("diffmoe_hf::segment_linear_backward", mutates_args=())
def _segment_linear_backward_op(
    grad_out: torch.Tensor, rows: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor, has_bias: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of `segment_linear` w.r.t. rows, weights and (if `has_bias`) biases, per segment."""
    num_parts = len(weights) // offsets.numel()
    widths = [w.shape[0] for w in weights[:num_parts]]
    grad_rows = torch.zeros_like(rows)
    grad_weights = [torch.zeros_like(w) for w in weights]  # stays zero for experts without rows
    grad_biases = [w.new_zeros(w.shape[0]) for w in weights] if has_bias else []
    blocks = _blocks(offsets, widths)
    grads = [grad_out[b.start : b.end, b.column : b.column + b.width] for b in blocks]
    for part in range(num_parts):  # the P projections of a row all add to its gradient: one grouped GEMM each
        in_part = [i for i, b in enumerate(blocks) if b.index % num_parts == part]
        _matmul_into(
            [grad_rows[blocks[i].start : blocks[i].end] for i in in_part],
            [grads[i] for i in in_part],
            [weights[blocks[i].index] for i in in_part],
            accumulate=True,
        )
    _matmul_into(
        [grad_weights[b.index] for b in blocks],
        [grad.t() for grad in grads],
        [rows[b.start : b.end] for b in blocks],
        accumulate=False,
    )
    if has_bias:
        for block, grad in zip(blocks, grads):
            torch.sum(grad, dim=0, out=grad_biases[block.index])
    return grad_rows, grad_weights, grad_biases


@_segment_linear_backward_op.register_fake
def _(grad_out, rows, weights, offsets, has_bias):
    grad_biases = [w.new_empty(w.shape[0]) for w in weights] if has_bias else []
    return rows.new_empty(rows.shape), [torch.empty_like(w) for w in weights], grad_biases


def _segment_linear_setup(ctx, inputs, output):
    rows, weights, biases, offsets = inputs
    ctx.has_bias = len(biases) > 0
    ctx.num_weights = len(weights)
    ctx.save_for_backward(rows, offsets, *weights)


def _segment_linear_backward(ctx, grad_out):
    rows, offsets, *weights = ctx.saved_tensors
    grad_rows, grad_weights, grad_biases = _segment_linear_backward_op(
        grad_out.contiguous(), rows, weights, offsets, ctx.has_bias
    )
    return grad_rows, grad_weights, grad_biases, None


segment_linear.register_autograd(_segment_linear_backward, setup_context=_segment_linear_setup)


def grouped_linear(
    rows: torch.Tensor, weight: torch.Tensor, segments: ExpertSegments, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Applies expert e's Linear to its segment of rows, for all experts at once.

    Args:
        rows: (R, in) rows sorted by expert.
        weight: (E, out, in) stacked `nn.Linear` weights.
        segments: the segment layout of `rows`.
        bias: (E, out) stacked biases, or `None`.

    Returns:
        (R, out).
    """
    if _grouped_mm_usable(rows, weight):
        out = segment_mm(rows, weight, segments.offsets)
    else:
        out = torch.cat(
            [torch.mm(chunk, w.t()) for chunk, w in zip(rows.split(segments.sizes()), weight.unbind(0))], dim=0
        )
    if bias is not None:
        out = out + bias[segments.expert_index]
    return out
