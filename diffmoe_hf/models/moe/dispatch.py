"""The one token -> expert dispatch path shared by every MoE family.

Routed (token, expert) pairs are sorted by expert once, the token rows gathered once, every expert runs on its
contiguous segment through its bank's expert backend (see `backends`: `segment_linear` on the experts' own weights,
all the expert GEMMs as one MKL grouped GEMM on x86 CPUs; `grouped_linear` over stacked weights where `F.grouped_mm`
has a kernel, i.e. CUDA bf16; or the expert modules themselves), and the weighted results are combined with a single
`index_add_`. On CUDA nothing on the fast paths moves data to the host; on CPU `segment_linear` reads the segment
sizes (already on the host) inside a custom op. Either way it compiles with `torch.compile(fullgraph=True)`; only the
`"modules"` backend reads the segment sizes in Python.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .mkl_grouped_gemm import grouped_matmul_


class ExpertSegments(NamedTuple):
    """
    Routed rows sorted by expert.

    Attributes:
        token_index: (R,) int64, the token each row reads and writes.
        expert_index: (R,) int64, the expert of each row (non-decreasing).
        weights: (R,) routing weight of each row, or `None` when the caller weights the rows itself.
        offsets: (E,) int32 end offset of each expert's segment (`offsets[-1] == R`), on the tokens' device.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weights: torch.Tensor | None
    offsets: torch.Tensor

    def sizes(self) -> list[int]:
        """Rows per expert as Python ints (synchronises with the device; fallback paths only)."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()


def segments_from_topk(
    expert_ids: torch.Tensor, expert_weights: torch.Tensor | None, num_experts: int
) -> ExpertSegments:
    """
    Sorts token-choice routing by expert.

    Args:
        expert_ids: (S, k) int64, the k experts chosen by each of S tokens.
        expert_weights: (S, k) weights of those choices, or `None`.
        num_experts: E.
    """
    flat_experts = expert_ids.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_experts.device)
    counts = counts.index_add_(0, flat_experts, torch.ones_like(flat_experts))  # static shape, unlike bincount
    return ExpertSegments(
        token_index=order // expert_ids.shape[1],
        expert_index=flat_experts[order],
        weights=None if expert_weights is None else expert_weights.reshape(-1)[order],
        offsets=torch.cumsum(counts, 0).to(torch.int32),
    )


def segments_from_expert_choice(
    token_ids: torch.Tensor, weights: torch.Tensor, tokens_per_expert: torch.Tensor | None = None
) -> ExpertSegments:
    """
    Lays out expert-choice routing (each expert picks its tokens) as expert segments.

    Args:
        token_ids: (E, K) int64, the tokens each expert ranked best first.
        weights: (E, K) the weight of each (expert, token) choice.
        tokens_per_expert: (E,) int64 number of leading choices expert e keeps (at most K), or `None` to keep all K.
            Variable counts make the number of rows data-dependent: compacting them reads it on the host once.

    Returns:
        `ExpertSegments` with expert e's kept tokens as its segment.
    """
    num_experts, num_choices = token_ids.shape
    expert_ids = torch.arange(num_experts, device=token_ids.device).unsqueeze(1).expand(num_experts, num_choices)
    if tokens_per_expert is None:
        offsets = torch.arange(1, num_experts + 1, device=token_ids.device, dtype=torch.int32) * num_choices
        return ExpertSegments(token_ids.reshape(-1), expert_ids.reshape(-1), weights.reshape(-1), offsets)
    keep = torch.arange(num_choices, device=token_ids.device) < tokens_per_expert.unsqueeze(1)
    return ExpertSegments(
        token_index=token_ids[keep],
        expert_index=expert_ids[keep],
        weights=weights[keep],
        offsets=torch.cumsum(tokens_per_expert, 0).to(torch.int32),
    )


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


def combine_segments(
    expert_out: torch.Tensor, segments: ExpertSegments, num_tokens: int, scale_in_place: bool = False
) -> torch.Tensor:
    """
    Sums the (R, D) weighted expert outputs back onto their tokens -> (num_tokens, D). With `scale_in_place` the
    routing weights are applied in `expert_out` itself (the caller no longer needs it), saving an (R, D) temporary.
    """
    if segments.weights is not None:
        weights = segments.weights.unsqueeze(-1).to(expert_out.dtype)
        expert_out = expert_out.mul_(weights) if scale_in_place else expert_out * weights
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add_(0, segments.token_index, expert_out)


def dispatch(hidden_states: torch.Tensor, segments: ExpertSegments, experts, **expert_kwargs) -> torch.Tensor:
    """
    Runs `experts` (a `GroupedExperts`) on the routed rows and combines them.

    Args:
        hidden_states: (S, D) token pool.
        segments: routing sorted by expert (`segments_from_topk`, or a family's own selection).
        experts: the expert bank.
        expert_kwargs: extra per-call inputs of the bank's `forward_grouped` (e.g. Diff-MoE's per-sample
            conditioning, which the bank gathers per row through `segments.token_index`).

    Returns:
        (S, D) weighted sum of each token's expert outputs (zero for tokens no expert took).
    """
    rows = hidden_states.index_select(0, segments.token_index)
    expert_out = experts.forward_grouped(rows, segments, **expert_kwargs)  # a new tensor
    return combine_segments(expert_out, segments, hidden_states.shape[0], scale_in_place=not torch.is_grad_enabled())
