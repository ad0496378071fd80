"""
Scores the runs of `training/recipes/new_classes_shapes.sh` (a model fine-tuned on new classes, outline shapes, against
the same recipe from scratch) the way the digits models' cards score theirs, and writes the table of the training
README.

    python -m diffmoe_hf.training.shapes_recipe --runs_dir runs/shapes --runs finetune-400 scratch-400

Samples: 100 per class (seed 0, 25 steps, guidance 1.5: the default of the shipped `digits-jitmoe`). Like the digits
metrics, a classifier is fitted on real data only, in the data's own space (here the 16x16 pixels in [0, 1]): an RBF
SVM (C = 10, as the digits metrics) on 1500 freshly drawn shapes per class (`shapes_data`, seed 1; 300 per class gave
only 0.88 held-out accuracy); 100 more per class (seed 2) are the held-out reference.

- accuracy: the fraction of samples the classifier labels as the requested class (mean, worst class, per class);
- diversity: mean pairwise distance within each generated class over the same for held-out shapes (1 = as varied as
  the data);
- nearest-training distance ratio: the median distance of samples to their nearest training image over that of
  held-out shapes (about 1 is healthy, near 0 means copying the few training images).
"""

import argparse
import json
import os

import numpy as np
import torch

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.training.shapes_data import SHAPES, shapes_dataset


PER_CLASS, SEED, STEPS, GUIDANCE = 100, 0, 25, 1.5


def _features(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H * W) in [0, 1]."""
    return images.reshape(len(images), -1) / 255.0


def _mean_pairwise_distance(points: np.ndarray) -> float:
    from sklearn.metrics import pairwise_distances

    return float(pairwise_distances(points).sum() / (len(points) * (len(points) - 1)))


class ShapesReference:
    """The classifier and the reference sets, drawn once at `resolution`; `train_images` (N, H, W) uint8 are the
    runs' training images."""

    def __init__(self, train_images: np.ndarray, resolution: int = 16):
        from sklearn.neighbors import NearestNeighbors
        from sklearn.svm import SVC

        fit_x, fit_y = shapes_dataset(1500, resolution, seed=1)
        heldout_x, self.heldout_y = shapes_dataset(PER_CLASS, resolution, seed=2)
        self.heldout = _features(heldout_x)
        self.classifier = SVC(C=10, gamma="scale").fit(_features(fit_x), fit_y)
        self.nearest_train = NearestNeighbors(n_neighbors=1).fit(_features(train_images))
        self.heldout_accuracy = float((self.classifier.predict(self.heldout) == self.heldout_y).mean())

    def evaluate(self, samples: np.ndarray, labels: np.ndarray) -> dict:
        """`samples`: (N, H * W) generated images in [0, 1]; `labels`: (N,) the requested classes."""
        correct = self.classifier.predict(samples) == labels
        per_class = {SHAPES[c]: float(correct[labels == c].mean()) for c in range(len(SHAPES))}
        diversity = [
            _mean_pairwise_distance(samples[labels == c]) / _mean_pairwise_distance(self.heldout[self.heldout_y == c])
            for c in range(len(SHAPES))
        ]
        distances = self.nearest_train.kneighbors(samples)[0][:, 0]
        heldout_distances = self.nearest_train.kneighbors(self.heldout)[0][:, 0]
        return {
            "accuracy": float(correct.mean()),
            "worst_class_accuracy": min(per_class.values()),
            "per_class_accuracy": per_class,
            "diversity_ratio": float(np.mean(diversity)),
            "nearest_train_distance_ratio": float(np.median(distances) / np.median(heldout_distances)),
        }


@torch.no_grad()
def sample_features(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """`PER_CLASS` samples of every shape from the pipeline in `folder` (its class names are the shapes): (N, H * W)
    in [0, 1] and the (N,) requested classes."""
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    labels = np.arange(PER_CLASS * len(SHAPES)) % len(SHAPES)
    names = [SHAPES[label] for label in labels]  # by name: the run's id2label must hold the shapes
    generator = torch.Generator().manual_seed(SEED)
    images = pipe(names, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator, output_type="pt")
    return images.images.reshape(len(labels), -1).double().numpy(), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", required=True, help="the recipe's output folder (data/train and one per run)")
    parser.add_argument("--runs", nargs="+", required=True, help="run folders under --runs_dir to score")
    args = parser.parse_args(argv)

    from PIL import Image

    train_dir = os.path.join(args.runs_dir, "data", "train")
    train_images = np.stack(
        [
            np.asarray(Image.open(os.path.join(root, name)))
            for root, _, names in sorted(os.walk(train_dir))
            for name in sorted(names)
        ]
    )
    reference = ShapesReference(train_images)
    print(f"held-out real shapes: classifier accuracy {reference.heldout_accuracy:.3f}")
    results = {}
    for run in args.runs:
        info_path = os.path.join(args.runs_dir, f"{run}.train_info.json")
        info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
        metrics = reference.evaluate(*sample_features(os.path.join(args.runs_dir, run)))
        results[run] = {**metrics, "training": info}
        per_class = ", ".join(f"{name} {value:.2f}" for name, value in metrics["per_class_accuracy"].items())
        print(
            f"{run}: accuracy {metrics['accuracy']:.3f} (worst class {metrics['worst_class_accuracy']:.2f}; "
            f"{per_class}), diversity {metrics['diversity_ratio']:.2f}, nearest-training distance ratio "
            f"{metrics['nearest_train_distance_ratio']:.2f}, trained {info.get('seconds', '?')} s"
        )
    record = {
        "heldout_classifier_accuracy": reference.heldout_accuracy,
        "samples_per_class": PER_CLASS,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "runs": results,
    }
    with open(os.path.join(args.runs_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
