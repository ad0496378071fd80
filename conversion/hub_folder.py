"""Writing a converted pipeline as a Hub-ready folder: all-or-nothing, optional remote-code layout, model card, push."""

import json
import os
import re
import shutil
import tempfile

from diffmoe_hf.atomic_files import apply_umask


HUB_LAYOUTS = ("package", "remote_code")
# the shard sizes `save_pretrained` (huggingface_hub's parse_size_to_int) reads: a number and a decimal unit
_SHARD_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*", re.IGNORECASE)


_UNIT_BYTES = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def shard_size_bytes(max_shard_size: str | int) -> int:
    """
    The bytes of a `max_shard_size` as `save_pretrained` reads it: a whole number of bytes or a number with a
    decimal unit, e.g. `"5GB"`, `"500MB"`, `"1.5GB"`; anything else, or a size that is not positive, is refused.
    """
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    match = _SHARD_SIZE.fullmatch(max_shard_size) if isinstance(max_shard_size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"--max-shard-size {max_shard_size!r} is not a size: give a positive number with a unit KB, MB, GB or "
            "TB, e.g. 5GB, 500MB or 1.5GB."
        )
    return int(float(match.group(1)) * _UNIT_BYTES[match.group(2).upper()])


def check_shard_size(max_shard_size: str | int) -> None:
    """Refuses a `max_shard_size` that `save_pretrained` cannot read (`shard_size_bytes`), before any work is done."""
    shard_size_bytes(max_shard_size)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an existing non-empty output folder unless `overwrite`, and a place where the folder cannot be created
    (checked before any work is done)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass --overwrite to replace it.")
    existing = os.path.dirname(os.path.abspath(output_dir))  # created when missing: its closest existing ancestor
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"Cannot create {output_dir}: {existing} is a file. Choose another --output.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.write-check-", dir=existing))
    except OSError as err:
        raise PermissionError(
            f"Cannot create {output_dir}: the folder {existing} does not accept new folders ({err.strerror}). "
            "Choose another --output."
        ) from None


def apply_hub_layout(folder: str, layout: str) -> None:
    """
    `"package"` (default): `model_index.json` names the installed `diffmoe_hf` modules; load with
    `ClassConditionalMoEPipeline.from_pretrained`. `"remote_code"`: adds one-line shim modules and points
    `model_index.json` at them, so `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` works too (every
    loader then needs `trust_remote_code=True`; pin a `revision`).
    """
    if layout not in HUB_LAYOUTS:
        raise ValueError(f"hub layout must be one of {HUB_LAYOUTS}, got {layout!r}.")
    if layout == "package":
        return
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    shims = {".": (index["_class_name"], "diffmoe_hf.pipelines")}
    for component, value in index.items():
        if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("diffmoe_hf"):
            shims[component] = (value[1], value[0])
    for component, (class_name, module_path) in shims.items():
        shim_name = module_path.rsplit(".", 1)[-1] if component != "." else "pipeline_class_conditional_moe"
        with open(os.path.join(folder, component, f"{shim_name}.py"), "w", encoding="utf-8") as f:
            f.write(f"from {module_path} import {class_name}  # noqa: F401  (needs `pip install diffmoe-hf`)\n")
        if component == ".":
            index["_class_name"] = [shim_name, class_name]
        else:
            index[component] = [shim_name, class_name]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


# Hidden siblings of an output folder while it is written: `.NAME.partial-PID-*` (the folder being built),
# `.NAME.previous-PID-*` (the replaced folder, intact, during an --overwrite swap) and `.NAME.removing-PID-*` (the
# replaced folder once the new one is in place, being deleted). PID is the writing process on this machine.
SIBLING_KINDS = ("partial", "previous", "removing")


def _sibling(output_dir: str, kind: str) -> str:
    """A new, empty hidden sibling folder of `output_dir` for this process."""
    prefix = f".{os.path.basename(output_dir)}.{kind}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(output_dir)))


def _writer_is_running(pid: str) -> bool:
    """Whether the process `pid` (another one than this) still runs on this machine."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def recover_interrupted_save(output_dir: str) -> list[str]:
    """
    Finishes what an interrupted `save_folder_atomically` into `output_dir` left behind (SIGKILL, power loss, Ctrl-C
    in the wrong moment): a replaced folder whose replacement never arrived is moved back to `output_dir`, and the
    leftover hidden siblings (half-built or half-deleted folders) are removed. Siblings of a writer that still runs
    are left alone.

    Returns:
        One sentence per action, for the user.
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    if not os.path.isdir(parent):
        return []
    base = os.path.basename(output_dir)
    found = {kind: [] for kind in SIBLING_KINDS}
    for name in os.listdir(parent):
        for kind in SIBLING_KINDS:
            prefix = f".{base}.{kind}-"
            if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
                found[kind].append((name[len(prefix) :].split("-", 1)[0], os.path.join(parent, name)))
    actions = []
    previous = [path for pid, path in found["previous"] if not _writer_is_running(pid)]
    if previous and not os.path.lexists(output_dir):
        newest = max(previous, key=os.path.getmtime)
        os.replace(newest, output_dir)
        previous.remove(newest)
        actions.append(f"Restored {output_dir} from {newest}, where an interrupted --overwrite had moved it.")
    for pid, path in found["partial"] + found["removing"] + [("", path) for path in previous]:
        if _writer_is_running(pid):
            actions.append(f"Left {path} alone: the conversion that writes it (process {pid}) is still running.")
            continue
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"Removed {path}, left behind by an interrupted conversion.")
    return actions


def save_folder_atomically(
    pipeline, output_dir: str, overwrite: bool, max_shard_size: str, extra_files: dict, hub_layout: str = "package"
) -> None:
    """
    Saves `pipeline` (safetensors, sharded at `max_shard_size`) plus `extra_files` (`{relative path: text}`) into a
    hidden sibling folder and moves it to `output_dir` only once complete; a failure leaves no partial folder and an
    existing `output_dir` (with `overwrite`) is replaced only at the very end (moved aside, the new folder moved in,
    the old one deleted). Files get the permissions the umask gives. Whatever a killed run leaves behind is cleaned
    up by the next one (`recover_interrupted_save`).
    """
    check_output_dir(output_dir, overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    staging, previous = _sibling(output_dir, "partial"), None
    try:
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        for relative_path, text in extra_files.items():
            with open(os.path.join(staging, relative_path), "w", encoding="utf-8") as f:
                f.write(text)
        apply_hub_layout(staging, hub_layout)
        apply_umask(staging)
        if os.path.isdir(output_dir):
            previous = _sibling(output_dir, "previous")
            os.rmdir(previous)
            os.replace(output_dir, previous)
            os.replace(staging, output_dir)
            removing = _sibling(output_dir, "removing")
            os.rmdir(removing)
            os.replace(previous, removing)
            shutil.rmtree(removing, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None and os.path.isdir(previous) and not os.path.lexists(output_dir):
            os.replace(previous, output_dir)  # interrupted between the two moves: put the old folder back
        raise


def push_folder_to_hub(folder: str, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Creates `repo_id` if needed and uploads `folder`; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message="Upload converted model")
    return getattr(info, "commit_url", str(info))
