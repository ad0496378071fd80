"""Evaluation behind `diffmoe evaluate-digits`, `diffmoe sample` and `diffmoe evaluate` (FID, sFID, IS, precision,
recall). Part of the core: it works on a pipeline it is given and never loads one; the commands' front-ends are in
`diffmoe_hf.cli` and `diffmoe_hf.cli_evaluation`."""

from .digits import DigitsMetrics, DigitsReference, evaluate_pipeline, load_digits_split, to_digit_space
