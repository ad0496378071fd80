"""The MKL grouped GEMM behind CPU `segment_linear` computes what one `torch.mm` per GEMM computes, and the expert
path gives the same values and gradients with and without it."""

import platform

import pytest
import torch

from diffmoe_hf.models.moe.ops import grouped_gemm, mkl_grouped_gemm
from diffmoe_hf.models.moe.ops.grouped_gemm import segment_linear
from diffmoe_hf.models.moe.ops.mkl_grouped_gemm import grouped_matmul_

from .helpers import assert_float32_close, float32_tolerance


mkl_on_x86 = pytest.mark.skipif(
    not torch.backends.mkl.is_available() or platform.machine() not in ("x86_64", "AMD64"),
    reason="MKL's grouped GEMM ships with PyTorch's x86 builds only",
)


def _problems():
    """Mixed shapes and operand layouts: row-major, transposed, strided slices of larger tensors."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(11, 6, generator=generator)
    weight = torch.randn(5, 6, generator=generator)
    grad = torch.randn(11, 9, generator=generator)
    out = torch.randn(11, 12, generator=generator)
    outs = [out[:4, :5], out[4:11, 5:10], torch.zeros(9, 6)]
    lefts = [rows[:4], rows[4:11], grad.t()]  # the last: (9, 11), a transposed operand
    rights = [weight.t(), weight.t(), rows]
    return outs, lefts, rights


@mkl_on_x86
@pytest.mark.parametrize("accumulate", [False, True])
def test_grouped_matmul_matches_one_mm_per_gemm(accumulate):
    outs, lefts, rights = _problems()
    expected = [(o if accumulate else 0) + a @ b for o, a, b in zip(outs, lefts, rights)]
    assert grouped_matmul_(outs, lefts, rights, accumulate=accumulate)
    for got, want, left in zip(outs, expected, lefts):
        assert_float32_close(got, want, float32_tolerance(want, left.shape[1], depth=2 if accumulate else 1))


def test_grouped_matmul_declines_what_it_cannot_compute_and_writes_nothing():
    outs, lefts, rights = _problems()
    for cast in (torch.float64, torch.bfloat16):
        typed = [t.to(cast) for t in outs]
        before = [t.clone() for t in typed]
        assert not grouped_matmul_(typed, [t.to(cast) for t in lefts], [t.to(cast) for t in rights])
        for got, want in zip(typed, before):
            assert torch.equal(got, want)
    assert not grouped_matmul_([torch.empty(0, 5)], [torch.empty(0, 6)], [torch.empty(6, 5)])
    assert not grouped_matmul_([], [], [])
    broadcast = torch.randn(1, 6).expand(4, 6)  # overlapping rows: no CBLAS layout
    assert not grouped_matmul_([torch.empty(4, 5)], [broadcast], [torch.randn(6, 5)])
    with pytest.raises(ValueError, match="Cannot multiply"):
        grouped_matmul_([torch.empty(4, 5)], [torch.randn(4, 6)], [torch.randn(5, 5)])


@pytest.mark.parametrize("grouped", [True, False], ids=["mkl-grouped", "one-gemm-each"])
@pytest.mark.parametrize(
    "sizes",
    [[3, 0, 5, 4], [300, 7, 0, 20]],  # expert 1 / 2 gets no rows; the 300-row GEMMs are cut into row blocks
    ids=["small", "one-expert-takes-most-rows"],
)
def test_segment_linear_agrees_with_and_without_the_grouped_gemm(grouped, sizes, monkeypatch):
    torch.manual_seed(0)
    offsets = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    rows = torch.randn(sum(sizes), 8, requires_grad=True)
    weights = [torch.randn(5 if i % 2 == 0 else 4, 8, requires_grad=True) for i in range(8)]  # (gate, up) x 4
    biases = [torch.randn(w.shape[0], requires_grad=True) for w in weights]
    if not grouped:
        monkeypatch.setattr(grouped_gemm, "grouped_matmul_", lambda *args, **kwargs: False)
    out = segment_linear(rows, weights, biases, offsets)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), [rows, *weights, *biases])
    ref = torch.cat(
        [
            torch.cat([torch.nn.functional.linear(chunk, weights[2 * i + p], biases[2 * i + p]) for p in range(2)], 1)
            for i, chunk in enumerate(rows.split(sizes))
        ]
    )
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [rows, *weights, *biases])
    # the longest dot products: the rows of the largest segment (weight gradients), then 8 features forward
    longest = max(max(sizes), rows.shape[1])
    assert_float32_close(out, ref, float32_tolerance(ref, longest))
    for got, want in zip(grads, ref_grads):
        assert_float32_close(got, want, float32_tolerance(want, longest))


def test_segments_are_one_gemm_per_projection():
    offsets = torch.tensor([300, 307, 307, 327], dtype=torch.int32)
    whole = [(b.index, b.start, b.end, b.column, b.width) for b in grouped_gemm._blocks(offsets, [5, 4])]
    assert whole == [
        (0, 0, 300, 0, 5),
        (1, 0, 300, 5, 4),
        (2, 300, 307, 0, 5),
        (3, 300, 307, 5, 4),
        (6, 307, 327, 0, 5),
        (7, 307, 327, 5, 4),
    ]  # the expert without rows has none


def test_a_gemm_with_most_of_the_work_is_cut_into_balanced_row_blocks():
    rows, weight = torch.randn(327, 8), torch.randn(8, 5)
    out = torch.empty(327, 5)
    bounds = [(0, 300), (300, 307), (307, 327)]  # one expert took 300 of 327 rows
    outs, lefts, rights = mkl_grouped_gemm._balanced(
        [out[a:b] for a, b in bounds], [rows[a:b] for a, b in bounds], [weight] * 3
    )
    assert [o.shape[0] for o in outs] == [75, 75, 75, 75, 7, 20]  # at most rows // 64 blocks, whatever the threads
    assert [a.data_ptr() for a in lefts] == [rows[start].data_ptr() for start in (0, 75, 150, 225, 300, 307)]
    assert [o.data_ptr() for o in outs] == [out[start].data_ptr() for start in (0, 75, 150, 225, 300, 307)]
    assert all(r is weight for r in rights)
