"""The training scripts check every option before any work: a user's mistake is one line naming the value and what to
do, with exit status 2, and leaves nothing behind; Ctrl-C is one line saying what was kept, with exit status 130."""

import importlib.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import types

import pytest
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState

from diffmoe_hf.cli import CommandError
from diffmoe_hf.training import extract_features
from diffmoe_hf.training import train_class_conditional as script
from diffmoe_hf.training.checkpoints import COMPLETE_MARKER, why_random_state_unrestorable

from .training_helpers import make_image_folder, save_tiny_pipeline, script_args


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny DSMoE pipeline with 3 classes named class_0, class_1, class_2."""
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("pipe")), "dsmoe")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("images")), per_class=2)


def _run(argv) -> int:
    try:
        return script.run(argv)
    finally:
        AcceleratorState._reset_state(True)


# case id, arguments added to a valid tiny run, fragment of the message (a regular expression)
OPTION_CASES = [
    ("max-steps-negative", ["--max_train_steps", "-1"], r"--max_train_steps must be at least 1, got -1"),
    ("checkpointing-0", ["--checkpointing_steps", "0"], r"--checkpointing_steps must be at least 1, got 0"),
    ("accumulation-0", ["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be at least 1"),
    ("batch-0", ["--train_batch_size", "0"], r"--train_batch_size must be at least 1, got 0"),
    ("rank-0", ["--use_lora", "--rank", "0"], r"--rank must be at least 1, got 0"),
    ("epochs-0", ["--num_train_epochs", "0"], r"--num_train_epochs must be at least 1"),
    ("resolution-0", ["--resolution", "0"], r"--resolution must be at least 1"),
    ("warmup-negative", ["--lr_warmup_steps", "-5"], r"--lr_warmup_steps must be 0 or more"),
    ("lr-nan", ["--learning_rate", "nan"], r"--learning_rate must be a finite number in \(0.0, inf\), got nan"),
    ("lr-0", ["--learning_rate", "0"], r"--learning_rate must be a finite number in \(0.0, inf\), got 0.0"),
    ("beta-1", ["--adam_beta2", "1.5"], r"--adam_beta2 must be a finite number in \[0.0, 1.0\], got 1.5"),
    (
        "lr-scheduler",
        ["--lr_scheduler", "cosine_warm"],
        r"--lr_scheduler 'cosine_warm' is unknown; choose one of .*cosine",
    ),
    ("validation-abc", ["--validation_class_labels", "abc"], r"'abc' is not a class id; give class ids like 0,1,207"),
    ("validation-negative", ["--validation_class_labels", "0,-1"], r"'-1' is not a class id"),
    ("lora-layers", ["--lora_layers", "attention,mlp"], r"--lora_layers 'attention,mlp': give a comma-separated list"),
    ("lora-layers-empty", ["--lora_layers", ","], r"--lora_layers ',': give a comma-separated list"),
    ("lora-router", ["--lora_layers", "router"], r"Routers are never LoRA-adapted"),
    ("lora-and-ema", ["--use_lora", "--use_ema"], r"--use_ema is for full fine-tuning"),
    ("expert-parts", ["--lora_expert_parts", "gate"], r"--lora_expert_parts 'gate': give a comma-separated list"),
    ("init-class-alone", ["--init_class_from", "a=b"], r"--init_class_from starts new classes: give it with"),
    ("init-class-form", ["--new_classes", "append", "--init_class_from", "a"], r"'a' is not NEW=OLD"),
    (
        "tracker-unknown",
        ["--report_to", "tensorbord"],
        r"--report_to 'tensorbord' is unknown; choose one of none, all",
    ),
    ("two-data-options", ["--dataset_name", "cifar10"], r"Give exactly one of --dataset_name, --train_data_dir"),
    ("model-and-preset", ["--preset", "DSMoE-S-E16", "--model_family", "dsmoe"], r"Give exactly one of --pretrained"),
    (
        "expert-parallel-processes",
        ["--expert_parallel_size", "2"],
        r"--expert_parallel_size 2 must divide the number of processes \(1\)",
    ),
    (
        "expert-parallel-launch",
        ["--expert_parallel_size", "1"],
        r"--expert_parallel_size: expert_parallel_size=1 needs torch.distributed initialised \(torchrun",
    ),
    (
        "fsdp2-without-expert-parallel",
        ["--non_expert_parallel", "fsdp2"],
        r"--non_expert_parallel fsdp2 needs --expert_parallel_size",
    ),
    (
        "expert-parallel-fp16",
        ["--expert_parallel_size", "1", "--mixed_precision", "fp16"],
        r"--expert_parallel_size supports --mixed_precision no or bf16, not fp16",
    ),
]


@pytest.mark.parametrize("case, extra, message", OPTION_CASES, ids=[case[0] for case in OPTION_CASES])
def test_bad_options_are_refused_before_any_work(case, extra, message, pretrained, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(script_args(pretrained, images, str(out), *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("train_class_conditional.py: error: ") and "\n" not in error
    assert re.search(message, error), error
    assert not out.exists()  # refused while parsing: nothing created


PRESET_CASES = [
    (
        "unknown-preset",
        ["--preset", "XXL", "--model_family", "dsmoe"],
        r"--preset 'XXL' is no preset of dsmoe; choose",
    ),
    ("preset-without-family", ["--preset", "XXL"], r"--preset needs --model_family"),
    (
        "overrides-json",
        ["--preset", "DSMoE-S-E16", "--model_family", "dsmoe", "--model_config_overrides", "{x"],
        "JSON",
    ),
]


@pytest.mark.parametrize("case, extra, message", PRESET_CASES, ids=[case[0] for case in PRESET_CASES])
def test_bad_presets_are_refused(case, extra, message, images, tmp_path):
    args = ["--train_data_dir", images, "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(CommandError, match=message):
        script.parse_args(args)


def test_bad_data_and_output_folders_are_refused(pretrained, images, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no-images"
    (no_images / "cats").mkdir(parents=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(os.path.join(images, "class_0", "0.png"), flat / "0.png")
    out = str(tmp_path / "out")
    cases = [
        (script_args(pretrained, str(a_file), out), rf"--train_data_dir {a_file} is a file; give the folder"),
        (script_args(pretrained, str(tmp_path / "nowhere"), out), r"nowhere: no such folder"),
        (script_args(pretrained, str(empty), out), r"holds no class folders: put the images of each class in a sub"),
        (script_args(pretrained, str(flat), out), r"flat holds no class folders"),
        (script_args(pretrained, str(no_images), out), r"holds no images in its class folders"),
        (script_args(pretrained, images, str(a_file / "out")), rf"{a_file} is a file, not a folder; choose another"),
        (script_args(pretrained, images, out, "--resolution", "64"), r"--resolution 64 gives inputs of shape .* 8\."),
        (
            script_args(pretrained, images, out, "--validation_epochs", "1", "--validation_class_labels", "0,99"),
            r"--validation_class_labels 99: the model has classes 0..2",
        ),
        (
            script_args(pretrained, images, out, "--max_train_samples", "1000"),
            r"--max_train_samples 1000 is more than the 6 samples of the data",
        ),
        (
            script_args(pretrained, images, out, "--resume_from_checkpoint", "checkpoint-7"),
            r"--resume_from_checkpoint checkpoint-7: no such folder",
        ),
    ]
    for argv, message in cases:
        assert _run(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("train_class_conditional.py: error: "), error
        assert re.search(message, error), error
        assert not os.path.exists(os.path.join(out, "transformer")) and not os.path.exists(
            os.path.join(out, "pytorch_lora_weights.safetensors")
        )


def test_unwritable_output_folder_is_refused(monkeypatch, tmp_path):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(
        CommandError, match=r"--output_dir diffmoe-model: cannot write in .* \(Permission denied\); choose a"
    ):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)])


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused_and_not_the_default(tracker, monkeypatch, images):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{tracker}_available", lambda: False)
    argv = ["--pretrained_model_name_or_path", "x", "--train_data_dir", images]
    with pytest.raises(CommandError, match=rf"--report_to {tracker}: {tracker} is not installed; install it or pass"):
        script.parse_args([*argv, "--report_to", tracker])
    if tracker == "tensorboard":
        assert script.parse_args(argv).report_to == "none"


def test_one_class_folder_trains_that_class_quietly(pretrained, tmp_path, capfd, caplog):
    """The most common LoRA data: one folder of one class. It trains that class; validation warns about a class the
    data lacks and runs once at the last step; the weights file follows the umask; no float32 warning from the casts."""
    data = tmp_path / "data"
    shutil.copytree(make_image_folder(str(tmp_path / "all"), per_class=2) + "/class_1", data / "class_1")
    out = tmp_path / "out"
    extra = ["--use_lora", "--max_train_steps", "2", "--validation_epochs", "1", "--validation_class_labels", "0,1"]
    previous = os.umask(0o022)
    try:
        with caplog.at_level("INFO"):
            assert _run(script_args(pretrained, str(data), str(out), *extra)) == 0
    finally:
        os.umask(previous)
    output = capfd.readouterr().err + caplog.text
    assert "class_1/ -> 1" in output
    assert "--validation_class_labels 0 are not in the training data (its classes: 1)" in output
    assert output.count("Running validation at step 2") == 1  # the last epoch's is the final one
    assert "should be kept in float32" not in output
    assert "Downloading data" not in output and "Casting the dataset" not in output
    assert sorted(os.listdir(out / "validation" / "final")) == ["000-class0.png", "001-class1.png"]
    assert os.stat(out / "pytorch_lora_weights.safetensors").st_mode & 0o777 == 0o644


def _checkpoint(folder, num_processes=1, random_states: bytes | None = None):
    os.makedirs(folder, exist_ok=True)
    files = {}
    if random_states is not None:
        with open(os.path.join(folder, "random_states_0.pkl"), "wb") as f:
            f.write(random_states)
        files["random_states_0.pkl"] = len(random_states)
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
        json.dump({"step": 1, "num_processes": num_processes, "files": files}, f)
    return str(folder)


def test_random_state_that_cannot_be_restored_stops_a_resume(tmp_path, caplog):
    import io
    import random

    import numpy as np

    buffer = io.BytesIO()
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    torch.save({**states, "torch_manual_seed": torch.get_rng_state()}, buffer)
    good = _checkpoint(tmp_path / "good", random_states=buffer.getvalue())
    assert why_random_state_unrestorable(good, 0, 1, "cpu") is None
    assert why_random_state_unrestorable(good, 0, 1, "cuda") == (
        "random_states_0.pkl holds no torch_cuda_manual_seed (saved on another kind of device?)"
    )
    assert why_random_state_unrestorable(good, 0, 2, "cpu") == "it was saved by 1 processes and is resumed by 2"
    missing = _checkpoint(tmp_path / "missing")
    assert why_random_state_unrestorable(missing, 0, 1, "cpu") == "random_states_0.pkl is missing"
    damaged = _checkpoint(tmp_path / "damaged", random_states=b"not a pickle")
    assert why_random_state_unrestorable(damaged, 0, 1, "cpu").startswith("random_states_0.pkl cannot be read (")

    PartialState()
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    with pytest.raises(CommandError, match=r"cannot restore its random state .*missing\. Resume with the same"):
        script.check_random_state(missing, accelerator, allow_inexact=False)
    with caplog.at_level("WARNING"):
        script.check_random_state(missing, accelerator, allow_inexact=True)
    assert "THIS RUN IS NO LONGER EXACT" in caplog.text
    script.check_random_state(good, accelerator, allow_inexact=False)


def _run_in_child(argv, log_path):
    """`run(argv)` in a forked process (the parent's imports are shared: it starts at once), stderr to `log_path`;
    the process exits with its status."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    logging.root.handlers.clear()  # pytest's capturing handlers: the script configures its own
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os._exit(script.run(argv))


def test_ctrl_c_keeps_the_last_checkpoint_and_exits_130(pretrained, images, tmp_path):
    """A real SIGINT during training: one line naming the kept checkpoint, status 130, no traceback, no .tmp folder."""
    out = tmp_path / "out"
    argv = script_args(pretrained, images, str(out), "--max_train_steps", "100000", "--checkpointing_steps", "1")
    log_path = tmp_path / "log.txt"
    process = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(argv, log_path))
    process.start()
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").exists() and time.monotonic() < deadline and process.is_alive():
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    process.join(60)
    stderr = log_path.read_text()
    assert process.exitcode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("train_class_conditional.py: interrupted; kept ") and "resume_from_checkpoint latest" in last
    )
    assert "Traceback" not in stderr
    assert not [name for name in os.listdir(out) if name.endswith((".tmp", ".deleting"))]


