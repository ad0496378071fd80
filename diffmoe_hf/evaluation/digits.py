"""Sample-quality metrics for class-conditional generators trained on scikit-learn's handwritten digits.

The data is `sklearn.datasets.load_digits` (1797 grayscale 8x8 images, values 0..16, 10 classes), split once,
stratified, 80/20 with a fixed seed (1437 train / 360 held-out). Generated images of any resolution are mapped back
to the data's own space (area pooling to 8x8, [-1, 1] -> [0, 16], clipped). The reference models are fitted on real
training digits only:

- accuracy: an RBF SVM (C = 10) labels each sample; the fraction labelled as the requested class (mean, worst class);
- Frechet distance between Gaussians fitted to 20-component PCA features of the samples and of the held-out digits,
  next to its real-vs-real floor (100 real training digits per class vs held-out, averaged over 5 draws);
- c2st: 5-fold cross-validated accuracy of an RBF SVM telling 36 samples per class from the 360 held-out digits
  (0.5 = indistinguishable);
- memorisation: the fraction of samples closer to their nearest training digit than the 5th percentile of that
  distance for held-out digits (a generator replaying its training set scores 1.0), and the median nearest-training
  distance of samples over that of held-out digits (about 1 is healthy, near 0 means copying);
- diversity: mean pairwise distance within each generated class over the same for held-out digits.
"""

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import FeatureStatistics, frechet_distance


