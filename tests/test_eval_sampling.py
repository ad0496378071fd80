"""`diffmoe sample`: per-sample noise and labels, 1 vs 2 processes, batch sizes, resume, format (CPU, tiny models)."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.cli import main
from diffmoe_hf.embedded_models import default_models
from diffmoe_hf.evaluation import sampling
from diffmoe_hf.evaluation.sampling import generate_images, sample_labels, sample_noise

from .conftest import REPO_ROOT
from .training_helpers import save_tiny_pipeline


DIGITS = default_models()["digits-jitmoe"]


def _sample(model, output, *extra, num_samples=10, batch_size=4):
    argv = [
        "sample",
        "--model",
        model,
        "--num-samples",
        str(num_samples),
        "--batch-size",
        str(batch_size),
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        str(output),
        "--no-progress",
        *extra,
    ]
    assert main(argv) == 0


def test_labels_are_balanced_or_random_and_fixed_by_the_seed():
    labels = sample_labels(1003, 10, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [100] * 7 + [101] * 3
    assert all(sorted(labels[b : b + 10]) == list(range(10)) for b in range(0, 1000, 10))  # blocks of every class
    assert np.array_equal(labels[:500], sample_labels(500, 10, seed=0))  # a label does not depend on num_samples
    assert np.array_equal(labels, sample_labels(1003, 10, seed=0))
    assert not np.array_equal(labels, sample_labels(1003, 10, seed=1))
    assert not np.array_equal(labels[:20], np.arange(20) % 10)  # shuffled, so a batch mixes classes at random
    random = sample_labels(1000, 10, seed=0, mode="random")
    assert random.min() >= 0 and random.max() <= 9 and len(set(np.bincount(random).tolist())) > 1
    assert np.array_equal(random[:500], sample_labels(500, 10, seed=0, mode="random"))  # a prefix keeps its labels
    with pytest.raises(ValueError, match="Unknown label mode"):
        sample_labels(10, 10, 0, mode="uniform")


def test_noise_of_a_sample_depends_only_on_seed_and_index():
    together = sample_noise([5, 6, 7], (2, 3, 3), seed=1)
    assert torch.equal(together[1], sample_noise([6], (2, 3, 3), seed=1)[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together[0], sample_noise([5], (2, 3, 3), seed=2)[0])


def test_output_is_the_adm_format_and_class_balanced(tmp_path):
    _sample(DIGITS, tmp_path / "s.npz", "--png-dir", str(tmp_path / "png"), num_samples=20, batch_size=8)
    with np.load(tmp_path / "s.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 1)
    assert np.bincount(labels).tolist() == [2] * 10
    assert sorted(os.listdir(tmp_path / "png"))[:2] == ["000000.png", "000001.png"]
    assert not (tmp_path / "s.npz.parts").exists()  # parts removed once the file is complete
    assert main(["sample", "--model", DIGITS, "--num-samples", "2", "--output", str(tmp_path / "s.npz")]) == 2


@pytest.mark.parametrize("family", ["jit", "diff-moe"])
def test_batch_size_changes_images_only_by_float_summation_order(family, tmp_path):
    """Per-token routing families: a sample is the same in any batch (DDPM's step noise is per sample too); the float
    difference is a few fp32 roundings, so uint8 pixels differ by at most one level."""
    pipe = ClassConditionalMoEPipeline.from_pretrained(save_tiny_pipeline(str(tmp_path / "m"), family))
    pipe.set_progress_bar_config(disable=True)
    indices, labels = np.arange(6), np.array([0, 1, 2, 0, 1, 2])
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0}
    whole = generate_images(pipe, indices, labels, seed=0, call_kwargs=kwargs)
    split = torch.cat([generate_images(pipe, indices[i : i + 2], labels[i : i + 2], 0, kwargs) for i in (0, 2, 4)])
    # fp32 rounding over (layers x steps) stacked reductions of at most 64 terms, images in [0, 1]
    depth = pipe.transformer.config.num_layers * 3 * (2 if family == "diff-moe" else 1)
    assert torch.allclose(whole, split, rtol=0, atol=2 * depth * 64 * torch.finfo(torch.float32).eps)
    assert np.abs(sampling.to_uint8(whole).astype(int) - sampling.to_uint8(split)).max() <= 1
    other_seed = generate_images(pipe, indices[:2], labels[:2], seed=1, call_kwargs=kwargs)
    assert not torch.allclose(other_seed, whole[:2])


def test_uint8_quantisation_is_the_adm_one():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0]).view(1, 1, 1, 5)  # model range [-1, 1]
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # DiT / ADM sample_ddp.py
    assert np.array_equal(sampling.to_uint8(x / 2 + 0.5)[0, 0, :, 0], expected.view(-1).numpy())


def test_resume_after_ctrl_c_or_a_damaged_part_gives_the_identical_file(tmp_path, monkeypatch, capsys, caplog):
    _sample(DIGITS, tmp_path / "full.npz")
    original_run_batch, calls = sampling.SampleRun.run_batch, []

    def killed_after_two_batches(self, batch):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch)
        original_run_batch(self, batch)

    monkeypatch.setattr(sampling.SampleRun, "run_batch", killed_after_two_batches)
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C: one line, status 130, the finished batches kept
        _sample(DIGITS, tmp_path / "resumed.npz")
    parts_dir = tmp_path / "resumed.npz.parts"
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "Traceback" not in err
    assert f"2 finished batches (8 of 10 samples) are kept in {parts_dir}; rerun the same command to continue." in err
    parts = sorted(os.listdir(parts_dir))
    assert parts == ["batch-000000.npz", "batch-000001.npz", "run.json"] and not (tmp_path / "resumed.npz").exists()
    monkeypatch.setattr(sampling.SampleRun, "run_batch", original_run_batch)
    # other settings are refused, and the parts are kept
    assert (
        main(
            [
                "sample",
                "--model",
                DIGITS,
                "--num-samples",
                "10",
                "--batch-size",
                "4",
                "--steps",
                "3",
                "--seed",
                "3",
                "--output",
                str(tmp_path / "resumed.npz"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert len(os.listdir(parts_dir)) == 3
    damaged = parts_dir / "batch-000001.npz"
    damaged.write_bytes(damaged.read_bytes()[:200])  # a truncated copy: not a readable zip
    with caplog.at_level(logging.WARNING, logger="diffmoe_hf"):
        _sample(DIGITS, tmp_path / "resumed.npz")
    assert f"{damaged} is not a readable .npz file" in caplog.text and "sampled again" in caplog.text
    with np.load(tmp_path / "full.npz") as full, np.load(tmp_path / "resumed.npz") as resumed:
        assert np.array_equal(full["arr_0"], resumed["arr_0"]) and np.array_equal(full["arr_1"], resumed["arr_1"])


def test_one_and_two_processes_write_the_identical_file(tmp_path):
    """DiffMoE routes over the batch: batches are fixed index ranges, so its samples are bit-identical on 2 ranks."""
    model = save_tiny_pipeline(str(tmp_path / "m"), "diffmoe-dts")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    arguments = [
        "-m",
        "diffmoe_hf",
        "sample",
        "--model",
        model,
        "--num-samples",
        "11",
        "--batch-size",
        "3",
        "--steps",
        "2",
        "--seed",
        "3",
        "--guidance-scale",
        "1.5",
        "--no-progress",
        "--output",
    ]
    launchers = {
        "one": [sys.executable],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }
    for name, launcher in launchers.items():  # same threads per process: only the process count differs
        command = [*launcher, *arguments, str(tmp_path / f"{name}.npz")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
