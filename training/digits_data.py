"""
Writes the training split of scikit-learn's handwritten digits as an image folder for `train_class_conditional.py`.

    python -m diffmoe_hf.training.digits_data --output_dir digits/train --resolution 16

Only the training part of the fixed split that the digits metrics use (`load_digits_split(seed=0)`, 1437 of the 1797
images) is written, so the 360 held-out digits stay unseen. Each 8x8 image (values 0..16) becomes a grayscale PNG:
values scaled to 0..255 and upsampled by pixel replication (nearest neighbour), so area pooling back to 8x8 (what
the metrics do) recovers the original digit up to the 8-bit rounding. Class folders are named "0, zero" ...
"9, nine" (sorted in class order); they become the trained pipeline's `id2label` (comma-separated synonyms), so
`pipe(class_labels=["zero"])` works.
"""

import argparse
import os

import numpy as np
from PIL import Image

from diffmoe_hf.evaluation.digits import DIGIT_MAX, load_digits_split


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_folder_name(label: int) -> str:
    """'0, zero' ... '9, nine': sorts in class order; both the digit and the word are names of the class."""
    return f"{label}, {DIGIT_NAMES[label]}"


def digits_to_uint8(images: np.ndarray, resolution: int) -> np.ndarray:
    """
    Args:
        images: (N, 8, 8) digits in [0, 16].
        resolution: output side, a multiple of 8.

    Returns:
        (N, resolution, resolution) uint8, each source pixel repeated resolution // 8 times along both axes.
    """
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}.")
    scaled = np.rint(np.asarray(images, dtype=np.float64) / DIGIT_MAX * 255).clip(0, 255).astype(np.uint8)
    factor = resolution // 8
    return scaled.repeat(factor, axis=1).repeat(factor, axis=2)


def write_digits_image_folder(output_dir: str, resolution: int = 16, split_seed: int = 0) -> int:
    """Writes `<output_dir>/<class folder>/<index>.png` for the training split; returns the number of images."""
    train_images, train_labels, _, _ = load_digits_split(split_seed)
    pixels = digits_to_uint8(train_images, resolution)
    for label in range(len(DIGIT_NAMES)):
        os.makedirs(os.path.join(output_dir, class_folder_name(label)), exist_ok=True)
    for index, (image, label) in enumerate(zip(pixels, train_labels)):
        Image.fromarray(image, mode="L").save(
            os.path.join(output_dir, class_folder_name(int(label)), f"{index:04d}.png")
        )
    return len(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (one sub-folder per class)")
    parser.add_argument("--resolution", type=int, default=16, help="image side, a multiple of 8 (default 16)")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the train/held-out split (default 0)")
    args = parser.parse_args(argv)
    count = write_digits_image_folder(args.output_dir, args.resolution, args.split_seed)
    print(f"Wrote {count} training digits ({args.resolution}x{args.resolution}) to {args.output_dir}")


if __name__ == "__main__":
    main()
