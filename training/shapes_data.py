"""
Outline shapes drawn with PIL, for fine-tuning a model on classes it never saw (no download).

    python -m diffmoe_hf.training.shapes_data --output_dir shapes/train --per_class 48 --resolution 16

Classes: circle, square, triangle, cross. Each image is one white outline on black, drawn at 4x the resolution and
box-downsampled (anti-aliased), augmented at random: centre offset, size, rotation (squares, triangles and crosses),
stroke width and brightness. The draw depends only on the seed and the image's index, so one seed gives one dataset
and another seed an independent one (e.g. held-out images for a classifier).
"""

import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "cross")
SUPERSAMPLING = 4


def _polygon(center: tuple[float, float], radius: float, corners: int, angle: float) -> list[tuple[float, float]]:
    return [
        (center[0] + radius * math.cos(angle + 2 * math.pi * i / corners),
         center[1] + radius * math.sin(angle + 2 * math.pi * i / corners))
        for i in range(corners)
    ]  # fmt: skip


def draw_shape(shape: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented `shape` (of `SHAPES`) as a (resolution, resolution) uint8 image, white on black."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    side = resolution * SUPERSAMPLING
    radius = side * rng.uniform(0.25, 0.4)
    margin = side / 2 - radius - side * 0.05
    center = tuple(side / 2 + rng.uniform(-margin, margin, 2))
    width = max(1, round(side * rng.uniform(0.06, 0.12)))
    angle = rng.uniform(0, 2 * math.pi)
    brightness = int(rng.integers(170, 256))
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        box = (center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius)
        draw.ellipse(box, outline=brightness, width=width)
    elif shape in ("square", "triangle"):
        corners = _polygon(center, radius, 4 if shape == "square" else 3, angle)
        draw.line([*corners, corners[0], corners[1]], fill=brightness, width=width, joint="curve")
    else:
        for i in range(2):
            ends = _polygon(center, radius, 2, angle + i * math.pi / 2)
            draw.line(ends, fill=brightness, width=width)
    return np.asarray(canvas.resize((resolution, resolution), Image.BOX))


def shapes_dataset(per_class: int, resolution: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of every shape: ((N, resolution, resolution) uint8, (N,) class index into `SHAPES`)."""
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for index in range(per_class):
            rng = np.random.default_rng([seed, label, index])
            images.append(draw_shape(shape, resolution, rng))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def write_shapes_image_folder(output_dir: str, per_class: int, resolution: int = 16, seed: int = 0) -> int:
    """Writes `<output_dir>/<shape>/<index>.png`; returns the number of images."""
    images, labels = shapes_dataset(per_class, resolution, seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(output_dir, SHAPES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image, mode="L").save(os.path.join(folder, f"{index:04d}.png"))
    return len(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (one sub-folder per shape)")
    parser.add_argument("--per_class", type=int, default=48, help="images per shape (default 48)")
    parser.add_argument("--resolution", type=int, default=16, help="image side (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args(argv)
    count = write_shapes_image_folder(args.output_dir, args.per_class, args.resolution, args.seed)
    print(f"Wrote {count} shapes ({args.resolution}x{args.resolution}, {', '.join(SHAPES)}) to {args.output_dir}")


if __name__ == "__main__":
    main()
