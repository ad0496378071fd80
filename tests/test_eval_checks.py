"""`diffmoe sample`, `evaluate` and `evaluate-digits` check their outputs and inputs before the expensive part (loading
and sampling the model, computing features), refuse a user's mistake with one line and exit status 2, and leave nothing
behind (resuming after Ctrl-C or a damaged part: tests/test_eval_sampling.py)."""

import logging
import os

import numpy as np
import pytest
import torch

from diffmoe_hf import ClassConditionalMoEPipeline, cli
from diffmoe_hf.cli import main
from diffmoe_hf.embedded_models import default_models
from diffmoe_hf.evaluation import inception, sampling
from diffmoe_hf.evaluation.evaluate import ImageBatch, check_resolutions


DIGITS = default_models()["digits-jitmoe"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("the command went past its checks")


def _files(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def _layout(tmp_path) -> dict[str, str]:
    """Paths the cases name (`{name}` for `name.ext`): an existing file and folder, a text file, broken batches."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "existing.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("not an archive\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "large.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(
        tmp_path / "float.npz",
        arr_0=np.zeros((6, 8, 8, 3), np.uint8),
        arr_float=np.where(np.arange(6 * 8 * 8 * 3).reshape(6, 8, 8, 3) == 5, np.nan, 1.0).astype(np.float32),
    )
    np.savez(tmp_path / "nan-stats.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    np.savez(tmp_path / "inf-sigma.npz", mu=np.zeros(2), sigma=np.array([[1.0, np.inf], [0.0, 1.0]]))
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "samples.npz").read_bytes()[:300])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return {name.split(".")[0].replace("-", "_"): str(tmp_path / name) for name in os.listdir(tmp_path)}


SAMPLE_CASES = [
    # (case id, arguments, message fragment)
    ("output-folder", ["--output", "{folder}"], "is a folder"),
    ("output-folder-overwrite", ["--output", "{folder}", "--overwrite"], "is a folder (--overwrite replaces files"),
    ("output-exists", ["--output", "{existing}"], "pass --overwrite"),
    ("output-not-npz", ["--output", "{tmp}/grid.png"], "name the .npz file"),
    ("output-empty", ["--output", ""], "name the .npz file"),
    ("output-under-a-file", ["--output", "{notes}/x.npz"], "notes.txt is a file"),
    ("png-dir-is-a-file", ["--output", "{tmp}/s.npz", "--png-dir", "{notes}"], "name a folder"),
    ("zero-samples", ["--output", "{tmp}/s.npz", "--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    ("zero-batch", ["--output", "{tmp}/s.npz", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("zero-steps", ["--output", "{tmp}/s.npz", "--steps", "0"], "--steps must be at least 1, got 0"),
    ("negative-seed", ["--output", "{tmp}/s.npz", "--seed", "-1"], "--seed must be between 0"),
    (
        "model-not-a-model-folder",
        ["--output", "{tmp}/s.npz", "--model", "{folder}"],
        "is not a converted model folder",
    ),
    (
        "vae-missing",
        ["--output", "{tmp}/s.npz", "--vae", "{tmp}/no-vae"],
        "--vae {tmp}/no-vae: there is no such folder",
    ),
]


def _fill(arguments, paths, tmp_path):
    return [a.format(tmp=tmp_path, **paths) for a in arguments]


@pytest.mark.parametrize("case, arguments, fragment", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses_before_loading_the_model(case, arguments, fragment, tmp_path, capsys, monkeypatch):
    paths = _layout(tmp_path)
    before = _files(tmp_path)
    monkeypatch.setattr(ClassConditionalMoEPipeline, "from_pretrained", _must_not_run)
    argv = ["sample", "--model", DIGITS, "--no-progress", *_fill(arguments, paths, tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment.format(tmp=tmp_path) in err and err.count("\n") == 1 and "Traceback" not in err
    assert _files(tmp_path) == before  # nothing left behind


def _sample(output, *extra, steps=2):
    argv = ["sample", "--model", DIGITS, "--num-samples", "10", "--batch-size", "4", "--steps", str(steps)]
    return main([*argv, "--seed", "3", "--output", str(output), "--no-progress", *extra])


def test_nan_pixels_are_refused_and_leave_nothing_that_blocks_the_rerun(tmp_path, capsys, monkeypatch):
    def nan_images(pipe, indices, labels, seed, call_kwargs):
        return torch.full((len(indices), 1, 16, 16), float("nan"))

    monkeypatch.setattr(sampling, "generate_images", nan_images)
    assert _sample(tmp_path / "s.npz") == 2
    assert "NaN or infinite pixels in samples 0..3" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no parts folder, no run.json, no partial file
    monkeypatch.undo()
    assert _sample(tmp_path / "s.npz", steps=3) == 0  # other settings: nothing of the failed run is in the way


def test_ctrl_c_before_the_first_batch_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sampling.SampleRun, "run_batch", lambda self, batch: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as exit_:
        _sample(tmp_path / "s.npz")
    assert exit_.value.code == 130 and "interrupted; nothing was written." in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


EVALUATE_CASES = [
    # (case id, samples, extra arguments, message fragment)
    ("samples-missing", "{tmp}/none.npz", [], "samples {tmp}/none.npz does not exist"),
    ("samples-text-file", "{notes}", [], "is neither an image folder nor an .npz file"),
    ("samples-text-as-npz", "{text}", [], "text.npz is not a readable .npz file"),
    ("samples-truncated", "{truncated}", [], "truncated.npz is not a readable .npz file"),
    ("samples-corrupt-image", "{images}", [], "images/0.png is not a readable image"),
    ("reference-nan-mu", "{samples}", ["--reference", "{nan_stats}"], "nan-stats.npz: mu has 1 NaN"),
    ("reference-inf-sigma", "{samples}", ["--reference", "{inf_sigma}"], "inf-sigma.npz: sigma has 1 NaN"),
    ("reference-is-a-text-file", "{samples}", ["--reference", "{notes}"], "--reference {notes} is"),
    ("float-pixels-nan", "{float}", ["--protocol", "float-features"], "float.npz: arr_float has 1 NaN"),
    ("resolution-mismatch", "{samples}", ["--reference", "{large}"], "are 8x8 and the reference"),
    ("output-folder", "{samples}", ["--output", "{folder}", "--overwrite"], "is a folder"),
    ("output-exists", "{samples}", ["--output", "{existing}"], "pass --overwrite"),
    ("output-under-a-file", "{samples}", ["--output", "{notes}/r.json"], "notes.txt is a file"),
    ("zero-batch", "{samples}", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
]


class _NoFeatures:
    """Stands in for the Inception network: the checks must all happen before any feature is computed."""

    def __init__(self, *args, **kwargs):
        pass

    __call__ = _must_not_run


@pytest.mark.parametrize("case, samples, arguments, fragment", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_refuses_before_computing_features(case, samples, arguments, fragment, tmp_path, capsys, monkeypatch):
    paths = _layout(tmp_path)
    before = _files(tmp_path)
    monkeypatch.setattr(inception, "InceptionFeatures", _NoFeatures)
    reference = [] if "--reference" in arguments else ["--reference", paths["samples"]]
    argv = [samples, *reference, *arguments, "--inception-weights", paths["notes"], "--no-progress"]
    assert main(["evaluate", *_fill(argv, paths, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment.format(tmp=tmp_path, **paths) in err and err.count("\n") == 1 and "Traceback" not in err
    assert _files(tmp_path) == before


WEIGHTS_CASES = [
    ("folder", "{folder}", [], "is a folder; pass the weights file itself"),
    ("missing", "{tmp}/none.pth", [], "does not exist"),
    ("text-file", "{notes}", [], "is not the standard Inception weights file"),
    ("text-file-allowed", "{notes}", ["--allow-nonstandard-weights"], "is not a state dict of tensors"),
]


@pytest.mark.parametrize("case, weights, arguments, fragment", WEIGHTS_CASES, ids=[c[0] for c in WEIGHTS_CASES])
def test_evaluate_refuses_unusable_inception_weights(case, weights, arguments, fragment, tmp_path, capsys):
    paths = _layout(tmp_path)
    argv = [paths["samples"], "--reference", paths["samples"], "--inception-weights", weights, *arguments]
    assert main(["evaluate", *_fill(argv, paths, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_a_resolution_mismatch_can_be_allowed_and_then_warns(caplog):
    samples = ImageBatch("s.npz", np.zeros((2, 32, 32, 3), np.uint8), {})
    reference = ImageBatch("r.npz", np.zeros((2, 64, 64, 3), np.uint8), {})
    with pytest.raises(ValueError, match="--allow-resolution-mismatch"):
        check_resolutions(samples, reference)
    with caplog.at_level(logging.WARNING, logger="diffmoe_hf"):
        check_resolutions(samples, reference, allow_mismatch=True)
    assert "are 32x32 and the reference (r.npz) 64x64" in caplog.text
    statistics_only = ImageBatch("r.npz", None, {})
    check_resolutions(samples, statistics_only)  # a reference of statistics has no resolution to compare


def test_evaluate_digits_keeps_an_existing_output(tmp_path, capsys, monkeypatch):
    output = tmp_path / "metrics.json"
    output.write_text("{}")
    monkeypatch.setattr(cli, "load_pipeline_with_expert_offload", _must_not_run)
    assert main(["evaluate-digits", "--model", DIGITS, "--output", str(output)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and output.read_text() == "{}"
    assert main(["evaluate-digits", "--model", DIGITS, "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
