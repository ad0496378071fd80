"""Published sampling and evaluation settings of the released checkpoints, and their record in converted folders.

A converted folder may hold `published_settings.json`: the sampler settings the model's authors used for their reported
FID / IS and how they measured it. `diffmoe sample` uses them as its defaults (anything given on the command line
wins).
"""

import json
import os

SETTINGS_FILE = "published_settings.json"


def read_folder_settings(model: str) -> dict | None:
    """
    The published settings recorded in a converted folder (or a Hub repo already in the local cache), or `None`.

    Args:
        model: A local folder or a Hub repo id.
    """
    path = os.path.join(model, SETTINGS_FILE)
    if not os.path.isdir(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, SETTINGS_FILE)
        path = cached if isinstance(cached, str) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["sampling"]
