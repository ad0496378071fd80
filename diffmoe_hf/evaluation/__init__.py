"""Evaluation tooling (`diffmoe evaluate-digits`)."""

from .digits import DigitsMetrics, DigitsReference, evaluate_pipeline, load_digits_split, to_digit_space
