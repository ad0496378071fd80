"""Tiny pipelines of every registered family for the pipeline contract, loading and cache tests (CPU, seconds)."""

import torch

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.families import FAMILIES
from diffmoe_hf.formulations import get_formulation

from .helpers import randomize_weights, tiny_vae
from .training_helpers import NUM_CLASSES, tiny_transformer


def per_token_routing_families() -> list[str]:
    """The families whose experts route each token on its own, so a sample does not depend on the rest of its
    batch (`routing_depends_on_batch` is False)."""
    return [family.id for family in FAMILIES.values() if not family.model_class.routing_depends_on_batch]


def family_transformer(family: str, **overrides):
    """A tiny transformer of `family` (config `overrides` applied) with random weights (`randomize_weights`), so
    every block matters."""
    transformer = tiny_transformer(family).eval()
    if overrides:
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        transformer = type(transformer)(**{**config, **overrides}).eval()
    return randomize_weights(transformer, seed=1)


def family_pipeline(family: str, **transformer_overrides) -> ClassConditionalMoEPipeline:
    transformer = family_transformer(family, **transformer_overrides)
    pipe = ClassConditionalMoEPipeline(
        transformer=transformer,
        scheduler=get_formulation(transformer.config.formulation).default_scheduler(),
        vae=tiny_vae() if transformer.config.in_channels == 4 else None,
        id2label={str(i): f"class {i}" for i in range(NUM_CLASSES)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CallRecorder(torch.nn.Module):
    """Wraps a transformer and records the class labels of every call (the batch composition of each pass)."""

    def __init__(self, transformer):
        super().__init__()
        self.inner = transformer
        self.calls = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, hidden_states, timestep, class_labels, **kwargs):
        self.calls.append(class_labels.tolist())
        return self.inner(hidden_states, timestep, class_labels, **kwargs)
