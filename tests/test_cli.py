"""The `diffmoe` command (run in-process; one subprocess checks the module entry point)."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffmoe_hf import ClassConditionalMoEPipeline, default_models
from diffmoe_hf.cli import _image_grid, main

from .helpers import dsmoe_case, tiny_pipeline, tiny_vae, unwritable_folder


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "diffmoe_hf", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "convert" in result.stdout and "generate" in result.stdout


def test_convert_then_generate(tmp_path, capsys):
    case = dsmoe_case()
    tiny_vae().save_pretrained(tmp_path / "vae")
    assert (
        main(
            [
                "convert",
                "dsmoe",
                "--checkpoint",
                os.path.join(case, "checkpoint.pt"),
                "--config",
                os.path.join(case, "config.yaml"),
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", str(tmp_path / "m"), "--steps", "1", "--output", str(grid)]) == 2
    assert "no VAE" in capsys.readouterr().err and not grid.exists()
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "m"),
                "--vae",
                str(tmp_path / "vae"),
                "--classes",
                "1",
                "7",
                "--per-class",
                "3",
                "--steps",
                "2",
                "--output",
                str(grid),
            ]
        )
        == 0
    )
    # 8 px images enlarged x8, 4 grey pixels between them
    assert Image.open(grid).size == (3 * 64 + 2 * 4, 2 * 64 + 4) and str(grid) in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "m"),
                "--vae",
                str(tmp_path / "vae"),
                "--steps",
                "1",
                "--output",
                str(grid),
            ]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    assert (
        main(["convert", "dsmoe", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_family_options_are_checked(tmp_path, capsys):
    case = dsmoe_case()
    assert (
        main(
            [
                "convert",
                "dsmoe",
                "--checkpoint",
                os.path.join(case, "checkpoint.pt"),
                "--config",
                os.path.join(case, "config.yaml"),
                "--num-experts",
                "8",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not take num_experts" in capsys.readouterr().err and not (tmp_path / "o").exists()


# --- generate: arguments and files are checked before anything slow happens ------------------------------------------


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Records the number of class labels of every pipeline call (the calls still run)."""
    calls = []
    original = ClassConditionalMoEPipeline.__call__

    def recording_call(self, class_labels, *args, **kwargs):
        calls.append(len(class_labels))
        return original(self, class_labels, *args, **kwargs)

    monkeypatch.setattr(ClassConditionalMoEPipeline, "__call__", recording_call)
    return calls


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A converted 4-channel latent DSMoE folder (no vae/) and a tiny VAE folder."""
    root = tmp_path_factory.mktemp("latent")
    case = dsmoe_case()
    assert (
        main(
            [
                "convert",
                "dsmoe",
                "--checkpoint",
                os.path.join(case, "checkpoint.pt"),
                "--config",
                os.path.join(case, "config.yaml"),
                "--output",
                str(root / "model"),
            ]
        )
        == 0
    )
    tiny_vae().save_pretrained(root / "vae")
    return root / "model", root / "vae"


def test_steps_beyond_the_scheduler_are_refused_before_sampling(tmp_path, capsys, pipeline_calls):
    grid = tmp_path / "grid.png"
    assert main(["generate", "--steps", "1000000", "--output", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "--steps 1000000" in err and "at most 1000" in err and "FlowMatchHeunDiscreteScheduler" in err
    assert pipeline_calls == [] and not grid.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "lots"])
def test_non_finite_or_negative_guidance_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", f"--guidance-scale={value}", "--output", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2
    assert "--guidance-scale: must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


OUT_OF_RANGE = [
    ("--per-class", "0"),
    ("--batch-size", "0"),
    ("--steps", "0"),
    ("--seed", "-1"),
    ("--padding", "-2"),
    ("--min-cell-size", "0"),
]


@pytest.mark.parametrize("option, value", OUT_OF_RANGE)
def test_out_of_range_numbers_are_refused_by_the_parser(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", f"{option}={value}", "--output", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2 and f"argument {option}: must be" in capsys.readouterr().err


def test_samples_come_in_bounded_batches(tmp_path, pipeline_calls):
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--classes",
                "0",
                "1",
                "2",
                "--per-class",
                "3",
                "--batch-size",
                "4",
                "--steps",
                "1",
                "--output",
                str(grid),
            ]
        )
        == 0
    )
    assert pipeline_calls == [4, 4, 1]
    assert Image.open(grid).size == (3 * 64 + 2 * 4, 3 * 64 + 2 * 4)  # 16 px digits enlarged x4, 4 px between


def test_default_batch_gives_the_images_of_one_pipeline_call(tmp_path):
    """Seeds keep their images: up to --batch-size images come from one call with one generator of --seed."""
    grid = tmp_path / "grid.png"
    assert main(["generate", "--per-class", "2", "--steps", "2", "--seed", "3", "--output", str(grid)]) == 0
    pipe = ClassConditionalMoEPipeline.from_pretrained(default_models()["digits-jitmoe"])
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(10) for _ in range(2)]
    images = pipe(class_labels=labels, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
    expected = _image_grid(images, columns=2, min_cell_size=64, padding=4)
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(expected))


def test_too_large_grid_is_refused_before_sampling(tmp_path, capsys, pipeline_calls):
    grid = tmp_path / "grid.png"
    assert main(["generate", "--per-class", "100000", "--output", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "1000000 images would be 6799996 x 676 pixels" in err and "--per-class" in err
    assert pipeline_calls == [] and not grid.exists()


def test_non_finite_samples_are_not_written(tmp_path, capsys, latent_model):
    model, vae = latent_model
    pipe = ClassConditionalMoEPipeline.from_pretrained(model)
    with torch.no_grad():
        for parameter in pipe.transformer.proj_out.parameters():
            parameter.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "broken")
    grid = tmp_path / "grid.png"
    assert (
        main(
            ["generate", "--model", str(tmp_path / "broken"), "--vae", str(vae), "--steps", "1", "--output", str(grid)]
        )
        == 2
    )
    assert "Sampling diverged at sampling step 1 of 1: the latents became NaN" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no grid, no partial file


def test_output_naming_a_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ClassConditionalMoEPipeline, "from_pretrained", _must_not_be_called)
    assert main(["generate", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_output_below_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ClassConditionalMoEPipeline, "from_pretrained", _must_not_be_called)
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--output", str(tmp_path / "file" / "sub" / "grid.png")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["read-only", "/sys"])
def test_unwritable_output_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch, folder):
    """A folder without write permission (root ignores permission bits, so only other users can check it) and
    sysfs, which takes no new files even from root."""
    folder = unwritable_folder(tmp_path, folder)
    monkeypatch.setattr(ClassConditionalMoEPipeline, "from_pretrained", _must_not_be_called)
    assert main(["generate", "--output", os.path.join(folder, "grid.png")]) == 2
    assert f"the folder {folder} does not accept new files" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(folder, "grid.png"))


def test_full_disk_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def save_until_the_disk_is_full(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save_until_the_disk_is_full)
    assert main(["generate", "--steps", "1", "--output", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "Could not write" in err and "No space left on device" in err
    assert os.listdir(tmp_path) == []


def test_scheduler_the_formulation_cannot_use_is_refused(tmp_path, capsys, pipeline_calls):
    grid = tmp_path / "grid.png"
    assert main(["generate", "--scheduler", "DDPMScheduler", "--output", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "DDPMScheduler cannot sample this model (formulation jit-xpred)" in err
    assert "FlowMatchHeunDiscreteScheduler, FlowMatchEulerDiscreteScheduler" in err and pipeline_calls == []
    assert main(["generate", "--scheduler", "NoSuchScheduler", "--output", str(grid)]) == 2
    assert "NoSuchScheduler is not a diffusers scheduler" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--scheduler",
                "FlowMatchEulerDiscreteScheduler",
                "--classes",
                "3",
                "--per-class",
                "1",
                "--steps",
                "2",
                "--output",
                str(grid),
            ]
        )
        == 0
    )


def test_cli_and_space_offer_the_same_schedulers():
    from diffmoe_hf.formulations import FORMULATIONS, available_schedulers

    for name, formulation in FORMULATIONS.items():
        offered = available_schedulers(name, formulation.default_scheduler())
        assert list(offered) == [cls.__name__ for cls in formulation.compatible_schedulers], name
    space = open(os.path.join(os.path.dirname(__file__), "..", "space", "app.py"), encoding="utf-8").read()
    assert "available_schedulers(pipe.transformer.config.formulation, pipe.scheduler)" in space


def test_unknown_class_name_lists_the_close_names(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["generate", "--classes", "sevn", "--output", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "'sevn' is not a class name" in err and "'seven' (class 7)" in err and "pipe.labels" not in err
    assert main(["generate", "--classes", "12", "--output", str(grid)]) == 2
    assert "this model has the classes 0..9" in capsys.readouterr().err
    assert main(["generate", "--classes", "Seven", "--per-class", "1", "--steps", "1", "--output", str(grid)]) == 0


def test_missing_vae_error_names_the_option(tmp_path, capsys, latent_model):
    model, _ = latent_model
    assert main(["generate", "--model", str(model), "--output", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "has no VAE" in err and "--vae" in err and "from_pretrained" not in err


def test_model_that_is_not_a_model_folder_is_refused(tmp_path, capsys, monkeypatch):
    assert main(["generate", "--model", str(tmp_path), "--output", str(tmp_path / "grid.png")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "outputs/missing"]) == 2
    assert (
        "--model outputs/missing: there is no such folder, and as a Hub repo id it failed" in capsys.readouterr().err
    )


def test_evaluate_digits_refuses_a_colour_model_before_sampling(tmp_path, capsys, pipeline_calls):
    pytest.importorskip("sklearn")
    tiny_pipeline(with_vae=False, in_channels=3, out_channels=3).save_pretrained(tmp_path / "rgb")
    assert main(["evaluate-digits", "--model", str(tmp_path / "rgb"), "--num-samples", "360"]) == 2
    err = capsys.readouterr().err
    assert "need a model of the 10 digit classes that makes 1-channel" in err and "3-channel images" in err
    assert pipeline_calls == []


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("must not be called")
