"""The digits metrics reproduce their reference points (../shared/specs/demo-digits.md)."""

import numpy as np
import pytest
import torch

from diffmoe_hf.evaluation import DigitsReference, to_digit_space


@pytest.fixture(scope="module")
def reference():
    return DigitsReference(seed=0)


def _per_class(reference, rng, count=100):
    return np.concatenate([rng.permutation(np.flatnonzero(reference.train_y == c))[:count] for c in range(10)])


def test_split_classifier_and_floor(reference):
    assert (len(reference.train), len(reference.heldout)) == (1437, 360)
    assert reference.heldout_accuracy() > 0.98
    assert 0.04 < reference.frechet_floor < 0.07


def test_replaying_training_images_is_caught_by_memorisation(reference):
    picks = _per_class(reference, np.random.default_rng(1))
    metrics = reference.evaluate(reference.train[picks], reference.train_y[picks])
    assert metrics.accuracy == 1.0 and metrics.frechet_distance < 0.1 and metrics.c2st_accuracy < 0.6
    assert metrics.memorisation_rate == 1.0 and metrics.nearest_train_distance_ratio == 0.0


def test_blurred_digits_score_worse_than_real_ones(reference):
    rng = np.random.default_rng(2)
    first, second = _per_class(reference, rng), _per_class(reference, rng)
    averaged = (reference.train[first] + reference.train[second]) / 2
    metrics = reference.evaluate(averaged, reference.train_y[first])
    assert metrics.frechet_distance > 2 * metrics.frechet_floor and metrics.c2st_accuracy > 0.75
    assert metrics.memorisation_rate < 0.3 and metrics.diversity_ratio < 0.8


def test_generated_images_are_pooled_back_to_digit_space():
    image = torch.full((1, 1, 16, 16), -1.0)
    image[..., :8, :8] = 1.0
    digit = to_digit_space(image).reshape(8, 8)
    assert digit[:4, :4].min() == 16 and digit[4:, 4:].max() == 0
    with pytest.raises(ValueError, match="multiples of 8"):
        to_digit_space(torch.zeros(2, 1, 12, 12))


def test_too_few_samples_per_class_is_refused(reference):
    with pytest.raises(ValueError, match="at least 36 samples"):
        reference.evaluate(reference.train[:100], reference.train_y[:100])