def test_ctrl_c_before_any_checkpoint_says_nothing_was_kept(monkeypatch, pretrained, images, tmp_path, capsys):
    def interrupted(args):
        os.makedirs(os.path.join(args.output_dir, "checkpoint-1.tmp"))
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "main", interrupted)
    assert _run(script_args(pretrained, images, str(tmp_path / "out"))) == 130
    kept = f"no checkpoint was kept in {tmp_path / 'out'} (none was complete yet)."
    assert capsys.readouterr().err.strip().endswith(kept)
    assert os.listdir(tmp_path / "out") == []


EXTRACT_CASES = [
    ("batch-0", ["--batch_size", "0"], r"--batch_size must be at least 1, got 0"),
    ("shard-0", ["--shard_size", "0"], r"--shard_size must be at least 1"),
    ("two-sources", ["--dataset_name", "x"], r"Give exactly one of --dataset_name and --train_data_dir"),
]


@pytest.mark.parametrize("case, extra, message", EXTRACT_CASES, ids=[case[0] for case in EXTRACT_CASES])
def test_feature_extraction_refuses_bad_options(case, extra, message, images, tmp_path, capsys):
    argv = ["--train_data_dir", images, "--output_dir", str(tmp_path / "latents"), *extra]
    assert extract_features.run(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("extract_features.py: error: ") and re.search(message, error), error
    assert not (tmp_path / "latents").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_is_refused(images):
    argv = ["--pretrained_model_name_or_path", "x", "--train_data_dir", images, "--use_8bit_adam"]
    with pytest.raises(CommandError, match=r"--use_8bit_adam needs bitsandbytes: install it"):
        script.parse_args(argv)


def test_a_checkpoint_of_another_model_or_adapter_is_refused_before_loading(pretrained, images, tmp_path, capsys):
    """Resuming a run's checkpoint with another model or another LoRA rank: exit 2 naming what
    differs, before `load_state` (which would fail with a traceback deep in accelerate or peft)."""
    out = str(tmp_path / "out")
    assert _run(script_args(pretrained, images, out, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    other = save_tiny_pipeline(str(tmp_path / "other"), "dit-moe")
    capsys.readouterr()
    resume = ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    assert _run(script_args(other, images, out, *resume)) == 2
    err = capsys.readouterr().err
    assert "does not fit this run: it holds a DSMoETransformer2DModel, this run trains a DiTMoE" in err
    assert "Traceback" not in err

    lora_out = str(tmp_path / "lora")
    lora = ["--use_lora", "--rank", "4", "--max_train_steps", "1", "--checkpointing_steps", "1"]
    assert _run(script_args(pretrained, images, lora_out, *lora)) == 0
    capsys.readouterr()
    assert _run(script_args(pretrained, images, lora_out, "--use_lora", "--rank", "8", *resume)) == 2
    err = capsys.readouterr().err
    assert "--rank 4 there, 8 here" in err and "Traceback" not in err


def test_model_record_names_the_config_fields_and_options_that_differ(tmp_path):
    from diffmoe_hf.training.checkpoints import model_record, why_model_differs

    from .helpers import tiny_model

    model = tiny_model("dsmoe")
    args = types.SimpleNamespace(
        use_lora=True, rank=4, lora_layers="attention", lora_expert_parts="up", routers="frozen", use_ema=False
    )
    saved = model_record(model, args)
    path = _checkpoint(tmp_path / "c")
    marker = json.loads((tmp_path / "c" / COMPLETE_MARKER).read_text())
    (tmp_path / "c" / COMPLETE_MARKER).write_text(json.dumps({**marker, "model": saved}))
    assert why_model_differs(path, saved) is None
    deeper = {**saved, "config": {**saved["config"], "num_layers": saved["config"]["num_layers"] + 1}}
    other_rank = {**saved, "options": {**saved["options"], "rank": 8}}
    num_layers = saved["config"]["num_layers"]
    assert f"config num_layers {num_layers} there, {num_layers + 1} here" in why_model_differs(path, deeper)
    assert "--rank 4 there, 8 here" in why_model_differs(path, other_rank)
    with_ema = {**saved, "options": {**saved["options"], "use_ema": True}}
    assert "--use_ema False there, True here" in why_model_differs(path, with_ema)
    expert_parallel = model_record(model, types.SimpleNamespace(**vars(args), expert_parallel_size=2))
    assert "it was not saved with --expert_parallel_size, so it cannot be resharded" in why_model_differs(
        path, expert_parallel
    )
    marker["model"] = expert_parallel
    (tmp_path / "c" / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert "it was saved with --expert_parallel_size (its weights are per-rank files" in why_model_differs(path, saved)
    assert (
        why_model_differs(path, model_record(model, types.SimpleNamespace(**vars(args), expert_parallel_size=1)))
        is None
    )


def test_ctrl_c_while_writing_the_final_model_leaves_no_half_written_weights(
    monkeypatch, pretrained, images, tmp_path, capsys
):
    from diffmoe_hf import ClassConditionalMoEPipeline

    def interrupted_save(self, folder, **kwargs):
        os.makedirs(os.path.join(folder, "transformer"))
        with open(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"), "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    out = tmp_path / "out"
    argv = script_args(pretrained, images, str(out), "--max_train_steps", "1", "--checkpointing_steps", "1")
    with monkeypatch.context() as patch:
        patch.setattr(ClassConditionalMoEPipeline, "save_pretrained", interrupted_save)
        assert _run(argv) == 130
    assert "interrupted; kept " in capsys.readouterr().err
    assert not (out / ".final.tmp").exists() and not (out / "transformer").exists()
    assert _run([*argv, "--resume_from_checkpoint", "latest"]) == 0  # the rerun writes the final model
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    assert not (out / ".final.tmp").exists()
