"""Evaluation: `diffmoe evaluate-digits`, `diffmoe sample` and `diffmoe evaluate` (FID, sFID, IS, precision, recall)."""

from .digits import DigitsMetrics, DigitsReference, evaluate_pipeline, load_digits_split, to_digit_space
