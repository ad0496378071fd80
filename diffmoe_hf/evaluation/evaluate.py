"""`diffmoe evaluate`: FID, sFID, Inception Score, precision and recall of a sample batch against a reference, under a
named protocol (how the papers measured), as a JSON-ready dict that records every setting.

Protocols:

| name | images | resize to 299 | metrics | reference | used by |
|---|---|---|---|---|---|
| `adm` | uint8 | TensorFlow-1 bilinear | FID, sFID, IS (splits of 5000), precision / recall (k = 3) | ADM batch (images and/or `mu`, `sigma`, `mu_s`, `sigma_s`) | DiT, DiT-MoE, Diff-MoE (Cheng et al.) |
| `jit` | uint8 | TensorFlow-1 bilinear | FID, IS (10 shuffled splits, mean and std) | statistics file (`mu`, `sigma`) or images | JiT (torch-fidelity) |
| `float-features` | un-rounded float pixels in [0, 255] | `F.interpolate` bilinear | FID, IS (splits of 5000) | ADM statistics or images | DiffMoE (Shi et al.), DSMoE (pytorch-fid input path) |

Inputs are `.npz` batches (ADM format: `arr_0` (N, H, W, C); `diffmoe sample --keep-float` adds `arr_float`, the
un-rounded pixels the float-features protocol reads) or folders of images (sorted by name). Grayscale images are
repeated to 3 channels.
"""

import os
from dataclasses import asdict, dataclass

import numpy as np

from . import metrics
from .inception import InceptionFeatures


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Protocol:
    name: str
    float_pixels: bool  # features from un-rounded float pixels (pytorch-fid's input path) instead of uint8
    inception_score: str  # "adm-splits-5000" or "fidelity-10-shuffled-splits"
    spatial: bool  # sFID
    precision_recall: bool


PROTOCOLS = {
    "adm": Protocol("adm", False, "adm-splits-5000", spatial=True, precision_recall=True),
    "jit": Protocol("jit", False, "fidelity-10-shuffled-splits", spatial=False, precision_recall=False),
    "float-features": Protocol("float-features", True, "adm-splits-5000", spatial=False, precision_recall=False),
}


@dataclass
class ImageBatch:
    """Images of one side of the comparison, and the statistics stored with them (ADM reference batches)."""

    path: str
    images: np.ndarray | None  # (N, H, W, 3) uint8, or float32 in [0, 255] for float-pixel protocols
    statistics: dict[str, metrics.FeatureStatistics]  # "pool" / "spatial" -> precomputed statistics

    def describe(self) -> dict:
        info = {"path": self.path, "precomputed_statistics": sorted(self.statistics)}
        if self.images is not None:
            info.update(count=len(self.images), shape=list(self.images.shape[1:]), dtype=str(self.images.dtype))
        return info


def _as_rgb(images: np.ndarray, path: str) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: expected images (N, H, W, 1 or 3), got shape {images.shape}.")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_batch(path: str, float_pixels: bool = False, samples: bool = False) -> ImageBatch:
    """
    Reads a `.npz` batch or an image folder.

    Args:
        path: `.npz` (ADM format) or a folder of images.
        float_pixels: Read the un-rounded float pixels (`arr_float`) for the float-features protocol.
        samples: The batch is the sample side: with `float_pixels` it must hold `arr_float` (rounded pixels would
            silently measure something else); a reference of real images is uint8 by nature.
    """
    if float_pixels and samples and (os.path.isdir(path) or "arr_float" not in _npz_keys(path)):
        raise ValueError(
            f"The float-features protocol scores un-rounded pixels, and {path} has none (no arr_float). Sample with "
            "`diffmoe sample --keep-float`, or use --protocol adm for uint8 samples."
        )
    if os.path.isdir(path):
        from PIL import Image

        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        images = [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
        if len({image.shape for image in images}) != 1:
            raise ValueError(f"The images in {path} have different sizes; resize them to one size first.")
        return ImageBatch(path, np.stack(images), {})
    if not path.endswith(".npz") or not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is neither an image folder nor an .npz file.")
    with np.load(path) as data:
        statistics = {}
        if "mu" in data and "sigma" in data:
            statistics["pool"] = metrics.FeatureStatistics(data["mu"], data["sigma"])
        if "mu_s" in data and "sigma_s" in data:
            statistics["spatial"] = metrics.FeatureStatistics(data["mu_s"], data["sigma_s"])
        images = None
        if float_pixels and "arr_float" in data:
            images = data["arr_float"].astype(np.float32)
        elif "arr_0" in data:
            images = data["arr_0"]
        if images is None and not statistics:
            raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma).")
    if images is not None:
        images = _as_rgb(images, path)
        if not float_pixels and images.dtype != np.uint8:
            raise ValueError(f"{path}: this protocol takes uint8 images (ADM format), got {images.dtype}.")
    return ImageBatch(path, images, statistics)


