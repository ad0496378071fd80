"""Many small float32 GEMMs in one Intel MKL call: the per-expert GEMMs of `segment_linear` on CPU.

PyTorch's x86 CPU builds link MKL and export its CBLAS interface, including `cblas_sgemm_batch` (the LP64 interface,
32-bit integers; MKL names its ILP64 twin `cblas_sgemm_batch_64`), which runs groups of GEMMs of different shapes in
one call and spreads the groups over the intra-op threads. One `torch.mm` per expert instead splits each small GEMM
over all threads, which scales badly: at 2 threads, 48 expert GEMMs of ~213 x 384 x 256 take 1.15x to 1.4x the time
of one dense GEMM of the same FLOPs, and the grouped call about 1.0x (BENCHMARKS.md). On our machine its results were
bitwise those of the per-expert `torch.mm` calls.

Where the symbol is missing (other BLAS, other architectures) or disagrees with `torch.mm` on a probe problem,
`grouped_matmul_` reports that it did nothing and callers fall back to one `torch.mm` per GEMM.
"""

import ctypes
import functools
import glob
import math
import os

import torch


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _operand_layout(matrix: torch.Tensor) -> tuple[int, int] | None:
    """
    (CBLAS transpose flag, leading dimension) of an (m, n) view that is row-major (`x[a:b]`, with any row stride of
    at least n) or the transpose of one (`w.t()`), else None (e.g. broadcast or otherwise overlapping strides).
    """
    rows, cols = matrix.shape
    row_stride, col_stride = matrix.stride()
    if (col_stride == 1 or cols == 1) and (rows == 1 or row_stride >= cols):
        return _NO_TRANS, row_stride if rows > 1 else cols
    if (row_stride == 1 or rows == 1) and (cols == 1 or col_stride >= rows):
        return _TRANS, col_stride if cols > 1 else rows
    return None


def _call(sgemm_batch, outs, lefts, rights, accumulate: bool) -> bool:
    """`outs[i] (+)= lefts[i] @ rights[i]` through `sgemm_batch`, one group per GEMM; False if a layout is unusable."""
    layouts = [(_operand_layout(a), _operand_layout(b), _operand_layout(c)) for a, b, c in zip(lefts, rights, outs)]
    if any(a is None or b is None or c is None or c[0] != _NO_TRANS for a, b, c in layouts):
        return False
    largest = max(max(*c.shape, a.shape[1], la[1], lb[1], lc[1]) for c, a, (la, lb, lc) in zip(outs, lefts, layouts))
    if largest >= 2**31:  # beyond LP64's 32-bit integers
        return False
    count = len(outs)

    def ints(values):
        return (ctypes.c_int * count)(*values)

    def pointers(tensors):
        return (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])

    sgemm_batch(
        _ROW_MAJOR,
        ints([a[0] for a, _, _ in layouts]),
        ints([b[0] for _, b, _ in layouts]),
        ints([c.shape[0] for c in outs]),
        ints([c.shape[1] for c in outs]),
        ints([a.shape[1] for a in lefts]),
        (ctypes.c_float * count)(*([1.0] * count)),
        pointers(lefts),
        ints([a[1] for a, _, _ in layouts]),
        pointers(rights),
        ints([b[1] for _, b, _ in layouts]),
        (ctypes.c_float * count)(*([1.0 if accumulate else 0.0] * count)),
        pointers(outs),
        ints([c[1] for _, _, c in layouts]),
        count,
        ints([1] * count),
    )
    return True


@functools.cache
def _mkl_sgemm_batch():
    """MKL's `cblas_sgemm_batch` from the loaded libtorch_cpu, if it exists and agrees with `torch.mm`, else None."""
    if not torch.backends.mkl.is_available():
        return None
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")):
        try:
            sgemm_batch = ctypes.CDLL(path).cblas_sgemm_batch
        except (OSError, AttributeError):
            continue
        int_array, float_array, pointer_array = (
            ctypes.POINTER(t) for t in (ctypes.c_int, ctypes.c_float, ctypes.c_void_p)
        )
        sgemm_batch.restype = None
        sgemm_batch.argtypes = [
            ctypes.c_int,
            int_array,
            int_array,
            int_array,
            int_array,
            int_array,
            float_array,
            pointer_array,
            int_array,
            pointer_array,
            int_array,
            float_array,
            pointer_array,
            int_array,
            ctypes.c_int,
            int_array,
        ]
        if _agrees_with_torch(sgemm_batch):
            return sgemm_batch
    return None


