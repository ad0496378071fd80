"""The Inception network (random weights in the standard file's format), the protocols, and `diffmoe evaluate` end to
end on the shipped digits model (offline: nothing downloads)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffmoe_hf.cli import main
from diffmoe_hf.embedded_models import default_models
from diffmoe_hf.evaluation import inception
from diffmoe_hf.evaluation.evaluate import load_batch
from diffmoe_hf.evaluation.inception import InceptionFeatures, load_inception_module
from diffmoe_hf.evaluation.metrics import FeatureStatistics

from .conftest import REPO_ROOT
from .helpers import random_inception_state_dict


DIGITS = default_models()["digits-jitmoe"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "random-inception.pth")
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def network(weights):
    return InceptionFeatures(weights, allow_nonstandard=True)


def test_inception_module_loads_without_importing_torchvision():
    code = (
        "import sys; from diffmoe_hf.evaluation.inception import load_inception_module as load; load(); "
        "assert 'torchvision' not in sys.modules and 'torch_fidelity' not in sys.modules"
    )
    assert os.system(f'{sys.executable} -c "{code}"') == 0


def test_weights_are_checked(weights, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not the standard Inception weights"):
        InceptionFeatures(weights)
    pickled = tmp_path / "code.pth"
    torch.save({"fc.weight": torch.zeros(1), "note": object()}, pickled)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        InceptionFeatures(str(pickled), allow_nonstandard=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, so nothing is downloaded"):
        inception.resolve_weights(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception.resolve_weights(str(tmp_path / "missing.pth"))


def test_features_and_the_protocols_input_paths(network):
    images = np.random.default_rng(0).integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    features = network(images)
    assert {k: v.shape for k, v in features.items()} == {"pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
    # spatial: mixed_6/conv (Mixed_6d's 1x1 branch after ReLU), first 7 channels in TensorFlow's (H, W, C) order
    net, fidelity = network.network, load_inception_module()
    with torch.no_grad():
        x = fidelity.interpolate_bilinear_2d_like_tensorflow1x(
            torch.as_tensor(images).permute(0, 3, 1, 2).float(), size=(299, 299), align_corners=False
        )
        x = (x - 128) / 128
        for name in inception._TRUNK[: inception._TRUNK.index("Mixed_6d")]:
            x = getattr(net, name)(x)
        branch = net.Mixed_6d.branch1x1(x)
    assert np.array_equal(features["spatial"], branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy())
    logits = features["pool"] @ net.fc.weight.T.numpy()  # bias-free, as ADM's softmax graph
    terms = 2048 * np.abs(features["pool"]).max() * np.abs(net.fc.weight.numpy()).max()  # bounds sum |a_i b_i|
    assert np.allclose(features["logits"], logits, rtol=0, atol=2 * 2048 * np.finfo(np.float32).eps * terms)
    assert np.std(features["pool"], axis=0).max() > 0  # images give different features
    # float-features: the same integer pixels through pytorch-fid's resize and scaling give other features
    float_features = network(images.astype(np.float32), float_pixels=True)
    assert not np.allclose(float_features["pool"], features["pool"])
    with pytest.raises(ValueError, match="takes uint8"):
        network(images.astype(np.float32))


def test_evaluate_end_to_end_on_the_digits_model(weights, tmp_path, capsys):
    common = ["--model", DIGITS, "--num-samples", "5", "--batch-size", "5", "--steps", "3", "--no-progress"]
    assert main(["sample", *common, "--seed", "0", "--output", str(tmp_path / "a.npz")]) == 0
    assert (
        main(["sample", *common, "--seed", "1", "--png-dir", str(tmp_path / "b"), "--output", str(tmp_path / "b.npz")])
        == 0
    )
    evaluate = [
        "evaluate",
        str(tmp_path / "a.npz"),
        "--reference",
        str(tmp_path / "b"),
        "--inception-weights",
        weights,
        "--allow-nonstandard-weights",
        "--no-progress",
        "--output",
        str(tmp_path / "adm.json"),
    ]
    assert main(evaluate) == 0
    record = json.loads((tmp_path / "adm.json").read_text())
    assert record["protocol"]["name"] == "adm" and record["inception"]["standard"] is False
    assert record["inception"]["sha256"] == inception.file_sha256(weights)
    assert record["samples"]["count"] == 5 and record["reference"]["count"] == 5
    found = record["metrics"]
    assert set(found) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert found["fid"] > 0 and found["sfid"] > 0 and 1 <= found["inception_score"] and 0 <= found["precision"] <= 1
    assert "adm: fid" in capsys.readouterr().out
    assert main(evaluate) == 2 and "--overwrite" in capsys.readouterr().err  # an existing record is kept
    float_features = [*evaluate[:-2], "--protocol", "float-features", "--output", str(tmp_path / "f.json")]
    assert main(float_features) == 2 and "--keep-float" in capsys.readouterr().err  # no un-rounded pixels in a.npz


class _PixelFeatures:
    """A stand-in feature network (deterministic pixel statistics), for checks of the evaluation plumbing."""

    device = torch.device("cpu")

    def __call__(self, images, float_pixels=False):
        x = torch.as_tensor(np.asarray(images), dtype=torch.float64).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 3).flatten(1)  # (B, 27)
        return {
            "pool": pooled.float().numpy(),
            "spatial": pooled[:, :12].float().numpy(),
            "logits": (pooled[:, :10] / 50).float().numpy(),
        }


def test_a_reference_as_statistics_or_as_images_gives_the_same_scores(tmp_path):
    from accelerate import PartialState

    from diffmoe_hf.evaluation.evaluate import PROTOCOLS, evaluate_batches

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "images.npz", arr_0=rng.integers(30, 220, (50, 8, 8, 3), dtype=np.uint8))
    network, state, protocol = _PixelFeatures(), PartialState(cpu=True), PROTOCOLS["adm"]
    reference = network(load_batch(str(tmp_path / "images.npz")).images)
    pool, spatial = FeatureStatistics.of(reference["pool"]), FeatureStatistics.of(reference["spatial"])
    np.savez(tmp_path / "stats.npz", mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    samples = load_batch(str(tmp_path / "samples.npz"))
    scores = {
        name: evaluate_batches(
            samples, load_batch(str(tmp_path / f"{name}.npz")), network, protocol, 16, state, progress=False
        )
        for name in ("images", "stats")
    }
    assert scores["images"]["fid"] == scores["stats"]["fid"] and scores["images"]["sfid"] == scores["stats"]["sfid"]
    assert scores["stats"]["precision"] is None and 0 < scores["images"]["precision"] < 1
    itself = evaluate_batches(samples, samples, network, protocol, 16, state, progress=False)
    # FID(A, A) = 0 up to the square roots of eigenvalues off by eps * the largest: 2 * D * sqrt(eps) * |S|
    sigma_norm = np.linalg.norm(FeatureStatistics.of(network(samples.images)["pool"]).sigma, 2)
    assert abs(itself["fid"]) <= 2 * 27 * np.sqrt(np.finfo(np.float64).eps) * sigma_norm
    assert itself["precision"] == itself["recall"] == 1.0
    jit = evaluate_batches(
        samples, load_batch(str(tmp_path / "stats.npz")), network, PROTOCOLS["jit"], 16, state, progress=False
    )
    assert set(jit) == {"fid", "inception_score", "inception_score_std"} and jit["fid"] == scores["stats"]["fid"]


def test_two_processes_give_the_same_record(weights, tmp_path):
    """`diffmoe evaluate` under torchrun (2 CPU processes, gloo): each process takes a contiguous range of images in
    the same batches as one process would, so the gathered features and every metric are identical."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "reference.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    arguments = [
        "-m",
        "diffmoe_hf",
        "evaluate",
        str(tmp_path / "samples.npz"),
        "--reference",
        str(tmp_path / "reference.npz"),
        "--protocol",
        "jit",
        "--batch-size",
        "2",
        "--inception-weights",
        weights,
        "--allow-nonstandard-weights",
        "--no-progress",
        "--output",
    ]
    launchers = {
        "one": [sys.executable],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }
    for name, launcher in launchers.items():
        result = subprocess.run(
            [*launcher, *arguments, str(tmp_path / f"{name}.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in launchers)
    assert one["metrics"] == two["metrics"] and one["samples"]["count"] == 4