def _npz_keys(path: str) -> list[str]:
    if not path.endswith(".npz") or not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is neither an image folder nor an .npz file.")
    with np.load(path) as data:
        return list(data.keys())


def compute_features(
    images: np.ndarray,
    network: InceptionFeatures,
    protocol: Protocol,
    batch_size: int,
    state,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """
    Inception features of (N, H, W, 3) images, computed in batches, split over the processes of `state` (contiguous
    ranges) and gathered in order on every process.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    bounds = np.linspace(0, len(images), state.num_processes + 1).astype(int)
    start, end = bounds[state.process_index], bounds[state.process_index + 1]
    parts = []
    bar = tqdm(total=len(images), desc=desc, unit="image", disable=not (progress and state.is_main_process))
    for first in range(start, end, batch_size):
        batch = images[first : min(first + batch_size, end)]
        parts.append(network(batch, float_pixels=protocol.float_pixels))
        bar.update(len(batch) * state.num_processes)  # the processes advance together
    bar.close()
    mine = {
        key: np.concatenate([p[key] for p in parts]) if parts else np.zeros((0, 1), np.float32)
        for key in ("pool", "spatial", "logits")
    }
    if state.num_processes == 1:
        return mine
    gathered = gather_object([mine])
    return {key: np.concatenate([g[key] for g in gathered if len(g[key])]) for key in mine}


def _statistics(batch: ImageBatch, features: dict | None, key: str) -> metrics.FeatureStatistics:
    if key in batch.statistics:
        return batch.statistics[key]
    if features is None:
        raise ValueError(f"{batch.path} has neither images nor '{key}' statistics.")
    return metrics.FeatureStatistics.of(features[key])


def evaluate_batches(
    samples: ImageBatch,
    reference: ImageBatch,
    network: InceptionFeatures,
    protocol: Protocol,
    batch_size: int,
    state,
    progress: bool = True,
) -> dict:
    """The metrics of `samples` against `reference` under `protocol` (every process computes; all return the same)."""
    if samples.images is None:
        raise ValueError(f"{samples.path} holds no images (arr_0); the sample side needs images.")
    sample_features = compute_features(samples.images, network, protocol, batch_size, state, progress, "samples")
    needs_reference_images = (
        protocol.precision_recall
        or "pool" not in reference.statistics
        or (protocol.spatial and "spatial" not in reference.statistics)
    )
    reference_features = None
    if needs_reference_images and reference.images is not None:
        reference_features = compute_features(
            reference.images, network, protocol, batch_size, state, progress, "reference"
        )
    results = {}
    for name, key in (("fid", "pool"), ("sfid", "spatial")):
        if key == "pool" or protocol.spatial:
            sample_statistics = metrics.FeatureStatistics.of(sample_features[key])
            results[name] = metrics.frechet_distance(
                sample_statistics, _statistics(reference, reference_features, key)
            )
    if protocol.inception_score == "adm-splits-5000":
        results["inception_score"] = metrics.inception_score(sample_features["logits"])
    else:
        results["inception_score"], results["inception_score_std"] = metrics.inception_score_splits(
            sample_features["logits"]
        )
    if protocol.precision_recall:
        if reference_features is None:
            results["precision"] = results["recall"] = None  # statistics alone cannot give them
        else:
            results["precision"], results["recall"] = metrics.precision_recall(
                reference_features["pool"], sample_features["pool"], device=network.device
            )
    return results


def evaluation_record(
    protocol: Protocol,
    network: InceptionFeatures,
    samples: ImageBatch,
    reference: ImageBatch,
    results: dict,
    batch_size: int,
) -> dict:
    """The JSON written by `diffmoe evaluate`: the metrics and everything that produced them."""
    import torch

    from .inception import load_inception_module

    fidelity = load_inception_module()
    return {
        "protocol": asdict(protocol),
        "metrics": results,
        "samples": samples.describe(),
        "reference": reference.describe(),
        "inception": {
            "weights": os.path.abspath(network.weights_path),
            "sha256": network.sha256,
            "standard": network.standard,
            "network": f"{fidelity.__name__}.FeatureExtractorInceptionV3",
            "torch_fidelity": _version("torch-fidelity"),
            "torch": torch.__version__,
        },
        "settings": {
            "batch_size": batch_size,
            "device": str(network.device),
            "precision_recall_k": 3,
            "inception_score_split_size": 5000 if protocol.inception_score == "adm-splits-5000" else None,
            "diffmoe_hf": _version("diffmoe-hf"),
        },
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def summary_line(record: dict) -> str:
    """One line: protocol and every metric."""
    values = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} n/a" for k, v in record["metrics"].items())
    count, reference = record["samples"].get("count"), record["reference"]["path"]
    return f"{record['protocol']['name']}: {values} ({count} samples vs {reference})"
