"""Reading original research checkpoints safely.

Training scripts of the ported repos save `{"model", "ema", "opt", "args"}` dicts (DiT style), dicts without `opt`
(FSDP), JiT's `{"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args"}`, release files `{"ema": ...}`, or
bare state dicts; some hold `argparse.Namespace` and omegaconf objects. Everything is read with
`torch.load(weights_only=True)`: `argparse.Namespace` and inert stand-ins for the omegaconf classes are allow-listed
(so omegaconf need not be installed and no code from the file runs); anything else is refused unless the caller opts
in with `trust_checkpoint=True`.
"""

import argparse
import collections
import os
import pickle
import re
import typing
import zipfile
from dataclasses import dataclass, field

import torch


# where each loader looks for weights, by preference
WEIGHT_KEYS = {
    "ema": ("ema", "model_ema1", "model_ema", "state_dict_ema"),
    "model": ("model", "state_dict", "module"),
}
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "net.")
_OMEGACONF_CLASSES = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
)


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or one that does not match the requested architecture."""


class _InertObject:
    """Placeholder for an allow-listed class whose behaviour we never need (omegaconf containers in optimizer
    state): it accepts any constructor arguments and pickled state, and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_pickled_state"] = state


def _inert_class(qualified_name: str) -> type:
    module, name = qualified_name.rsplit(".", 1)
    return type(name, (_InertObject,), {"__module__": module, "__qualname__": name})


def _safe_globals() -> list:
    inert = [(_inert_class(name), name) for name in _OMEGACONF_CLASSES]
    return [
        argparse.Namespace,
        collections.defaultdict,
        collections.OrderedDict,
        (typing.Any, "typing.Any"),
        dict,
        list,
        int,
        float,
        str,
        tuple,
        set,
        bool,
    ] + inert


