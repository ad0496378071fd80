"""Training data for class-conditional models: image datasets (folders or Hub datasets with a class-label column) and
pre-extracted VAE latents (the Fast-DiT layout, written by `extract_features.py`).

Every dataset yields `{"x0": (C, H, W) float32, "class_labels": int64 scalar}`, where x0 is an image in [-1, 1]
(the VAE or a pixel-space model takes it) or an already scaled latent. Bad data is reported with the file or row that
holds it.
"""

import contextlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file

from diffmoe_hf.atomic_files import written_atomically


LATENTS_METADATA = "metadata.json"


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
):
    """
    The `train` split of a Hub dataset (`dataset_name`) or of an image folder with one sub-folder per class
    (`train_data_dir`, read by `datasets`' `imagefolder` builder), with images left undecoded so that
    `ImageTransform` can name the file of an unreadable image.

    A folder with a single class folder is one class (`imagefolder` gives it no label column): `label_column` is 0, the
    index of that folder's name in `class_names`. `datasets`' progress bars and logging about resolving and
    "downloading" the files of a local folder are silenced.

    Returns:
        `(dataset, class_names)`; `class_names` is the `ClassLabel` names of `label_column`, or None.
    """
    import datasets.config
    from datasets import ClassLabel, load_dataset
    from datasets import Image as ImageFeature

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Give exactly one of --dataset_name and --train_data_dir (or --train_latents_dir).")
    if dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    else:  # a local folder: without the request that `load_dataset` makes to count downloads of `imagefolder`
        folders = class_folders(train_data_dir)
        counting, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, False
        try:
            with _quiet_datasets():
                dataset = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
        finally:
            datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting
        if len(folders) == 1 and label_column not in dataset.column_names:
            dataset = dataset.add_column(label_column, [0] * len(dataset), feature=ClassLabel(names=folders))
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"Column {column!r} not found in the dataset; its columns are {', '.join(dataset.column_names)} "
                "(set --image_column / --label_column)."
            )
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    label_feature = dataset.features[label_column]
    class_names = list(label_feature.names) if hasattr(label_feature, "names") else None
    return dataset, class_names