DIGIT_MAX = 16.0
NUM_CLASSES = 10
MIN_SAMPLES = 36 * NUM_CLASSES  # the fewest samples the per-class metrics are computed on


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("The digits metrics need scikit-learn: pip install 'diffmoe-hf[eval]'.") from None


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    The fixed stratified 80/20 split of `load_digits`.

    Returns:
        `(train_images, train_labels, heldout_images, heldout_labels)`; images are (N, 8, 8) float64 in [0, 16].
    """
    _require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    return train_x, train_y, test_x, test_y


def to_digit_space(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """
    Generated images -> the data's own space.

    Args:
        images: (N, 1, H, W) or (N, H, W) in [-1, 1] (the model's pixel range), H and W multiples of 8.

    Returns:
        (N, 64) float64 in [0, 16].
    """
    images = torch.as_tensor(images, dtype=torch.float64)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] % 8 or images.shape[-2] % 8:
        raise ValueError(
            f"Expected (N, 1, H, W) grayscale images with H, W multiples of 8, got {tuple(images.shape)}."
        )
    pooled = F.adaptive_avg_pool2d(images, 8)
    return ((pooled + 1) / 2 * DIGIT_MAX).clamp(0, DIGIT_MAX).reshape(len(images), 64).numpy()


def _frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to two (N, D) feature sets (`metrics.frechet_distance`)."""
    return frechet_distance(FeatureStatistics.of(features_a), FeatureStatistics.of(features_b))


def _mean_pairwise_distance(points: np.ndarray) -> float:
    diffs = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    return float(diffs.sum() / max(1, len(points) * (len(points) - 1)))


@dataclass
class DigitsMetrics:
    """The metrics of one generated set (see the module docstring)."""

    num_samples: int
    accuracy: float
    worst_class_accuracy: float
    frechet_distance: float
    frechet_floor: float
    c2st_accuracy: float
    memorisation_rate: float
    nearest_train_distance_ratio: float
    diversity_ratio: float

    def as_dict(self) -> dict:
        return asdict(self)


class DigitsReference:
    """Reference models fitted once on the real training digits; `evaluate` scores a generated set."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        train_x, self.train_y, test_x, self.heldout_y = load_digits_split(seed)
        self.train = train_x.reshape(len(train_x), 64)
        self.heldout = test_x.reshape(len(test_x), 64)

    @cached_property
    def classifier(self):
        from sklearn.svm import SVC

        return SVC(C=10, gamma="scale").fit(self.train / DIGIT_MAX, self.train_y)

    @cached_property
    def pca(self):
        from sklearn.decomposition import PCA

        return PCA(n_components=20, random_state=self.seed).fit(self.train / DIGIT_MAX)

    @cached_property
    def nearest_train(self):
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=1).fit(self.train)

    @cached_property
    def heldout_nearest_train_distances(self) -> np.ndarray:
        return self.nearest_train.kneighbors(self.heldout)[0][:, 0]

    def _features(self, images: np.ndarray) -> np.ndarray:
        return self.pca.transform(images / DIGIT_MAX)

    @cached_property
    def frechet_floor(self) -> float:
        """Frechet distance of 100 real training digits per class vs the held-out digits, averaged over 5 draws."""
        rng = np.random.default_rng(self.seed)
        heldout = self._features(self.heldout)
        distances = []
        for _ in range(5):
            picks = np.concatenate(
                [rng.choice(np.flatnonzero(self.train_y == c), 100, replace=False) for c in range(NUM_CLASSES)]
            )
            distances.append(_frechet_distance(self._features(self.train[picks]), heldout))
        return float(np.mean(distances))

    def heldout_accuracy(self) -> float:
        """The classifier's accuracy on the real held-out digits (about 0.99)."""
        return float((self.classifier.predict(self.heldout / DIGIT_MAX) == self.heldout_y).mean())

    def evaluate(self, samples: np.ndarray, labels: np.ndarray) -> DigitsMetrics:
        """
        Args:
            samples: (N, 64) generated digits in [0, 16] (`to_digit_space`).
            labels: (N,) the classes that were requested; every class needs at least 36 samples for c2st.
        """
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.svm import SVC

        samples, labels = np.asarray(samples, dtype=np.float64), np.asarray(labels)
        if samples.ndim != 2 or samples.shape[1] != 64 or len(samples) != len(labels):
            raise ValueError(f"samples must be (N, 64) with one label each, got {samples.shape} and {labels.shape}.")
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        if counts.min() < 36:
            raise ValueError(f"Every class needs at least 36 samples for the two-sample test; got counts {counts}.")

        correct = self.classifier.predict(samples / DIGIT_MAX) == labels
        per_class = [correct[labels == c].mean() for c in range(NUM_CLASSES)]

        rng = np.random.default_rng(self.seed)
        balanced = np.concatenate([rng.choice(np.flatnonzero(labels == c), 36, replace=False) for c in range(10)])
        pooled = np.concatenate([samples[balanced], self.heldout]) / DIGIT_MAX
        is_generated = np.r_[np.ones(len(balanced)), np.zeros(len(self.heldout))]
        folds = StratifiedKFold(5, shuffle=True, random_state=self.seed)
        c2st = cross_val_score(SVC(C=10, gamma="scale"), pooled, is_generated, cv=folds).mean()

        distances = self.nearest_train.kneighbors(samples)[0][:, 0]
        reference = self.heldout_nearest_train_distances
        diversity = [
            _mean_pairwise_distance(samples[labels == c]) / _mean_pairwise_distance(self.heldout[self.heldout_y == c])
            for c in range(NUM_CLASSES)
        ]
        return DigitsMetrics(
            num_samples=len(samples),
            accuracy=float(correct.mean()),
            worst_class_accuracy=float(min(per_class)),
            frechet_distance=_frechet_distance(self._features(samples), self._features(self.heldout)),
            frechet_floor=self.frechet_floor,
            c2st_accuracy=float(c2st),
            memorisation_rate=float((distances < np.percentile(reference, 5)).mean()),
            nearest_train_distance_ratio=float(np.median(distances) / np.median(reference)),
            diversity_ratio=float(np.mean(diversity)),
        )


def check_num_samples(num_samples: int) -> int:
    """Returns `num_samples` if the metrics can use it (every class equally often, enough samples for the per-class
    statistics: a multiple of 10, at least `MIN_SAMPLES`), else raises a `ValueError` saying what to pass."""
    if num_samples % NUM_CLASSES or num_samples < MIN_SAMPLES:
        raise ValueError(
            f"num_samples must be a multiple of {NUM_CLASSES} (every digit equally often) and at least {MIN_SAMPLES}, "
            f"got {num_samples}; e.g. {max(MIN_SAMPLES, -(-num_samples // NUM_CLASSES) * NUM_CLASSES)} (the model "
            "cards use 1000)."
        )
    return num_samples


def check_digits_pipeline(pipe) -> None:
    """Refuses, before any sampling, a pipeline that cannot make digits: it needs 10 classes and 1-channel images."""
    config = pipe.transformer.config
    channels = pipe.vae.config.out_channels if pipe.vae is not None else config.in_channels
    if config.num_classes != NUM_CLASSES or channels != 1:
        raise ValueError(
            f"The digits metrics need a model of the {NUM_CLASSES} digit classes that makes 1-channel (grayscale) "
            f"images; this one has {config.num_classes} classes and makes {channels}-channel images. Evaluate a "
            "digits model (e.g. diffmoe_hf.default_models()['digits-jitmoe'])."
        )


@torch.no_grad()
def evaluate_pipeline(
    pipe,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    reference: DigitsReference | None = None,
    **call_kwargs,
) -> DigitsMetrics:
    """
    Generates `num_samples` digits (classes 0..9 in turn) with a digits pipeline and scores them.

    Args:
        pipe: a `ClassConditionalMoEPipeline` whose transformer makes 1-channel images of the 10 digit classes.
        num_samples: samples in total (a multiple of 10, at least 360).
        seed: seed of the sampling noise (and of the metrics' random draws).
        batch_size: images per pipeline call.
        call_kwargs: forwarded to the pipeline (`num_inference_steps`, `guidance_scale`, ...).
    """
    check_num_samples(num_samples)
    check_digits_pipeline(pipe)
    labels = np.arange(num_samples) % NUM_CLASSES
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = []
    for start in range(0, num_samples, batch_size):
        batch = labels[start : start + batch_size].tolist()
        out = pipe(class_labels=batch, generator=generator, output_type="pt", **call_kwargs).images
        images.append(out.cpu() * 2 - 1)  # back to the model's [-1, 1]
    reference = reference or DigitsReference(seed)
    return reference.evaluate(to_digit_space(torch.cat(images)), labels)
