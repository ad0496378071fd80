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
repeated to 3 channels. Non-finite statistics or float pixels are refused, naming the file and the array.

Resolution. Every protocol resizes both batches to 299 x 299 whatever their size (ADM's evaluator does so without
checking), so a reference at another resolution than the samples gives a number, but not one comparable with the
papers': they score each resolution against the reference batch of that resolution (ADM publishes one per resolution).
`check_resolutions` refuses such a pair unless the caller allows it, and then warns.
"""

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from . import metrics
from .inception import InceptionFeatures
from .npz_files import read_npz


logger = logging.getLogger(__name__)


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


def _finite(array: np.ndarray, path: str, name: str) -> np.ndarray:
    """`array` if every value is finite; else a message naming the file, the array and how many values are not."""
    bad = np.size(array) - np.count_nonzero(np.isfinite(array))
    if bad:
        raise ValueError(
            f"{path}: {name} has {bad} NaN or infinite values of {np.size(array)}; the file is damaged or was "
            "written by a broken run. Recompute it."
        )
    return array


def _read_image_folder(path: str) -> np.ndarray:
    """(N, H, W, 3) uint8 images of a folder and its sub-folders (e.g. a training folder with one sub-folder per
    class), sorted by their paths in it; an unreadable file is named."""
    from PIL import Image

    names = sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, files in os.walk(path)
        for name in files
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    images = []
    for name in names:
        file = os.path.join(path, name)
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{file} is not a readable image ({err}); replace or remove it.") from None
    if len({image.shape for image in images}) != 1:
        raise ValueError(f"The images in {path} have different sizes; resize them to one size first.")
    return np.stack(images)


def check_batch_path(path: str, option: str) -> None:
    """Refuses a batch path that is neither an existing image folder nor an existing `.npz` file."""
    if os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path} does not exist; give an .npz batch or an image folder.")
    if not path.endswith(".npz"):
        raise ValueError(f"{option} {path} is neither an image folder nor an .npz file.")


_NO_FLOAT_PIXELS = (
    "The float-features protocol scores un-rounded pixels, and {path} has none (no arr_float). Sample with "
    "`diffmoe sample --keep-float`, or use --protocol adm for uint8 samples."
)
_STATISTICS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def load_batch(path: str, float_pixels: bool = False, samples: bool = False) -> ImageBatch:
    """
    Reads a `.npz` batch or an image folder.

    Args:
        path: `.npz` (ADM format) or a folder of images.
        float_pixels: Read the un-rounded float pixels (`arr_float`) for the float-features protocol.
        samples: The batch is the sample side: it must hold images, and with `float_pixels` un-rounded ones
            (`arr_float`: rounded pixels would silently measure something else); a reference of real images is uint8
            by nature.
    """
    check_batch_path(path, "samples" if samples else "--reference")
    if os.path.isdir(path):
        if float_pixels and samples:
            raise ValueError(_NO_FLOAT_PIXELS.format(path=path))
        return ImageBatch(path, _read_image_folder(path), {})
    data = read_npz(path, ["mu", "sigma", "mu_s", "sigma_s", "arr_0", *(["arr_float"] if float_pixels else [])])
    image_key = "arr_float" if float_pixels and "arr_float" in data else "arr_0"
    if float_pixels and samples and image_key != "arr_float":
        raise ValueError(_NO_FLOAT_PIXELS.format(path=path))
    statistics = {
        key: metrics.FeatureStatistics(_finite(data[mu], path, mu), _finite(data[sigma], path, sigma))
        for key, (mu, sigma) in _STATISTICS.items()
        if mu in data and sigma in data
    }
    images = data.get(image_key)
    if images is None and samples:
        raise ValueError(f"{path} holds no images (arr_0); the sample side needs images.")
    if images is None and not statistics:
        raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma).")
    if images is not None:
        images = _as_rgb(images, path)
        if image_key == "arr_float":
            images = _finite(images.astype(np.float32), path, image_key)
        elif images.dtype != np.uint8:
            raise ValueError(f"{path}: this protocol takes uint8 images (ADM format), got {images.dtype}.")
    return ImageBatch(path, images, statistics)


def check_resolutions(samples: ImageBatch, reference: ImageBatch, allow_mismatch: bool = False) -> None:
    """
    Refuses (or, with `allow_mismatch`, warns about) samples and reference images of different sizes; see the module
    docstring. A reference of statistics alone has no known resolution and is not checked.
    """
    if samples.images is None or reference.images is None:
        return
    sample_size, reference_size = samples.images.shape[1:3], reference.images.shape[1:3]
    if sample_size == reference_size:
        return
    message = (
        f"the samples ({samples.path}) are {sample_size[0]}x{sample_size[1]} and the reference ({reference.path}) "
        f"{reference_size[0]}x{reference_size[1]}: both are resized to 299x299, and the scores are not comparable "
        "with published ones, which use a reference batch at the samples' resolution"
    )
    if not allow_mismatch:
        raise ValueError(f"Refused: {message}. Use such a reference, or pass --allow-resolution-mismatch.")
    logger.warning(f"WARNING: {message}.")


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


def _check_features(features: dict[str, np.ndarray], path: str, network: InceptionFeatures) -> None:
    """Refuses non-finite Inception features (finite pixels give finite features unless the weights are broken)."""
    for key, values in features.items():
        if not np.isfinite(values).all():
            raise ValueError(
                f"The Inception {key} features of {path} are not all finite, so no metric is reported; the weights "
                f"file {network.weights_path} is broken. Use the standard one."
            )


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
    distances: str = "float16",
) -> dict:
    """
    The metrics of `samples` against `reference` under `protocol` (every process computes; all return the same);
    `distances` is the precision / recall distance computation (`metrics.precision_recall`: "float16" is ADM's).
    """
    if samples.images is None:
        raise ValueError(f"{samples.path} holds no images (arr_0); the sample side needs images.")
    sample_features = compute_features(samples.images, network, protocol, batch_size, state, progress, "samples")
    _check_features(sample_features, samples.path, network)
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
        _check_features(reference_features, reference.path, network)
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
                reference_features["pool"], sample_features["pool"], distances=distances, device=network.device
            )
    return results


def evaluation_record(
    protocol: Protocol,
    network: InceptionFeatures,
    samples: ImageBatch,
    reference: ImageBatch,
    results: dict,
    batch_size: int,
    distances: str = "float16",
    resolution_mismatch_allowed: bool = False,
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
            "precision_recall_distances": distances if protocol.precision_recall else None,
            "precision_recall_block": metrics.ADM_BATCH if protocol.precision_recall else None,
            "resolution_mismatch_allowed": resolution_mismatch_allowed,
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
