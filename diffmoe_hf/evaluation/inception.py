"""The Inception-V3 feature network of FID (torch-fidelity's TF-exact port of the 2015-12-05 TensorFlow graph).

Network. torch-fidelity's `FeatureExtractorInceptionV3` reproduces the TensorFlow graph that the ADM evaluator runs
(its TF1 bilinear resize, `(x - 128) / 128`, pool3 features, the bias-free logits) to about 1e-6 relative on FID.
We use that module and only it:

- `import torch_fidelity` runs the package's `__init__`, which imports its CLIP / DINOv2 / VGG extractors and datasets,
  which import torchvision. The Inception module needs none of that. torchvision is also the problem: beside the CPU
  wheel of torch 2.13.0 that this project installs, PyPI's torchvision 0.28.0 (which declares torch==2.13.0) fails to
  import ("operator torchvision::nms does not exist"), and an installed-but-broken torchvision also breaks
  `diffusers.training_utils`; letting pip resolve `torch-fidelity` instead takes torchvision 0.29.1 and replaces torch
  by a CUDA 2.14.1 build of several GB. So torch-fidelity is installed without its dependencies
  (`pip install --no-deps torch-fidelity==0.4.0`; its own needs, numpy, Pillow, torch and tqdm, are ours too), and
  `load_inception_class` imports its Inception module file without running the package `__init__`. Where a working
  torchvision is installed and `torch_fidelity` is already imported, that module is used as it is.
- sFID's spatial features are the first 7 channels of `mixed_6/conv` (the 1x1 branch of `Mixed_6d`, 17 x 17 x 192,
  after its ReLU) flattened in TensorFlow's (H, W, C) order, 2023 values; a forward hook of the same network reads them.

Weights. `resolve_weights` never downloads silently: an explicit file (`--inception-weights`), else torch-fidelity's
file in the torch hub cache, else a download only when online and `HF_HUB_OFFLINE` is not set (with a message). The
standard file is `weights-inception-2015-12-05-6726825d.pth` (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
holds the same weights); its SHA-256 starts with `6726825d` (torch hub's naming rule), which is checked. The file is
read with `torch.load(weights_only=True)` first, so a file that holds anything but tensors is refused before the
library loads it.
"""

import functools
import hashlib
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


STANDARD_SHA256_PREFIX = "6726825d"
STANDARD_FILE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INSTALL_HINT = "pip install --no-deps torch-fidelity==0.4.0"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 17 * 17 * SPATIAL_CHANNELS, 1008
# the network's modules in forward order (torch-fidelity's FeatureExtractorInceptionV3), up to the pool3 features
_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "MaxPool_1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "MaxPool_2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "AvgPool",
)


@functools.cache
def load_inception_module():
    """torch-fidelity's `feature_extractor_inceptionv3` module, imported without the package `__init__` (which needs
    torchvision) unless the package is already imported; see the module docstring."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if "torch_fidelity" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise ImportError(f"The FID metrics need torch-fidelity's Inception network: {INSTALL_HINT}")
    before = set(sys.modules)
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # a package shell: __init__ is not run
    try:
        return importlib.import_module(name)
    finally:
        # forget the shell and what it loaded, so that a later `import torch_fidelity` imports the real package
        for key in set(sys.modules) - before:
            if key == "torch_fidelity" or key.startswith("torch_fidelity."):
                del sys.modules[key]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_weights(path: str | None = None) -> str:
    """
    The Inception weights file to use: `path` if given, else the standard file in the torch hub cache, else downloaded
    there (only when online and `HF_HUB_OFFLINE` is unset).
    """
    if path is not None:
        if os.path.isdir(path):
            raise IsADirectoryError(f"--inception-weights {path} is a folder; pass the weights file itself.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception-weights {path} does not exist.")
        return path
    url = load_inception_module().URL_INCEPTION_V3
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.isfile(cached):
        return cached
    if _offline():
        raise FileNotFoundError(
            f"No Inception weights: HF_HUB_OFFLINE is set, so nothing is downloaded. Pass --inception-weights with "
            f"{STANDARD_FILE_NAMES[0]} (from {url}), or put it at {cached}."
        )
    print(
        f"Downloading the Inception weights {url} to {cached} (pass --inception-weights to use a local file)",
        file=sys.stderr,
    )
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, hash_prefix=STANDARD_SHA256_PREFIX)
    except OSError as err:
        message = f"Could not download {url} ({err}); pass --inception-weights with a local copy."
        raise FileNotFoundError(message) from err
    return cached


class InceptionFeatures:
    """
    FID's Inception-V3 with three feature sets per image: pool3 (2048), spatial (2023, sFID), bias-free logits (1008).

    Args:
        weights_path: A weights file in the standard file's format (a state dict of torch-fidelity's
            `FeatureExtractorInceptionV3`).
        device: Where the network runs.
        allow_nonstandard: Accept weights whose SHA-256 is not the standard file's (tests, other conversions); the
            result then records `standard: false`.
    """

    def __init__(self, weights_path: str, device: str | torch.device = "cpu", allow_nonstandard: bool = False):
        self.sha256 = file_sha256(weights_path)
        self.standard = self.sha256.startswith(STANDARD_SHA256_PREFIX)
        if not self.standard and not allow_nonstandard:
            raise ValueError(
                f"{weights_path} is not the standard Inception weights file (SHA-256 {self.sha256[:16]}..., expected "
                f"{STANDARD_SHA256_PREFIX}...): its scores would not be comparable with published ones. Use "
                f"{STANDARD_FILE_NAMES[0]}, or pass --allow-nonstandard-weights."
            )
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)  # refuses anything but tensors
        except Exception as err:
            raise ValueError(f"{weights_path} is not a state dict of tensors ({err}).") from err
        module = load_inception_module()
        self.weights_path = weights_path
        self.network = module.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        ).to(device)
        self._resize_like_tensorflow = module.interpolate_bilinear_2d_like_tensorflow1x
        self.device = torch.device(device)
        self._spatial = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # (B, 192, 17, 17) after ReLU -> TensorFlow's NHWC order, first 7 channels, flattened: (B, 2023)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float().clone()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, float_pixels: bool = False) -> dict[str, np.ndarray]:
        """
        Features of a batch.

        Args:
            images: (B, H, W, 3) pixels in [0, 255]; uint8 unless `float_pixels`.
            float_pixels: The float-features protocol (DiffMoE of Shi et al., DSMoE; pytorch-fid's input path):
                un-rounded float pixels, scaled to [0, 1], resized with `F.interpolate(bilinear,
                align_corners=False)`, mapped to [-1, 1] by `2x - 1`. Otherwise the ADM path: uint8 pixels,
                TensorFlow-1 bilinear resize, `(x - 128) / 128`, exactly as the network's own forward.

        Returns:
            `{"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008)}` float32 arrays.
        """
        x = torch.as_tensor(np.asarray(images)).to(self.device).permute(0, 3, 1, 2)
        if float_pixels:
            x = x.float() / 255
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            for name in _TRUNK:
                x = getattr(self.network, name)(x)
            pool = torch.flatten(x, 1)
            logits = pool.mm(self.network.fc.weight.T)
        else:
            if x.dtype != torch.uint8:
                raise ValueError(f"The ADM feature path takes uint8 images, got {x.dtype}.")
            pool, logits = self.network(x.contiguous())
        return {
            "pool": pool.float().cpu().numpy(),
            "spatial": self._spatial.cpu().numpy(),
            "logits": logits.float().cpu().numpy(),
        }
