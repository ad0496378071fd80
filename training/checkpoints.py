"""Training checkpoints that survive a kill at any moment (SIGKILL, power loss, preemption).

A checkpoint is written into `checkpoint-<step>.tmp`, every file and folder is flushed to disk, a marker
`checkpoint_complete.json` listing every file and its size is written last, and the folder is renamed to
`checkpoint-<step>` in one step. Old checkpoints are pruned only after that rename. So:

- a `checkpoint-<step>` folder either is complete or was damaged afterwards (a file missing or of another size than
  its marker lists), which `find_complete_checkpoint` detects;
- `checkpoint-<step>.tmp` (being written) and `checkpoint-<step>.deleting` (being pruned) folders are leftovers of an
  interrupted run; `remove_incomplete_checkpoints` deletes them when the next run starts.
"""

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator

from accelerate.logging import get_logger

from diffmoe_hf.atomic_files import apply_umask, fsync_path
from diffmoe_hf.parallel import unsharded_class


COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
LEFTOVER_NAME = re.compile(r"checkpoint-\d+\.(tmp|deleting)")
FINAL_STAGING = ".final.tmp"  # the final pipeline or LoRA weights being written (`staged_final_output`)

logger = get_logger(__name__)


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the `checkpoint-<step>` folders in `output_dir`, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    matches = (CHECKPOINT_NAME.fullmatch(name) for name in os.listdir(output_dir))
    return sorted(int(m.group(1)) for m in matches if m and os.path.isdir(os.path.join(output_dir, m.group(0))))


def why_incomplete(path: str) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not (for messages)."""
    marker = os.path.join(path, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return f"it has no {COMPLETE_MARKER} (its writing was interrupted)"
    try:
        with open(marker, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"its {COMPLETE_MARKER} is unreadable ({error})"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes instead of {size}"
    return None


def read_marker(path: str) -> dict:
    """The marker of a complete checkpoint: `{"step", "num_processes", "files": {name: size}}`."""
    with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f)


def find_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-<step>` in `output_dir` (None if there is none); logs every folder it skips."""
    if not os.path.isdir(output_dir):
        return None
    for name in sorted(os.listdir(output_dir)):
        if name.startswith("checkpoint-") and not CHECKPOINT_NAME.fullmatch(name):
            logger.warning(f"Ignoring {os.path.join(output_dir, name)}: not a checkpoint-<step> folder.")
    for step in reversed(checkpoint_steps(output_dir)):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        reason = why_incomplete(path)
        if reason is None:
            return path
        logger.warning(f"Skipping {path}: {reason}.")
    return None


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str | None:
    """
    The checkpoint to resume from. "latest": the newest complete checkpoint of `output_dir`, or None when there is none
    (a new run). Otherwise a path, or a folder name inside `output_dir`, which must be a complete checkpoint.

    Raises:
        `ValueError` naming the path when it does not exist or is not a complete checkpoint.
    """
    if resume_from_checkpoint == "latest":
        return find_complete_checkpoint(output_dir)
    candidates = [resume_from_checkpoint]
    if not os.path.isabs(resume_from_checkpoint):
        candidates.append(os.path.join(output_dir, resume_from_checkpoint))
    path = next((c for c in candidates if os.path.isdir(c)), None)
    if path is None:
        available = ", ".join(f"checkpoint-{s}" for s in checkpoint_steps(output_dir)) or "none"
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder (looked for "
            f"{' and '.join(candidates)}). Checkpoints in {output_dir}: {available}. Give an existing checkpoint "
            "folder, 'latest', or leave the option out to start a new run."
        )
    reason = why_incomplete(path)
    if reason is not None:
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint: {reason}. Resume from another checkpoint "
            "('latest' picks the newest complete one)."
        )
    return path


