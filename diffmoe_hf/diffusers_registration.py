"""Makes diffusers' own loaders and cache hooks work with the diffmoe_hf classes.

Together with the package's `__init__`, this is where the package is gathered for diffusers: `register_family`
(`diffmoe_hf.families`) registers each family's model class and transformer blocks here as the family is registered,
and `import diffmoe_hf` registers the pipeline. This module itself imports nothing of the package, so every layer
may call it.

Why this route. Every folder the package writes (converter output, `save_pretrained`, training output, the shipped
models) has `"_class_name": "ClassConditionalMoEPipeline"` in `model_index.json` and names each model component by
its defining module (`["diffmoe_hf.models.transformer_dsmoe", "DSMoETransformer2DModel"]`). diffusers can load such a
folder without remote code in only one way: `DiffusionPipeline.from_pretrained` takes the pipeline class from the
`diffusers` package namespace (`getattr(diffusers, _class_name)`), and for a Hub repo id its `download` accepts a
component library only if it is a key of `LOADABLE_CLASSES` (or a `diffusers.pipelines` sub-module). The other
routes diffusers offers are worse: a `custom_pipeline` / `_class_name` list makes every loader pass
`trust_remote_code=True` (the opt-in `remote_code` Hub layout keeps that route), and rewriting `model_index.json`
to the short library name `"diffmoe_hf"` would still need the same `LOADABLE_CLASSES` entry while breaking every folder
written so far. So this module adds, and never replaces:

- the pipeline and model classes as attributes of the `diffusers` package, under their own names (the lookup of
  `_class_name` for pipelines, and of a bare `config.json`'s `_class_name` by `diffusers.AutoModel`), never over a
  class of diffusers' own;
- each model's defining module as a `LOADABLE_CLASSES` library whose classes load with `from_pretrained` (only the
  Hub download check reads it; `save_pretrained` keeps recording the full module path, so folders do not change);
- the transformer block classes to the registry the cache hooks (FirstBlockCache, MagCache) read block outputs from.

These are lookups diffusers does not document as extension points; `tests/test_diffusers_loading.py` guards each of
them on the lowest and the highest diffusers version the package declares.
"""

import warnings

import diffusers
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.pipelines import pipeline_loading_utils


MODEL_LOAD_METHODS = {"ModelMixin": ["save_pretrained", "from_pretrained"]}


def register_classes_in_diffusers_namespace(classes) -> None:
    """
    Makes `getattr(diffusers, cls.__name__)` return each class of `classes`. A name diffusers itself already uses for
    another class is left to diffusers, with a warning: `DiffusionPipeline.from_pretrained` would then load diffusers'
    class, so such a folder must be loaded with diffmoe_hf's class (`cls.from_pretrained`).
    """
    for cls in classes:
        existing = getattr(diffusers, cls.__name__, None)
        if existing is not None and existing is not cls:
            warnings.warn(
                f"diffusers {diffusers.__version__} defines its own {cls.__name__} ({existing.__module__}), so "
                f"DiffusionPipeline.from_pretrained / AutoModel would load that class, not diffmoe_hf's "
                f"{cls.__module__}.{cls.__name__}: load diffmoe_hf folders with `{cls.__name__}.from_pretrained` from "
                "diffmoe_hf.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        setattr(diffusers, cls.__name__, cls)


def register_model_libraries(model_classes) -> None:
    """Adds each model class's defining module to diffusers' `LOADABLE_CLASSES` (loaded with `from_pretrained`)."""
    for cls in model_classes:
        pipeline_loading_utils.LOADABLE_CLASSES.setdefault(cls.__module__, dict(MODEL_LOAD_METHODS))


def register_transformer_blocks(block_classes) -> None:
    """
    Registers blocks whose forward is `block(hidden_states, ...) -> hidden_states` (one tensor, no
    `encoder_hidden_states`) with the registry of diffusers' block-level cache hooks.
    """
    for cls in block_classes:
        TransformerBlockRegistry.register(
            model_class=cls,
            metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
        )


def with_subclasses(cls: type) -> list[type]:
    """`cls` and every subclass of it defined so far (the cache registry matches exact classes, not subclasses)."""
    return [cls, *(sub for child in cls.__subclasses__() for sub in with_subclasses(child))]


def register_model_classes(model_classes) -> None:
    """The model classes in the `diffusers` namespace and their modules as `LOADABLE_CLASSES` libraries."""
    register_classes_in_diffusers_namespace(model_classes)
    register_model_libraries(model_classes)