def class_folders(train_data_dir: str) -> list[str]:
    """
    The class folders of an image folder, sorted (as `imagefolder` numbers them).

    Raises:
        `ValueError` when `train_data_dir` has no sub-folder or no file in its sub-folders.
    """
    folders = sorted(entry.name for entry in os.scandir(train_data_dir) if entry.is_dir())
    layout = "put the images of each class in a sub-folder named by its class id or class name (e.g. DIR/207/x.png)"
    if not folders:
        raise ValueError(f"--train_data_dir {train_data_dir} holds no class folders: {layout}.")
    if not any(files for folder in folders for _, _, files in os.walk(os.path.join(train_data_dir, folder))):
        raise ValueError(f"--train_data_dir {train_data_dir} holds no images in its class folders: {layout}.")
    return folders


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without its progress bars and with warnings only, for the block."""
    from datasets.utils import logging as datasets_logging

    bars, verbosity = datasets_logging.is_progress_bar_enabled(), datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity_warning()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


def _is_class_id(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _names_of_classes(num_classes: int, id2label: dict[str, str] | None, limit: int = 12) -> str:
    if not id2label:
        return f"ids 0..{num_classes - 1}, no class names"
    names = [f"{i}: {id2label[str(i)]!r}" for i in range(num_classes) if str(i) in id2label]
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"ids 0..{num_classes - 1}: {shown}"


def class_name_ids(id2label: dict[str, str] | None) -> dict[str, set[int]]:
    """Every name of a model's classes -> the class ids carrying it: each whole `id2label` entry and each of its
    comma-separated synonyms (`"goldfish, Carassius auratus"` gives both names)."""
    synonyms = {}
    for class_id, label in (id2label or {}).items():
        for name in {label.strip(), *(part.strip() for part in label.split(","))}:
            synonyms.setdefault(name, set()).add(int(class_id))
    return synonyms


def folder_class_ids(
    folders: list[str], num_classes: int | None = None, id2label: dict[str, str] | None = None
) -> dict[str, int]:
    """
    The class id of each class folder of an image folder.

    For a model with classes (`num_classes`, and `id2label` if it has names), a folder named by digits is that class id
    (`207/` and `0207/` are class 207) and any other folder name must be one of the model's class names (a whole
    `id2label` entry or one of its comma-separated synonyms). For a model made for the data (`num_classes` None),
    digit names are class ids as well, and other names are numbered in sorted order.

    Raises:
        `ValueError` listing the folders that match no class (or the same class as another folder) and the model's
        classes.
    """
    numeric = [name for name in folders if _is_class_id(name)]
    if num_classes is None:
        if numeric and len(numeric) != len(folders):
            named = sorted(set(folders) - set(numeric))
            raise ValueError(
                f"The class folders mix class ids ({', '.join(numeric[:5])}) and names ({', '.join(named[:5])}): "
                "name every folder by its class id, or every folder by its class name."
            )
        return (
            {name: int(name) for name in folders} if numeric else {name: i for i, name in enumerate(sorted(folders))}
        )

    synonyms = class_name_ids(id2label)
    ids, problems = {}, []
    for name in folders:
        if _is_class_id(name):
            if int(name) < num_classes:
                ids[name] = int(name)
            else:
                problems.append(f"{name}/ is class id {int(name)}, beyond the model's {num_classes} classes")
        elif len(synonyms.get(name, ())) == 1:
            ids[name] = next(iter(synonyms[name]))
        elif name in synonyms:
            problems.append(f"{name}/ names classes {sorted(synonyms[name])}: name it by its class id")
        else:
            problems.append(f"{name}/ is no class name of the model")
    by_id = {}
    for name, class_id in ids.items():
        by_id.setdefault(class_id, []).append(name)
    shared = {class_id: names for class_id, names in by_id.items() if len(names) > 1}
    problems += [f"{' and '.join(f'{n}/' for n in names)} are all class {i}" for i, names in shared.items()]
    if problems:
        raise ValueError(
            f"The class folders do not match the model's classes: {'; '.join(problems)}. The model has {num_classes} "
            f"classes ({_names_of_classes(num_classes, id2label)}). Name each folder by the class id it holds (e.g. "
            "207/) or by one of the model's class names, or fine-tune this model on new classes with --new_classes "
            "replace (only the data's classes) or --new_classes append (the model's classes and the data's)."
        )
    return ids


def relabel(dataset, label_column: str, class_names: list[str], ids: dict[str, int]):
    """`dataset` with `label_column` (indices into `class_names`, as `imagefolder` numbers the folders) replaced by
    the class ids `ids[class_name]`."""
    lookup = np.asarray([ids[name] for name in class_names], dtype=np.int64)
    labels = lookup[np.asarray(dataset[label_column], dtype=np.int64)]
    return dataset.remove_columns(label_column).add_column(label_column, labels.tolist())


def _describe_row(dataset, row: int, image_column: str) -> str:
    image = dataset[row][image_column]
    path = image.get("path") if isinstance(image, dict) else None
    return f"row {row}" + (f" ({path})" if path else "")


def check_labels(dataset, label_column: str, num_classes: int, image_column: str | None = None) -> None:
    """Raises a `ValueError` naming the first row (and its file) whose class label is not in 0..num_classes-1."""
    labels = np.asarray(dataset[label_column])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Column {label_column!r} must hold one integer class id per row, got dtype {labels.dtype}.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        where = _describe_row(dataset, row, image_column) if image_column else f"row {row}"
        raise ValueError(
            f"Class label {int(labels[row])} at {where} is outside 0..{num_classes - 1} (the model has {num_classes} "
            f"classes; {bad.size} rows are out of range)."
        )


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """ADM/DiT `center_crop_arr`: halve with BOX while the short side is >= 2x, resize it to `resolution` with
    BICUBIC, then take the central square."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def open_image(image, decode: bool = True) -> Image.Image:
    """
    One undecoded `datasets` image (`{"bytes", "path"}`), a path or a PIL image, opened and decoded in full. With
    `decode=False` the file's structure is only verified (`Image.verify`: cheaper, misses some damage) and the image
    returned cannot be used further.

    Raises:
        `ValueError` naming the file when it cannot be read.
    """
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    try:
        if isinstance(image, dict):
            pil = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        elif isinstance(image, str):
            pil = Image.open(image)
        else:
            pil = image
        if decode:
            pil.load()
        else:
            pil.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:  # verify raises SyntaxError too
        raise ValueError(f"Cannot read image {path or '<bytes without a path>'}: {error}") from error
    return pil


def find_unreadable_images(
    dataset, image_column: str, decode: bool = True, num_shards: int = 1, shard_index: int = 0, progress: bool = False
) -> list[tuple[int, str]]:
    """
    Reads every image of shard `shard_index` of `num_shards` contiguous shards of `dataset` (images undecoded), with
    one thread per CPU core.

    Returns:
        `(row, message)` for each image that cannot be read, the message naming its file.
    """
    from tqdm.auto import tqdm

    rows = np.array_split(np.arange(len(dataset)), num_shards)[shard_index]
    start = int(rows[0]) if rows.size else 0

    def check(item):
        row, image = item
        try:
            open_image(image, decode)
        except ValueError as error:
            return row, str(error)
        return None

    bad = []
    shard = dataset.select(rows)
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count()) as pool,
        tqdm(total=len(rows), desc="Checking images", disable=not progress) as bar,
    ):
        offset = start
        for batch in shard.iter(batch_size=256):
            images = batch[image_column]
            bad += [found for found in pool.map(check, enumerate(images, offset)) if found is not None]
            offset += len(images)
            bar.update(len(images))
    return bad


