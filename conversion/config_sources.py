"""How converters gather a model's configuration from its sources, and the one reader of config files.

The sources: the training `args` a checkpoint records, a config file (`read_config_file`: the training yaml, or the
original constructor arguments as YAML or JSON), a preset name, and the user's options; then the weights, which fix
most sizes. A family whose checkpoints do not record the architecture takes it from exactly one of the config file and
the preset (`require_config_or_preset`); the families whose architecture can be pieced together (DiT-MoE, Diff-MoE of
Cheng et al.) collect every source into `SourcedSettings`, which keeps, for every field, the source that gave it, so
that a contradiction (between two sources, or with the weights) names where each value came from.
"""

import json

import yaml

from .checkpoint_io import CheckpointError


class SourcedSettings(dict):
    """Configuration fields (in the original code's names), each remembering its source in `origin[key]`."""

    def __init__(self):
        super().__init__()
        self.origin: dict[str, str] = {}

    def put(self, key: str, value, origin: str, override: bool = False) -> None:
        """
        Sets `key` from the source `origin`. A different value for a field already set is an error
        (`Contradicting options: ...`) unless `override`, when the later source wins.
        """
        if key in self and self[key] != value and not override:
            raise CheckpointError(f"Contradicting options: {self.describe(key)} but {key}={value!r} ({origin}).")
        if override or key not in self:
            self[key], self.origin[key] = value, origin

    def put_all(self, values: dict, origin: str, override: bool = False) -> None:
        """`put` of every item of `values`, all from the source `origin`."""
        for key, value in values.items():
            self.put(key, value, origin, override)

    def merge(self, other: "SourcedSettings", override: bool = False) -> None:
        """`put` of every field of `other` with its own source."""
        for key, value in other.items():
            self.put(key, value, other.origin[key], override)

    def describe(self, key: str) -> str:
        """`key=value (source)`, for messages."""
        return f"{key}={self[key]!r} ({self.origin[key]})"


def read_config_file(path: str, what: str) -> dict:
    """
    The mapping a YAML or JSON config file holds (JSON for a `.json` name, YAML otherwise).

    Args:
        path: The file.
        what: What the file should hold, for messages (e.g. `"DiT-MoE constructor arguments"`).

    Raises:
        CheckpointError: when the file cannot be read or parsed, or holds something other than a mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"Could not read the {what} from {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a mapping of {what}, not a {type(data).__name__}.")
    return data


def constructor_kwargs(record: dict, path: str, what: str) -> dict:
    """
    The constructor arguments of a config file's mapping: the mapping itself, or its `kwargs` mapping (a construction
    record) with the record's top-level `formulation` and `rf` added.
    """
    if "kwargs" not in record:
        return dict(record)
    if not isinstance(record["kwargs"], dict):
        raise CheckpointError(f"{path}: `kwargs` must be a mapping of {what}.")
    return {**record["kwargs"], **{key: record[key] for key in ("formulation", "rf") if key in record}}


def dit_constructor_arguments(preset: dict) -> dict:
    """The DiT skeleton of a preset (this package's config names) in the original `DiT(**kwargs)` names."""
    return dict(
        depth=preset["num_layers"],
        hidden_size=preset["num_attention_heads"] * preset["attention_head_dim"],
        num_heads=preset["num_attention_heads"],
        patch_size=preset["patch_size"],
    )


def require_config_or_preset(config_path: str | None, preset: str | None, config_name: str) -> None:
    """Refuses a config file and a preset given together (`config_name`: how messages name the config file)."""
    if config_path is not None and preset is not None:
        raise CheckpointError(f"Pass either {config_name} (--config) or a preset (--preset), not both.")