def remove_incomplete_checkpoints(output_dir: str) -> None:
    """Deletes the `.tmp` / `.deleting` checkpoint folders and the final-output staging folder an interrupted run left
    in `output_dir` (main process)."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if LEFTOVER_NAME.fullmatch(name) or name == FINAL_STAGING:
            logger.warning(f"Removing {os.path.join(output_dir, name)}, left incomplete by an interrupted run.")
            shutil.rmtree(os.path.join(output_dir, name))


@contextlib.contextmanager
def staged_final_output(output_dir: str) -> Iterator[str]:
    """
    Yields `output_dir/.final.tmp` for the run's final files (pipeline folders or LoRA weights); when the block
    finishes, flushes them to disk and moves each into `output_dir`, replacing an entry of the same name. Interrupted
    or failing while writing, it removes the staging folder: `output_dir` never holds a half-written weights file,
    only whole files of this run or of the one before.
    """
    staging = os.path.join(output_dir, FINAL_STAGING)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        yield staging
        apply_umask(staging)
        for root, _, names in os.walk(staging):
            for name in names:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in sorted(os.listdir(staging)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            _remove(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
    fsync_path(output_dir)


def _remove(path: str) -> None:
    """Renames `path` to `<path>.deleting` (a name no resume picks) before deleting it, so a kill leaves no half."""
    doomed = path + ".deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


# the options that decide which tensors a run trains and keeps, so whether a checkpoint's weights, optimizer state and
# EMA fit it
TRAINED_TENSOR_OPTIONS = ("use_lora", "rank", "lora_layers", "lora_expert_parts", "routers", "use_ema")


def model_record(model, args) -> dict:
    """
    What a checkpoint must match to be resumed by a run: the transformer's class and config (after any change the run
    made, e.g. new classes), the options that decide which tensors are trained and kept (`TRAINED_TENSOR_OPTIONS`),
    and the layout of its weights (`"expert_parallel"`: per-rank files keyed by global names, which load at any
    `--expert_parallel_size`; else `"accelerate"`), in the JSON form the marker stores.
    """
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    options = {name: getattr(args, name, None) for name in TRAINED_TENSOR_OPTIONS}
    layout = "accelerate" if getattr(args, "expert_parallel_size", None) is None else "expert_parallel"
    record = {"class": unsharded_class(model).__name__, "config": config, "options": options, "layout": layout}
    return json.loads(json.dumps(record))


def why_model_differs(path: str, record: dict) -> str | None:
    """None when the complete checkpoint `path` was written by a run of the model and options `record` describes
    (`model_record`), else what differs, in words (for messages)."""
    saved = read_marker(path).get("model")
    if saved is None:
        return f"its {COMPLETE_MARKER} records no model"
    if saved["class"] != record["class"]:
        return f"it holds a {saved['class']}, this run trains a {record['class']}"
    layout = saved.get("layout")
    if layout == "expert_parallel" and record["layout"] != layout:
        return (
            "it was saved with --expert_parallel_size (its weights are per-rank files in expert_parallel/), so "
            "resume it with --expert_parallel_size (any size that fits, 1 included)"
        )
    if record["layout"] == "expert_parallel" and layout != record["layout"]:
        return (
            "it was not saved with --expert_parallel_size, so it cannot be resharded: resume it without the option, "
            "or start from its exported folder with --pretrained_model_name_or_path"
        )
    if layout is None:
        return f"its {COMPLETE_MARKER} records no weights layout (an earlier version of this script wrote it)"
    differences = [
        f"{label}{name} {saved[kind].get(name)!r} there, {record[kind].get(name)!r} here"
        for kind, label in (("config", "config "), ("options", "--"))
        for name in sorted(set(saved[kind]) | set(record[kind]))
        if saved[kind].get(name) != record[kind].get(name)
    ]
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        return f"it was written by a run of another model or options ({shown})"
    return None


def save_checkpoint(
    accelerator, output_dir: str, step: int, total_limit: int | None = None, record: dict | None = None
) -> str:
    """
    Saves `accelerator.save_state` as `output_dir/checkpoint-<step>`, atomically, then prunes the oldest complete
    checkpoints so that at most `total_limit` remain. Every process must call it (each saves its own RNG state).

    Args:
        record: the run's `model_record`, kept in the marker so that a resume by another model or with other trained
            tensors is refused before loading (`why_model_differs`).

    Returns:
        The path of the new checkpoint.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_umask(partial)
        files = {}
        for root, _, names in os.walk(partial):
            for name in names:
                path = os.path.join(root, name)
                fsync_path(path)
                files[os.path.relpath(path, partial).replace(os.sep, "/")] = os.path.getsize(path)
            fsync_path(root)
        marker = {"step": step, "num_processes": accelerator.num_processes, "files": files, "model": record}
        with open(os.path.join(partial, COMPLETE_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(partial)
        replaced = None
        if os.path.exists(final):  # a run resumed from an earlier step replaces the later checkpoints it remakes
            replaced = final + ".deleting"
            os.replace(final, replaced)
        os.replace(partial, final)
        fsync_path(output_dir)
        if replaced is not None:
            shutil.rmtree(replaced)
        logger.info(f"Saved state to {final}")
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str, total_limit: int) -> None:
    """Deletes the oldest complete checkpoints beyond the `total_limit` newest (incomplete ones are left alone)."""
    complete = [
        step
        for step in checkpoint_steps(output_dir)
        if why_incomplete(os.path.join(output_dir, f"checkpoint-{step}")) is None
    ]
    removing = complete[: max(len(complete) - total_limit, 0)]
    if removing:
        logger.info(f"Removing {len(removing)} old checkpoints: {', '.join(f'checkpoint-{s}' for s in removing)}")
    for step in removing:
        _remove(os.path.join(output_dir, f"checkpoint-{step}"))


def why_random_state_unrestorable(path: str, process_index: int, num_processes: int, device_type: str) -> str | None:
    """
    None when process `process_index` of `num_processes` (on a `device_type` device: "cpu", "cuda", ...) can restore
    its random state from the complete checkpoint `path` exactly as it was saved, else the reason it cannot (for
    messages). `accelerator.load_state` itself only logs at INFO level when it cannot.
    """
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    saved_processes = read_marker(path)["num_processes"]
    if saved_processes != num_processes:
        return f"it was saved by {saved_processes} processes and is resumed by {num_processes}"
    file = os.path.join(path, f"{RNG_STATE_NAME}_{process_index}.pkl")
    if not os.path.isfile(file):
        return f"{os.path.basename(file)} is missing"
    try:
        states = load(file)
    except Exception as error:  # whatever torch.load raises on a damaged or foreign file
        return f"{os.path.basename(file)} cannot be read ({type(error).__name__}: {error})"
    expected = ["random_state", "numpy_random_seed", "torch_manual_seed"]
    if device_type not in ("cpu", "mps"):
        expected.append(f"torch_{device_type}_manual_seed")
    missing = [key for key in expected if key not in states]
    if missing:
        return f"{os.path.basename(file)} holds no {', '.join(missing)} (saved on another kind of device?)"
    return None
