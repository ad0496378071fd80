"""Checkpoints of training/train_class_conditional.py survive a SIGKILL at any moment, and resume options fail loudly.

The kill test runs the script's `main` in a forked process and kills it at moments it observes from outside (a checkpoint
folder appearing, its last file appearing, the rename into place, pruning), with and without
`--checkpoints_total_limit`; each following run resumes with `latest` and the chain must end with the weights of an
uninterrupted run.
"""

import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from safetensors.torch import load_file

from diffmoe_hf.cli import CommandError
from diffmoe_hf.training.checkpoints import COMPLETE_MARKER, resolve_checkpoint, why_incomplete
from diffmoe_hf.training.train_class_conditional import main, parse_args

from .training_helpers import make_image_folder, save_tiny_pipeline, script_args


STEPS = 16
FINAL = re.compile(r"checkpoint-(\d+)")
ANY = re.compile(r"checkpoint-(\d+)(\..*)?")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return save_tiny_pipeline(str(root / "pipe"), "dsmoe"), make_image_folder(str(root / "images"))


def _steps(names, pattern):
    return {int(m.group(1)): name for name in names if (m := pattern.fullmatch(name))}


def _train_in_child(args, log_path):
    """A forked training process (the parent's imports are shared, so it starts in a fraction of a second)."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    logging.root.handlers.clear()  # pytest's capturing handlers: the script configures its own
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    main(parse_args(args))


def _run_and_kill(args, output_dir, log_path, should_kill, timeout=120):
    """Runs the script with `args` in a child process, polling `output_dir`; SIGKILLs it the first time
    `should_kill(names, first_names)` is true. Returns the folder listing right after the kill, or None when the run
    ended by itself."""
    first = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    process = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(args, log_path))
    process.start()
    deadline = time.monotonic() + timeout
    try:
        while process.is_alive() and time.monotonic() < deadline:
            names = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
            if should_kill(names, first):
                os.kill(process.pid, signal.SIGKILL)
                process.join()
                return sorted(os.listdir(output_dir))
            time.sleep(0.0002)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
    assert process.exitcode == 0, open(log_path).read()[-3000:]
    return None


def _after(min_step, pattern=ANY):
    """A checkpoint folder of step >= min_step matching `pattern` exists."""
    return lambda names: [s for s in _steps(names, pattern) if s >= min_step]


def test_sigkill_during_checkpointing_loses_nothing(setup, tmp_path):
    """Kills at four moments; every following `latest` resume starts from the newest complete checkpoint, with or
    without --checkpoints_total_limit, and the chain ends with the weights of an uninterrupted run."""
    pretrained, images = setup
    out = str(tmp_path / "killed")
    common = [
        "--max_train_steps",
        str(STEPS),
        "--checkpointing_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--resume_from_checkpoint",
        "latest",
    ]

    def written_until(output_dir, names, step, filename):
        return any(
            os.path.isfile(os.path.join(output_dir, name, filename))
            for s, name in _steps(names, ANY).items()
            if s >= step
        )

    # (flags, when to kill given the step the run resumes from)
    stages = [
        ([], lambda start: lambda names, first: _after(start + 2)(names)),  # a checkpoint folder appears
        (
            ["--checkpoints_total_limit", "1"],  # the last file of the accelerate state appears
            lambda start: lambda names, first: written_until(out, names, start + 2, "random_states_0.pkl"),
        ),
        ([], lambda start: lambda names, first: _after(start + 2, FINAL)(names)),  # a complete checkpoint appears
        (
            ["--checkpoints_total_limit", "2"],  # a checkpoint present at the start is being or was pruned
            lambda start: lambda names, first: bool(_steps(first, FINAL).keys() - _steps(names, FINAL).keys()),
        ),
    ]
    start, leftovers = 0, []
    for i, (flags, kill_when) in enumerate(stages + [([], None)]):
        log_path = str(tmp_path / f"run{i}.log")
        args = script_args(pretrained, images, out, *common, *flags)
        listing = _run_and_kill(args, out, log_path, kill_when(start) if kill_when else lambda *_: False)
        log = open(log_path).read()
        if i > 0:  # this run resumed from the newest complete checkpoint the previous kill left
            assert f"Resuming from checkpoint {os.path.join(out, f'checkpoint-{start}')}" in log, log[-3000:]
        for name in leftovers:
            assert f"Removing {os.path.join(out, name)}, left incomplete by an interrupted run" in log, log[-3000:]
        if kill_when is None:
            assert listing is None
            break
        assert listing is not None, f"run {i} ended before the moment to kill it"
        complete = _steps(listing, FINAL)
        assert complete, f"run {i} was killed with no checkpoint left: {listing}"
        assert max(complete) > start, listing  # the kill came after a checkpoint newer than the start was written
        start = max(complete)
        leftovers = [name for name in listing if ANY.fullmatch(name) and not FINAL.fullmatch(name)]
    final_listing = os.listdir(out)
    assert not [name for name in final_listing if ANY.fullmatch(name) and not FINAL.fullmatch(name)]

    straight = str(tmp_path / "straight")  # in a child as well: the same thread count, so the same float sums
    straight_args = script_args(
        pretrained,
        images,
        straight,
        "--max_train_steps",
        str(STEPS),
        "--checkpointing_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
    )
    assert _run_and_kill(straight_args, straight, str(tmp_path / "straight.log"), lambda *_: False) is None
    a = load_file(os.path.join(straight, "transformer", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fake_checkpoint(output_dir, step, complete=True, payload=b"state"):
    """A checkpoint folder with one file, marked complete as save_checkpoint marks it."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "optimizer.bin"), "wb") as f:
        f.write(payload)
    if complete:
        marker = {"step": step, "num_processes": 1, "files": {"optimizer.bin": len(payload)}}
        with open(os.path.join(path, COMPLETE_MARKER), "w") as f:
            json.dump(marker, f)
    return path


