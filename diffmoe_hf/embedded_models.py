"""Small converted models shipped inside the package, so demos and examples run without a download.

Each embedded model is a folder written by `ClassConditionalMoEPipeline.save_pretrained` (or `diffmoe convert`) under
`diffmoe_hf/data/models/<name>/`, i.e. with a `model_index.json` and safetensors weights; the folder name is the model's
name. `default_models()` lists them; the Gradio Space (`diffmoe_hf.space.app`) serves them when no other model is
configured.
"""

import os
from importlib import resources


EMBEDDED_MODELS_DIR = os.path.join("data", "models")  # relative to the diffmoe_hf package
# listed first when installed: the shipped model that meets all quality targets of its model card
DEFAULT_MODEL = "digits-jitmoe"


def embedded_models_root() -> str:
    """The folder that holds the embedded models (it may not exist)."""
    return os.path.join(str(resources.files("diffmoe_hf")), EMBEDDED_MODELS_DIR)


def default_models() -> dict[str, str]:
    """
    The models embedded in the package, `{name: folder}`: `DEFAULT_MODEL` first (what `diffmoe generate` and the
    Space use without a model argument), then the others sorted by name; empty when none is installed.

    A folder counts only when it holds a `model_index.json`, so half-written or unrelated folders are ignored.
    """
    root = embedded_models_root()
    if not os.path.isdir(root):
        return {}
    models = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            models[name] = folder
    if DEFAULT_MODEL in models:
        models = {DEFAULT_MODEL: models.pop(DEFAULT_MODEL), **models}
    return models
