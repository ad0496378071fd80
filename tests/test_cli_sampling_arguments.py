"""`diffmoe generate` and `diffmoe sample` refuse a wrong sampling argument with one line and exit status 2, before the
model is loaded or sampled, and leave nothing behind; Ctrl-C in `generate` says what was kept (exit status 130)."""

import os

import pytest
import torch
from PIL import Image

from diffmoe_hf import ClassConditionalMoEPipeline, default_models
from diffmoe_hf.cli import main
from diffmoe_hf.evaluation import sampling


DIGITS = default_models()["digits-jitmoe"]  # 1-channel JiTMoE, formulation jit-xpred
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def exit_status(argv: list[str]) -> int:
    """What the `diffmoe` process would exit with: main's return value, or argparse's SystemExit code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture
def loads(monkeypatch):
    """Counts `ClassConditionalMoEPipeline.from_pretrained` calls (they still run)."""
    calls = []
    original = ClassConditionalMoEPipeline.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ClassConditionalMoEPipeline, "from_pretrained", classmethod(counting))
    return calls


# case id, arguments, fragment of the one-line message, whether the model may be loaded first (checks that need it)
GENERATE_CASES = [
    ("device-typo", ["--device", "cdua"], "--device 'cdua' is not a torch device; available here: cpu", False),
    pytest.param(
        "device-cuda-on-cpu",
        ["--device", "cuda"],
        "this torch build or machine has no cuda device",
        False,
        marks=NO_CUDA,
    ),
    ("output-empty", ["--output", ""], "--output is empty; name the image file to write", False),
    (
        "output-unknown-extension",
        ["--output", "{tmp}/grid.xyz"],
        "extension '.xyz', which names no image format",
        False,
    ),
    ("output-no-extension", ["--output", "{tmp}/grid"], "has no extension", False),
    ("scheduler-of-another-formulation", ["--scheduler", "DDPMScheduler"], "cannot sample this model", True),
    ("guidance-nan", ["--guidance-scale", "nan"], "must be a finite number >= 0", False),
    ("guidance-diverges", ["--guidance-scale", "1e30"], "Sampling diverged at sampling step 1 of", True),
]


@pytest.mark.parametrize("case, arguments, message, loads_model", GENERATE_CASES)
def test_generate_refuses(tmp_path, capsys, loads, case, arguments, message, loads_model):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    if "--output" not in arguments:
        arguments += ["--output", str(tmp_path / "grid.png")]
    argv = ["generate", "--classes", "3", "--per-class", "1", "--steps", "2", *arguments]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert bool(loads) == loads_model
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extension, image_format", [(".jpg", "JPEG"), (".webp", "WEBP"), (".PNG", "PNG")])
def test_generate_writes_the_format_the_name_says(tmp_path, extension, image_format):
    output = tmp_path / f"grid{extension}"
    assert main(["generate", "--classes", "3", "--per-class", "1", "--steps", "2", "--output", str(output)]) == 0
    assert Image.open(output).format == image_format and os.listdir(tmp_path) == [output.name]


def test_ctrl_c_in_generate_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ClassConditionalMoEPipeline, "__call__", interrupted)
    output = tmp_path / "grid.png"
    assert main(["generate", "--classes", "3", "--per-class", "1", "--output", str(output)]) == 130
    err = capsys.readouterr().err
    assert f"diffmoe generate: interrupted; nothing was written ({output} is as it was)" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


SAMPLE_CASES = [
    ("guidance-channels-0", ["--guidance-channels", "0"], "must be at least 1"),
    (
        "guidance-channels-above-the-model",
        ["--guidance-channels", "2"],
        "between 1 and 1, the model's latent channels",
    ),
    ("scheduler-of-another-formulation", ["--scheduler", "DDPMScheduler"], "DDPMScheduler cannot sample this model"),
    ("scheduler-unknown", ["--scheduler", "NoSuchScheduler"], "NoSuchScheduler is not a diffusers scheduler"),
    ("guidance-infinite", ["--guidance-scale", "inf"], "must be a finite number >= 0"),
    ("guidance-interval-nan", ["--guidance-interval", "nan", "1"], "guidance_interval must be a finite number"),
    ("steps-beyond-the-scheduler", ["--steps", "5000"], "num_inference_steps=5000 is more than"),
]


@pytest.mark.parametrize("case, arguments, message", SAMPLE_CASES)
def test_sample_refuses_before_sampling(tmp_path, capsys, monkeypatch, case, arguments, message):
    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampled despite a refused argument")

    monkeypatch.setattr(sampling, "run_sampling", must_not_sample)
    output = tmp_path / "samples.npz"
    argv = ["sample", "--model", DIGITS, "--num-samples", "4", "--output", str(output), "--no-progress", *arguments]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