def test_latest_skips_incomplete_and_foreign_folders_and_says_why(tmp_path, caplog):
    PartialState()  # the checkpoints module logs through accelerate
    out = str(tmp_path)
    good = _fake_checkpoint(out, 2)
    truncated = _fake_checkpoint(out, 4)
    with open(os.path.join(truncated, "optimizer.bin"), "wb") as f:
        f.write(b"st")
    _fake_checkpoint(out, 6, complete=False)
    os.makedirs(os.path.join(out, "checkpoint-abc"))
    os.makedirs(os.path.join(out, "checkpoint-8.tmp"))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("latest", out) == good
    text = caplog.text
    assert f"Skipping {os.path.join(out, 'checkpoint-6')}: it has no {COMPLETE_MARKER}" in text
    assert f"Skipping {os.path.join(out, 'checkpoint-4')}: optimizer.bin has 2 bytes instead of 5" in text
    assert f"Ignoring {os.path.join(out, 'checkpoint-abc')}: not a checkpoint-<step> folder" in text
    assert resolve_checkpoint("latest", str(tmp_path / "nothing-yet")) is None  # a new run


def test_explicit_checkpoint_must_exist_and_be_complete(setup, tmp_path):
    pretrained, images = setup
    out = str(tmp_path / "out")
    _fake_checkpoint(out, 3)
    _fake_checkpoint(out, 5, complete=False)
    for resume, message in [
        (
            "checkpoint-30",
            r"--resume_from_checkpoint checkpoint-30: no such folder .*Checkpoints in .*out: "
            r"checkpoint-3, checkpoint-5\. Give an existing checkpoint folder, 'latest'",
        ),
        ("checkpoint-5", rf"checkpoint-5 is not a complete checkpoint: it has no {COMPLETE_MARKER} .*'latest' picks"),
    ]:
        with pytest.raises(CommandError, match=message):
            try:
                main(parse_args(script_args(pretrained, images, out, "--resume_from_checkpoint", resume)))
            finally:
                AcceleratorState._reset_state(True)
    assert not os.path.exists(os.path.join(out, "transformer"))  # stopped before training


def test_latest_with_a_stray_folder_starts_a_new_run(setup, tmp_path, caplog):
    pretrained, images = setup
    out = tmp_path / "out"
    (out / "checkpoint-abc").mkdir(parents=True)
    with caplog.at_level(logging.INFO):
        try:
            main(
                parse_args(
                    script_args(
                        pretrained,
                        images,
                        str(out),
                        "--max_train_steps",
                        "1",
                        "--checkpointing_steps",
                        "1",
                        "--resume_from_checkpoint",
                        "latest",
                    )
                )
            )
        finally:
            AcceleratorState._reset_state(True)
    assert f"Ignoring {out / 'checkpoint-abc'}: not a checkpoint-<step> folder" in caplog.text
    assert f"No complete checkpoint in {out}: starting a new training run" in caplog.text
    assert why_incomplete(str(out / "checkpoint-1")) is None
