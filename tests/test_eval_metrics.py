"""FID, sFID, IS, precision and recall against independent computations of the published formulas (synthetic
features: the formulas do not depend on the network)."""

import numpy as np
import pytest
from scipy import linalg
from scipy.special import rel_entr, softmax
from sklearn.neighbors import NearestNeighbors

from diffmoe_hf.evaluation import metrics
from diffmoe_hf.evaluation.metrics import FeatureStatistics


EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, like network activations
    return (rng.normal(size=(n, d)) @ mixing * scale + shift).astype(np.float32)


def _frechet_adm(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """ADM's form: scipy's sqrtm of S1 S2."""
    covmean = linalg.sqrtm(a.sigma.dot(b.sigma)).real
    diff = a.mu - b.mu  # the same float32 means as ADM; the independent part is the trace term
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def _frechet_torch_fidelity(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """torch-fidelity's form: square roots of the eigenvalues of S1 S2."""
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(a.sigma.dot(b.sigma)).astype("complex128")).real)
    diff = a.mu - b.mu
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def _frechet_tolerance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Rounding bound of a matrix square root's trace in float64: D * sqrt(condition) * eps * scale."""
    product_eigs = np.abs(np.linalg.eigvals(a.sigma @ b.sigma))
    condition = product_eigs.max() / product_eigs.min()
    return len(a.mu) * np.sqrt(condition) * EPS64 * (np.trace(a.sigma) + np.trace(b.sigma))


def test_statistics_are_adms():
    x = _features(50, 6, 0)
    stats = FeatureStatistics.of(x)
    assert stats.mu.dtype == np.float32 and np.array_equal(stats.mu, np.mean(x, axis=0))  # float32 mean, as ADM
    assert np.array_equal(stats.sigma, np.cov(x, rowvar=False)) and stats.sigma.dtype == np.float64
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics.of(x[:1])


@pytest.mark.parametrize("dim", [16, 64])
def test_frechet_distance_matches_independent_forms(dim):
    a = FeatureStatistics.of(_features(600, dim, 1))
    b = FeatureStatistics.of(_features(600, dim, 2, shift=0.3, scale=1.2))
    fid = metrics.frechet_distance(a, b)
    tolerance = _frechet_tolerance(a, b)
    assert fid > 1 and abs(fid - _frechet_adm(a, b)) <= tolerance
    assert abs(fid - _frechet_torch_fidelity(a, b)) <= tolerance
    assert abs(metrics.frechet_distance(a, a)) <= _frechet_tolerance(a, a)  # FID(A, A) = 0
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance(a, FeatureStatistics.of(_features(10, dim + 1, 0)))


def test_frechet_distance_of_rank_deficient_covariances():
    """Fewer samples than dimensions (singular covariances, where sqrtm struggles): the trace term equals the nuclear
    norm of Xc1 Xc2^T / sqrt((n1 - 1)(n2 - 1)) (the nonzero eigenvalues of S1 S2 are those of that Gram product)."""
    x1, x2 = _features(5, 32, 5).astype(np.float64), _features(7, 32, 6, shift=0.2).astype(np.float64)
    a, b = FeatureStatistics.of(x1), FeatureStatistics.of(x2)
    c1, c2 = x1 - x1.mean(axis=0), x2 - x2.mean(axis=0)
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(4 * 6)
    diff = a.mu - b.mu
    expected = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean
    # each of the D eigenvalues is off by about eps * the largest; the square root turns that into sqrt(eps * largest)
    # for the zero ones: 2 (the factor of the trace term) * D * sqrt(eps * |S1| |S2|)
    largest = np.linalg.norm(a.sigma, 2) * np.linalg.norm(b.sigma, 2)
    assert abs(metrics.frechet_distance(a, b) - expected) <= 2 * 32 * np.sqrt(EPS64 * largest)


def _inception_score_scipy(logits, boundaries):
    p = softmax(logits.astype(np.float64), axis=1)
    scores = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        part = p[start:end]
        scores.append(np.exp(rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()))
    return np.array(scores)


def test_inception_score_adm_splits_of_5000():
    logits = np.random.default_rng(0).normal(scale=4.0, size=(12_000, 1008)).astype(np.float32)
    expected = _inception_score_scipy(logits, [0, 5000, 10_000, 12_000]).mean()
    # float32 softmax and logs summed over 1008 classes, then exp: relative rounding bound 2 * 1008 * eps32
    assert abs(metrics.inception_score(logits) - expected) <= 2 * 1008 * EPS32 * expected
    assert metrics.inception_score(np.zeros((10, 1008), np.float32)) == pytest.approx(1.0)  # one class per sample


def test_inception_score_torch_fidelity_splits():
    logits = np.random.default_rng(1).normal(scale=3.0, size=(1000, 1008))
    shuffled = logits[np.random.RandomState(2020).permutation(1000)]
    scores = _inception_score_scipy(shuffled, [i * 100 for i in range(11)])
    mean, std = metrics.inception_score_splits(logits)
    assert abs(mean - scores.mean()) <= 2 * 1008 * EPS64 * mean and abs(std - scores.std()) <= 2 * 1008 * EPS64 * mean


