"""FID, sFID, Inception Score, precision and recall from Inception features, with the definitions of the evaluators the
papers used.

- Frechet distance (FID on pool3 features, sFID on spatial features), as ADM (`evaluations/evaluator.py` of
  openai/guided-diffusion, after TTUR) and torch-fidelity define it: `|mu1 - mu2|^2 + tr(S1) + tr(S2) -
  2 tr((S1 S2)^1/2)`, with statistics as ADM computes them (`np.mean` of the float32 features, `np.cov(rowvar=False)`
  in float64). See `frechet_distance` for how the trace term is computed.
- Inception Score, ADM: softmax of the bias-free logits, `exp(mean KL(p(y|x) || p(y)))` on consecutive splits of 5000
  samples (float32, as ADM), averaged. torch-fidelity (JiT): 10 equal splits after a shuffle with seed 2020, float64.
- Precision and recall (Kynkaanniemi et al., as ADM): each feature's radius is the squared distance to its 3rd nearest
  neighbour in its own set (itself excluded); precision is the fraction of samples inside some reference radius,
  recall the fraction of references inside some sample radius (`<=`). Distances as ADM's `ManifoldEstimator` computes
  them by default (`distances="float16"`): features rounded to float16, `max(|u|^2 - 2 u.v + |v|^2, 0)` in float16
  with float32 accumulation, in blocks of 10000 x 10000, a block recomputed in float32 when any of its float16
  distances is not finite; radii and comparisons in float32. `distances="float32"` computes every block in float32.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStatistics":
        """Statistics of (N, D) features, as ADM computes them."""
        if len(features) < 2:
            raise ValueError(f"A covariance needs at least 2 feature vectors, got {len(features)}.")
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))


def _check_shapes(a: FeatureStatistics, b: FeatureStatistics) -> None:
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(
            f"The statistics have different dimensions ({a.mu.shape} vs {b.mu.shape}): they come from different "
            "feature layers or protocols."
        )


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """
    Frechet distance of two Gaussians, `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)`.

    The trace term is computed as `sum(sqrt(eig(S1^1/2 S2 S1^1/2)))` from two symmetric eigendecompositions in float64
    (the eigenvalues of `S1 S2` and of `S1^1/2 S2 S1^1/2` are the same): the quantity ADM computes with scipy's
    `sqrtm(S1 S2)` and torch-fidelity from `eigvals(S1 S2)`, to float64 round-off (the tests check both forms), about
    10 times faster than `sqrtm` on 2048 x 2048 matrices and without its complex round-off or singular-matrix retry.
    The mean term is ADM's (`diff.dot(diff)` in the dtype of the means).
    """
    _check_shapes(a, b)
    sigma1, sigma2 = torch.as_tensor(a.sigma, dtype=torch.float64), torch.as_tensor(b.sigma, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    tr_covmean = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp_min(0).sqrt().sum().item()
    diff = np.atleast_1d(a.mu) - np.atleast_1d(b.mu)
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score of (N, 1008) bias-free logits: consecutive splits of `split_size`, float32."""
    preds = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def inception_score_splits(
    logits: np.ndarray, splits: int = 10, shuffle_seed: int | None = 2020
) -> tuple[float, float]:
    """torch-fidelity's Inception Score (JiT): mean and std over `splits` equal splits, after a seeded shuffle."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if shuffle_seed is not None:
        logits = logits[np.random.RandomState(shuffle_seed).permutation(len(logits))]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    n, scores = len(logits), []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits : (i + 1) * n // splits], log_p[i * n // splits : (i + 1) * n // splits]
        kl = chunk * (log_chunk - chunk.mean(dim=0, keepdim=True).log())
        scores.append(kl.sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


PRECISION_RECALL_DISTANCES = ("float16", "float32")
ADM_BATCH = 10000  # rows and columns per distance block in ADM's ManifoldEstimator


def _squared_distances(u: torch.Tensor, v: torch.Tensor, distances: str) -> torch.Tensor:
    """
    (len(u), len(v)) float32 squared Euclidean distances of two float32 feature blocks, ADM's formula
    `max(|u|^2 - 2 u.v + |v|^2, 0)`. "float16": each operation's result rounded to float16 (sums and the matrix
    product accumulated in float32, as a GPU does), the float32 result used instead when any float16 value is not
    finite; "float32": float32 throughout.
    """
    if distances == "float16":
        u16, v16 = u.half(), v.half()
        norms_u = (u16 * u16).sum(dim=1, keepdim=True, dtype=torch.float32).half()
        norms_v = (v16 * v16).sum(dim=1, dtype=torch.float32).half()[None, :]
        products = (u16.float() @ v16.float().T).half()
        block = ((norms_u - 2 * products) + norms_v).clamp_min_(0)
        if torch.isfinite(block).all():
            return block.float()
    norms_u = (u * u).sum(dim=1, keepdim=True)
    norms_v = (v * v).sum(dim=1)[None, :]
    return (norms_u - 2 * u @ v.T + norms_v).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch: int = ADM_BATCH, distances: str = "float16"):
    """(N,) float32 squared distance of each feature to its k-th nearest neighbour in `features` (itself excluded:
    the (k + 1)-th smallest distance, as ADM), over `batch` x `batch` distance blocks."""
    if len(features) <= k:
        raise ValueError(f"Precision and recall need more than {k} feature vectors per set, got {len(features)}.")
    radii = []
    for rows in torch.split(features, batch):
        # the k + 1 smallest of each column block, then of their union: the same value as over the whole row
        candidates = [
            torch.topk(_squared_distances(rows, columns, distances), min(k + 1, len(columns)), largest=False).values
            for columns in torch.split(features, batch)
        ]
        radii.append(torch.kthvalue(torch.cat(candidates, dim=1), k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(reference, reference_radii, samples, sample_radii, batch: int, distances: str):
    """
    (samples inside some reference radius, references inside some sample radius) as fractions, both read from the
    same reference-row x sample-column distance blocks, as ADM does (float16 rounding depends on the orientation).
    """
    samples_inside = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    references_inside = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    for start in range(0, len(reference), batch):
        rows = slice(start, start + batch)
        for first in range(0, len(samples), batch):
            columns = slice(first, first + batch)
            block = _squared_distances(reference[rows], samples[columns], distances)
            references_inside[rows] |= (block <= sample_radii[None, columns]).any(dim=1)
            samples_inside[columns] |= (block <= reference_radii[rows, None]).any(dim=0)
    return samples_inside.double().mean().item(), references_inside.double().mean().item()


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = 3,
    batch: int = ADM_BATCH,
    distances: str = "float16",
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """
    ADM's improved precision and recall of (N, D) sample features against (M, D) reference features.

    Args:
        reference, samples: The pool features.
        k: Neighbourhood size (ADM: 3).
        batch: Rows and columns per distance block (ADM: 10000; with "float16" it decides which blocks fall back to
            float32, so only ADM's value reproduces ADM's numbers exactly).
        distances: "float16" (ADM's default computation) or "float32".
        device: Where the distances are computed.
    """
    if distances not in PRECISION_RECALL_DISTANCES:
        raise ValueError(f"Unknown distances {distances!r}; choose one of {PRECISION_RECALL_DISTANCES}.")
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    sam = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref, k, batch, distances)
    sample_radii = manifold_radii(sam, k, batch, distances)
    return _coverage(ref, ref_radii, sam, sample_radii, batch, distances)