@dataclass
class LoadedCheckpoint:
    """
    Attributes:
        state_dict: the selected weights, wrapper prefixes stripped.
        source: where they came from (`"ema"`, `"model_ema1"`, `"model"`, or `"state_dict"` for a bare dict).
        layout: `"training-dict"` (dict of state dicts), `"bare-state-dict"` or `"safetensors"`.
        args: the training `args` (an `argparse.Namespace`) when the file has them.
        top_level_keys: keys of the loaded object when it was a training dict.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    layout: str
    args: argparse.Namespace | None = None
    top_level_keys: list[str] = field(default_factory=list)


class _GlobalReference(Exception):
    """Raised by `_FirstObjectReader` at the first class or function the pickle names."""


class _FirstObjectReader(pickle.Unpickler):
    """Reads the first pickled object of a file without resolving any class or function (so nothing can run)."""

    def find_class(self, module, name):
        raise _GlobalReference(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _GlobalReference("persistent id")


def _is_plain_pickle(path: str) -> bool:
    """
    Whether `path` (not a zip archive) was written with `pickle.dump` rather than `torch.save`: the legacy torch.save
    format starts with the pickled `torch.serialization.MAGIC_NUMBER`, a plain pickle with the object itself (a
    container, or a reference to a class such as the tensors' rebuild function).
    """
    try:
        with open(path, "rb") as f:
            first = _FirstObjectReader(f).load()
    except _GlobalReference:
        return True
    except Exception:  # not a pickle at all
        return False
    return first != torch.serialization.MAGIC_NUMBER and isinstance(first, (dict, list, tuple))


def _torch_load(path: str, trust_checkpoint: bool, mmap: bool = False):
    if not zipfile.is_zipfile(path):
        mmap = False  # only the zip format (torch >= 1.6 default) can be memory-mapped
        if _is_plain_pickle(path):
            raise CheckpointError(
                f"{path} is a plain Python pickle (written with pickle.dump, not torch.save), a format the converter "
                "does not read: unpickling it runs whatever code it names, and torch.load(weights_only=True), the "
                "safe reader, only reads torch.save files. If you trust the file, re-save its weights in Python, "
                "e.g. `torch.save(pickle.load(open(PATH, 'rb')), 'checkpoint.pt')` (or safetensors' save_file for a "
                "dict of tensors), and convert that file."
            )
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(path, err)
        if not refused:
            raise _not_a_checkpoint(path) from None
        raise CheckpointError(
            f"{path} contains Python objects that are not safe to unpickle ({', '.join(refused)}). "
            "If you trust the file, pass --trust-checkpoint (trust_checkpoint=True) to load it with "
            "weights_only=False."
        ) from None
    except Exception:  # random or truncated bytes fail anywhere in the unpickler (EOFError, KeyError, ...)
        raise _not_a_checkpoint(path) from None


def _refused_globals(path: str, err: pickle.UnpicklingError) -> list[str]:
    """The classes / functions outside the allow-list that made the restricted unpickler refuse `path` (empty when
    it refused the bytes themselves, i.e. the file is not a pickle)."""
    allowed = {
        entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
        for entry in _safe_globals()
    }
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a zip archive that torch.save did not write
            return []
    else:  # the legacy (pre-zip) format: torch names the first refused global in its message
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return sorted(name for name in names if name not in allowed)


def _not_a_checkpoint(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint: it is neither a torch.save file nor a pickle of tensors, or it is "
        "damaged or incomplete. Check the path, and that the download or copy of the file finished."
    )


CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _folder_not_checkpoint(path: str) -> CheckpointError:
    """The error for a folder given as the checkpoint: a converted folder, or one holding checkpoint files."""
    if os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(os.path.join(path, "config.json")):
        return CheckpointError(
            f"{path} is a converted diffusers folder, not an original checkpoint: it needs no conversion; load it with "
            "ClassConditionalMoEPipeline.from_pretrained or `diffmoe generate --model`."
        )
    found = sorted(name for name in os.listdir(path) if name.endswith(CHECKPOINT_EXTENSIONS))
    hint = f"; it holds {', '.join(found[:5])}" + (" ..." if len(found) > 5 else "") if found else ""
    return CheckpointError(f"{path} is a folder: give the checkpoint file inside it (--checkpoint FILE){hint}.")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes DDP/FSDP/compile/denoiser prefixes (`module.`, `_fsdp_wrapped_module.`, `_orig_mod.`, `net.`)."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
            key = key.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
        if key in stripped:
            raise CheckpointError(f"Two tensors map to {key!r} after removing wrapper prefixes.")
        stripped[key] = value
    return stripped


def load_original_checkpoint(
    path: str, weights: str = "ema", trust_checkpoint: bool = False, mmap: bool = False
) -> LoadedCheckpoint:
    """
    Loads an original checkpoint and picks its weights.

    Args:
        path: `.pt`/`.pth`/`.bin` written by `torch.save`, or `.safetensors`.
        weights: `"ema"` (default: what the original samplers use; JiT's `model_ema1`) or `"model"` (raw weights).
        trust_checkpoint: Allow arbitrary pickled objects (`weights_only=False`). Only for files you trust.
        mmap: Memory-map the tensors of a `torch.save` file instead of reading them all (pages are read on use, so
            the unused `model`/`opt` entries of a training dict cost no memory).
    """
    path = os.fspath(path)
    if weights not in WEIGHT_KEYS:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}.")
    if os.path.isdir(path):
        raise _folder_not_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state_dict = load_file(path)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}).") from None
        return LoadedCheckpoint(strip_wrapper_prefixes(state_dict), "state_dict", "safetensors")

    obj = _torch_load(path, trust_checkpoint, mmap)
    if _is_state_dict(obj):
        return LoadedCheckpoint(strip_wrapper_prefixes(obj), "state_dict", "bare-state-dict")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint dict.")
    args = obj.get("args") if isinstance(obj.get("args"), argparse.Namespace) else None
    for key in WEIGHT_KEYS[weights]:
        if _is_state_dict(obj.get(key)):
            return LoadedCheckpoint(strip_wrapper_prefixes(obj[key]), key, "training-dict", args, sorted(obj))
    found = [k for k, v in obj.items() if _is_state_dict(v)]
    raise CheckpointError(
        f"{path} has no {weights!r} weights (looked for {', '.join(WEIGHT_KEYS[weights])}); "
        f"its top-level keys are {sorted(obj)}"
        + (
            f" and it has weights under {found}: pass weights='model' / --weights model for raw weights."
            if found
            else "."
        )
    )
