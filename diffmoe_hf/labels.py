"""Class names shipped with the package."""

import json
from functools import cache
from importlib import resources


@cache
def imagenet_id2label() -> dict[str, str]:
    """The 1000 ImageNet-1k class names, `{"0": "tench, Tinca tinca", ...}` (comma-separated synonyms, in the order of
    the standard class ids; from the WordNet lemmas that timm ships, the same names as the Hub's label files)."""
    with resources.files("diffmoe_hf").joinpath("data", "imagenet_id2label.json").open(encoding="utf-8") as f:
        return json.load(f)