def _knn_precision_recall(reference, samples, k=3):
    """Direct manifold estimate: float64 k-NN radii (sklearn) and brute-force membership."""
    reference, samples = reference.astype(np.float64), samples.astype(np.float64)
    radius = {}
    for name, x in (("ref", reference), ("sam", samples)):
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        radius[name] = distances[:, k] ** 2  # column 0 is the point itself
    d2 = ((samples[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
    precision = (d2 <= radius["ref"][None, :]).any(axis=1).mean()
    recall = (d2.T <= radius["sam"][None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_match_a_direct_knn_manifold():
    reference = _features(300, 8, 3)
    samples = _features(250, 8, 4, shift=0.8, scale=1.4)
    precision, recall = metrics.precision_recall(reference, samples, batch=64, distances="float32")  # several blocks
    expected = _knn_precision_recall(reference, samples)
    assert (precision, recall) == expected and 0.05 < precision < 0.95 and 0.05 < recall < 0.95
    assert metrics.precision_recall(reference, reference, distances="float32") == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(reference[:3], samples)


def _adm_block(u, v):
    """ADM's `DistanceBlock`: float16 features and distances (float32 accumulation, as on a GPU), the whole block in
    float32 when a float16 value is not finite; returned as float32."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = np.square(u16).sum(axis=1, dtype=np.float32).astype(np.float16)[:, None]
        norm_v = np.square(v16).sum(axis=1, dtype=np.float32).astype(np.float16)[None, :]
        product = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        block = np.maximum(norm_u - 2 * product + norm_v, np.float16(0))
    if np.isfinite(block).all():
        return block.astype(np.float32)
    norm_u, norm_v = np.square(u).sum(axis=1)[:, None], np.square(v).sum(axis=1)[None, :]
    return np.maximum(norm_u - 2 * (u @ v.T) + norm_v, np.float32(0))


def _adm_precision_recall(reference, samples, batch, k=3):
    """An independent re-implementation of ADM's `ManifoldEstimator` (numpy): radii from full distance rows
    assembled of `batch` x `batch` blocks and `np.partition`, then both memberships from reference x sample blocks."""

    def radii(features):
        out = np.zeros(len(features), np.float32)
        for r in range(0, len(features), batch):
            row = np.concatenate(
                [_adm_block(features[r : r + batch], features[c : c + batch]) for c in range(0, len(features), batch)],
                axis=1,
            )
            out[r : r + batch] = np.partition(row, k, axis=1)[:, k]
        return out

    reference_radii, sample_radii = radii(reference), radii(samples)
    reference_in = np.zeros(len(reference), bool)
    sample_in = np.zeros(len(samples), bool)
    for r in range(0, len(reference), batch):
        for c in range(0, len(samples), batch):
            block = _adm_block(reference[r : r + batch], samples[c : c + batch])
            reference_in[r : r + batch] |= (block <= sample_radii[None, c : c + batch]).any(axis=1)
            sample_in[c : c + batch] |= (block <= reference_radii[r : r + batch, None]).any(axis=0)
    return sample_in.mean(), reference_in.mean()


def _grid_features(n, d, seed, step=0.25, levels=16):
    """Features on a grid of `step` (`levels` values): every float32 sum in the distances is exact, so any
    summation order gives the same float32 value, and the only rounding is float16's, the same in both codes."""
    return (np.random.default_rng(seed).integers(0, levels, size=(n, d)) * step).astype(np.float32)


@pytest.mark.parametrize("batch", [16, metrics.ADM_BATCH])
def test_precision_recall_are_adms_float16_computation(batch):
    reference, samples = _grid_features(120, 128, 0), _grid_features(100, 128, 1)
    adm = metrics.precision_recall(reference, samples, batch=batch)
    assert adm == _adm_precision_recall(reference, samples, batch)
    # float16 rounding moves the radii: on these features the float32 computation gives other numbers
    assert metrics.precision_recall(reference, samples, batch=batch, distances="float32") != adm


def test_precision_recall_fall_back_to_float32_per_block_as_adm():
    """Rows whose squared norms overflow float16 make their blocks (only those) fall back to float32."""
    reference, samples = _grid_features(64, 128, 0), _grid_features(48, 128, 1)
    reference[:5] = np.random.default_rng(4).integers(200, 256, size=(5, 128))  # |u|^2 > 65504
    result = metrics.precision_recall(reference, samples, batch=16)
    assert result == _adm_precision_recall(reference, samples, batch=16)
    assert result != metrics.precision_recall(reference, samples, batch=16, distances="float32")


def test_precision_recall_refuse_an_unknown_distance_computation():
    with pytest.raises(ValueError, match="float16"):
        metrics.precision_recall(_grid_features(8, 4, 0), _grid_features(8, 4, 1), distances="float64")