def _agrees_with_torch(sgemm_batch) -> bool:
    """Runs a small problem with mixed shapes, transposes and strides through `sgemm_batch` and compares to torch."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.randn(3, 5, generator=generator), torch.randn(5, 4, generator=generator)
    weight, other = torch.randn(3, 5, generator=generator), torch.randn(5, 4, generator=generator)
    out = torch.full((7, 8), 2.0)
    lefts, rights = [rows, columns.t()], [weight.t(), other]  # row-major and transposed operands of both kinds
    outs = [out[:3, :3], out[3:7, 4:8]]  # leading dimension 8
    expected = [o + a @ b for o, a, b in zip(outs, lefts, rights)]
    if not _call(sgemm_batch, outs, lefts, rights, accumulate=True):
        return False
    return all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outs, expected))


def _balanced(outs, lefts, rights) -> tuple[list, list, list]:
    """
    The same products with every GEMM that carries more than a quarter of one thread's share of the work cut into
    near-equal row blocks (of its output and left operand, 64 rows or more each): the grouped GEMM runs each GEMM on
    one thread, so an expert that received most of the tokens would otherwise keep one thread busy alone.
    """
    work = [out.shape[0] * out.shape[1] * left.shape[1] for out, left in zip(outs, lefts)]
    share = sum(work) / (4 * torch.get_num_threads())
    balanced = ([], [], [])
    for out, left, right, gemm_work in zip(outs, lefts, rights, work):
        rows = out.shape[0]
        pieces = max(1, min(math.ceil(gemm_work / share), rows // 64))
        for piece in range(pieces):
            first, last = rows * piece // pieces, rows * (piece + 1) // pieces
            balanced[0].append(out[first:last])
            balanced[1].append(left[first:last])
            balanced[2].append(right)
    return balanced


def grouped_matmul_(
    outs: list[torch.Tensor], lefts: list[torch.Tensor], rights: list[torch.Tensor], accumulate: bool = False
) -> bool:
    """
    `outs[i] = lefts[i] @ rights[i]` (or `+=` with `accumulate`) for every i, as one MKL grouped GEMM.

    Args:
        outs: (m_i, n_i) float32 CPU views with unit column stride, written in place; they must not overlap.
        lefts: (m_i, k_i) float32 CPU views, row-major or transposed row-major (e.g. `x[a:b]`, `g[a:b].t()`).
        rights: (k_i, n_i) views of the same kinds (e.g. `weight.t()` of an `nn.Linear` weight).
        accumulate: add to `outs` instead of overwriting them.

    GEMMs that carry much more than their share of the work are cut into row blocks first (`_balanced`).

    Returns:
        Whether the products were computed. False (nothing written) when MKL's grouped GEMM is unavailable, an
        operand is not float32 on CPU, or a layout is not one CBLAS accepts; the caller then loops over `torch.mm`.
    """
    for out, left, right in zip(outs, lefts, rights, strict=True):
        if left.shape[0] != out.shape[0] or right.shape != (left.shape[1], out.shape[1]):
            raise ValueError(f"Cannot multiply {tuple(left.shape)} by {tuple(right.shape)} into {tuple(out.shape)}.")
    if not outs or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in [*outs, *lefts, *rights]):
        return False
    if any(min(o.shape) == 0 or a.shape[1] == 0 for o, a in zip(outs, lefts)):
        return False
    sgemm_batch = _mkl_sgemm_batch()
    return sgemm_batch is not None and _call(sgemm_batch, *_balanced(outs, lefts, rights), accumulate)