class ImageTransform:
    """
    `dataset.with_transform` callable: decodes, converts to RGB (or L for 1-channel pixel models), center-crops to
    `resolution` and scales to [-1, 1]. Random flips happen in the training step instead, so skipped batches of a
    resumed run draw no random numbers.
    """

    def __init__(self, resolution: int, channels: int = 3, image_column: str = "image", label_column: str = "label"):
        if channels not in (1, 3):
            raise ValueError(f"Images have 1 or 3 channels, got {channels}.")
        self.resolution = resolution
        self.mode = "L" if channels == 1 else "RGB"
        self.image_column = image_column
        self.label_column = label_column

    def load(self, image) -> torch.Tensor:
        """One undecoded `datasets` image (`{"bytes", "path"}`), a path or a PIL image -> (C, R, R) in [-1, 1]."""
        pil = open_image(image)
        pil = center_crop_resize(pil.convert(self.mode), self.resolution)
        array = np.asarray(pil, dtype=np.float32).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

    def __call__(self, examples: dict) -> dict:
        return {
            "x0": [self.load(image) for image in examples[self.image_column]],
            "class_labels": [torch.tensor(label, dtype=torch.long) for label in examples[self.label_column]],
        }


def repeated_to_fill(dataset, repeats: int) -> torch.utils.data.Dataset:
    """`dataset` (indexable, with a length) `repeats` times over, one copy after the other: a few images then fill a
    batch (the sampler shuffles across the copies)."""
    return torch.utils.data.ConcatDataset([dataset] * repeats)


def collate(examples: list[dict]) -> dict:
    return {
        "x0": torch.stack([example["x0"] for example in examples]).contiguous().float(),
        "class_labels": torch.stack([example["class_labels"] for example in examples]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# pre-extracted latents


def shard_name(index: int) -> str:
    return f"latents-{index:05d}.safetensors"


def write_latent_shard(folder: str, index: int, latents: torch.Tensor, labels: torch.Tensor) -> None:
    """Writes shard `index` atomically (a partly written shard never has its final name)."""
    path = os.path.join(folder, shard_name(index))
    with written_atomically(path) as partial:
        save_file({"latents": latents.contiguous(), "labels": labels.long().contiguous()}, partial)


class LatentDataset(torch.utils.data.Dataset):
    """
    Pre-extracted latents: `metadata.json` plus shards `latents-00000.safetensors`, ... each holding `latents`
    (n, C, h, w), already multiplied by the VAE scaling factor, and `labels` (n,) int64.

    Args:
        folder: The folder `extract_features.py` wrote.
        sample_shape: (C, h, w) the model expects; every shard is checked against it.
        num_classes: Labels must be in 0..num_classes-1.
    """

    def __init__(self, folder: str, sample_shape: tuple[int, int, int] | None = None, num_classes: int | None = None):
        metadata_path = os.path.join(folder, LATENTS_METADATA)
        if not os.path.isfile(metadata_path):
            raise ValueError(f"{folder} has no {LATENTS_METADATA}; write it with training/extract_features.py.")
        with open(metadata_path, encoding="utf-8") as f:
            self.metadata = json.load(f)
        if not self.metadata.get("complete"):
            raise ValueError(f"The feature extraction into {folder} did not finish; run it again to resume it.")
        self.folder = folder
        self.paths, self.offsets, labels = [], [0], []
        for index in range(self.metadata["num_shards"]):
            path = os.path.join(folder, shard_name(index))
            if not os.path.isfile(path):
                raise ValueError(f"Latent shard {path} is missing.")
            with safe_open(path, framework="pt") as shard:
                shape = tuple(shard.get_slice("latents").get_shape())
                shard_labels = shard.get_tensor("labels")
            if sample_shape is not None and tuple(shape[1:]) != tuple(sample_shape):
                raise ValueError(
                    f"{path} holds latents of shape {tuple(shape[1:])} per sample but the model expects "
                    f"{tuple(sample_shape)} (in_channels, sample_size, sample_size)."
                )
            if shard_labels.shape != (shape[0],):
                raise ValueError(f"{path} has {shape[0]} latents but labels of shape {tuple(shard_labels.shape)}.")
            if num_classes is not None:
                bad = ((shard_labels < 0) | (shard_labels >= num_classes)).nonzero().flatten()
                if bad.numel():
                    row = int(bad[0])
                    raise ValueError(
                        f"{path} row {row} (sample {self.offsets[-1] + row}) has class label {int(shard_labels[row])}"
                        f", outside 0..{num_classes - 1}."
                    )
            self.paths.append(path)
            self.offsets.append(self.offsets[-1] + shape[0])
            labels.append(shard_labels)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        self._handles = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if shard not in self._handles:  # opened lazily, so each dataloader worker has its own handles
            self._handles[shard] = safe_open(self.paths[shard], framework="pt")
        latent = self._handles[shard].get_slice("latents")[index - self.offsets[shard]]
        return {"x0": latent.float(), "class_labels": self.labels[index]}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}
