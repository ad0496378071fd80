"""Class-conditional sampling for FID evaluation (`diffmoe sample`): reproducible, distributed, resumable.

Reproducibility. Sample `i` of a run is defined by the seed and `i` alone (not by `num_samples`: a run of K samples
is the first K samples of any longer run with the same settings):

- its class label comes from `sample_labels(num_samples, num_classes, seed, mode)`: "balanced" (default) cuts the
  indices into consecutive blocks of `num_classes`, each holding every class once in its own seeded random order (so
  every class has `num_samples // num_classes` samples, and `num_samples % num_classes` classes, those of the last,
  partial block, one more); "random" draws each label uniformly, as DiT's `sample_ddp.py` does;
- its initial noise and any noise a stochastic scheduler adds on the way (DDPM) come from its own CPU generators
  seeded by `(seed, i)`, never from the rank or the batch.

Batches. The samples are cut into global batches of `batch_size` consecutive indices (`[b * B, (b + 1) * B)`), and
batch `b` runs on process `b % num_processes`. A batch therefore holds the same samples for any number of processes,
and the output file is bit-identical for 1 or N processes with the same batch size. Across batch sizes the families
that route each token on its own (DSMoE, JiT, Diff-MoE of Cheng et al., DiT-MoE) give the same images up to float
summation order (pixel values may differ by one grey level where a value sits on a rounding boundary); DiffMoE (Shi et
al.) routes over the whole batch, so its samples depend on which samples share a batch, as in the original, and only
the batch size and the indices fix them.

Expert parallelism (`group_size` K > 1, `diffmoe sample --expert-parallel-size K`): the processes form groups of K
consecutive ranks that hold the experts once between them, batch `b` runs on group `b % (num_processes / K)`, and
every rank of the group runs the whole batch (its tokens travel to the experts' ranks), so each batch is computed as
by one process, DiffMoE's batch-level routing included; the group's first rank writes it. The dense layers' work is
repeated on the K ranks: the point is the experts' memory, split K ways.

Resume. Each finished batch is written at once to `<output>.parts/batch-<b>.npz` (atomically); a restarted run with
the same settings skips the batches on disk, and the final `.npz` is identical to an uninterrupted run's. A part file
that cannot be read (a damaged disk copy) is named in a warning, removed and sampled again. A parts folder without
finished batches blocks nothing: a run with other settings takes it over. The parts folder is removed once the final
file is complete. All processes must see the output folder (one machine, or a shared
file system).

Output: the ADM sample format, `arr_0` uint8 (K, H, W, C) and `arr_1` int64 (K,) labels, optionally PNGs as well and
`arr_float`, the un-rounded float pixels (for the float-features protocol of `diffmoe evaluate`).
"""

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

from diffmoe_hf.atomic_files import write_text_atomically, written_atomically
from diffmoe_hf.formulations import get_formulation

from .npz_files import DamagedNpzError, read_npz


logger = logging.getLogger(__name__)

LABEL_MODES = ("balanced", "random")
RUN_RECORD = "run.json"
# separate random streams per purpose, all derived from the run's seed
_LABEL_STREAM, _NOISE_STREAM, _STEP_NOISE_STREAM = 0, 1, 2


def sample_labels(num_samples: int, num_classes: int, seed: int, mode: str = "balanced") -> np.ndarray:
    """
    The class label of every sample of a run, (num_samples,) int64.

    Args:
        num_samples: K, the number of samples.
        num_classes: Classes of the model (labels 0..num_classes - 1).
        seed: The run's seed.
        mode: "balanced" (blocks of `num_classes` consecutive indices, each a seeded permutation of the classes: every
            class K // num_classes times, K % num_classes classes once more) or "random" (each label uniform and
            independent, as DiT's sampling script).

    Label `i` depends on `seed`, `i`, `num_classes` and `mode` only: the labels of K samples are the first K of any
    longer run's.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"Unknown label mode {mode!r}; choose one of {LABEL_MODES}.")
    if mode == "random":  # one sequential stream: a longer run draws the same first values
        rng = np.random.default_rng([seed, _LABEL_STREAM])
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    blocks = -(-num_samples // num_classes)
    orders = [np.random.default_rng([seed, _LABEL_STREAM, b]).permutation(num_classes) for b in range(blocks)]
    return np.concatenate(orders).astype(np.int64)[:num_samples]


def _index_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit generator seed for one sample and purpose, independent of every other (seed, index, stream)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(indices), *shape) float32 standard Gaussian noise, row `j` drawn on CPU from sample `indices[j]`'s own
    generator (so a sample's noise does not depend on the batch it is in)."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(_index_seed(seed, int(i), _NOISE_STREAM)))
        for i in indices
    ]
    return torch.stack(rows)


def step_generators(indices, seed: int, device) -> list[torch.Generator]:
    """One generator per sample for the noise a stochastic scheduler adds during sampling (DDPM), on `device`."""
    return [torch.Generator(device).manual_seed(_index_seed(seed, int(i), _STEP_NOISE_STREAM)) for i in indices]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """
    (B, C, H, W) images in [0, 1] -> (B, H, W, C) float32 pixels in [0, 255], un-rounded, as the ADM / DiT / DiffMoE
    (Shi et al.) sampling scripts form them: `clamp(127.5 * x + 128, 0, 255)` for x in [-1, 1], i.e. `255 * y + 0.5`
    for y in [0, 1].
    """
    return (images.float() * 255 + 0.5).clamp(0, 255).permute(0, 2, 3, 1).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) images in [0, 1] -> (B, H, W, C) uint8: `to_pixels` truncated, as the ADM / DiT scripts' cast."""
    return torch.floor(to_pixels(images)).to(torch.uint8).numpy()


def generate_images(pipe, indices, labels, seed: int, call_kwargs: dict) -> torch.Tensor:
    """
    The float images of the samples `indices` (one batch), (B, C, H, W) in [0, 1] on CPU.

    Args:
        pipe: A `ClassConditionalMoEPipeline`.
        indices: The samples' global indices.
        labels: Their class labels.
        seed: The run's seed.
        call_kwargs: Further pipeline arguments (steps, guidance, ...).
    """
    config = pipe.transformer.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    formulation = get_formulation(config.formulation).for_model(config)
    # the pipeline uses given latents as they are: start them as the formulation does (e.g. JiT's noise scale)
    latents = formulation.initial_noise(sample_noise(indices, shape, seed))
    device = pipe._execution_device
    images = pipe(
        class_labels=[int(label) for label in labels],
        latents=latents.to(device=device, dtype=pipe.transformer.dtype),
        generator=step_generators(indices, seed, device),
        output_type="pt",
        **call_kwargs,
    ).images
    return images.float().cpu()


def _describe(value):
    """JSON-safe description of a run setting (for the parts folder's record)."""
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class SampleRun:
    """
    One sampling run: `num_samples` samples of `pipe` in global batches of `batch_size`, written to `output` (.npz).

    Args:
        pipe: A `ClassConditionalMoEPipeline` on its device (each process has its own).
        output: The `.npz` file to write; its parts live in `<output>.parts/` until it is complete.
        num_samples: K.
        batch_size: B, samples per global batch (the last batch may be smaller).
        seed: Fixes every label and noise.
        label_mode: "balanced" or "random" (see `sample_labels`).
        call_kwargs: Pipeline arguments (`num_inference_steps`, `guidance_scale`, ...), recorded with the run.
        settings: Further settings to record (model, scheduler, dtype), checked on resume.
        png_dir: Also write every sample as `<png_dir>/<index:06d>.png`.
        keep_float: Also store the un-rounded float pixels as `arr_float` (float32, [0, 255]), which the
            float-features protocol reads (4 bytes per value: 39 GB for 50K 256 x 256 images).
    """

    def __init__(
        self,
        pipe,
        output: str,
        num_samples: int,
        batch_size: int,
        seed: int,
        label_mode: str = "balanced",
        call_kwargs: dict | None = None,
        settings: dict | None = None,
        png_dir: str | None = None,
        keep_float: bool = False,
        group_size: int = 1,
    ):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"--num-samples and --batch-size must be positive, got {num_samples} and {batch_size}.")
        if not output.endswith(".npz"):
            raise ValueError(f"The output must be a .npz file (the ADM sample format), got {output!r}.")
        self.pipe, self.output, self.num_samples, self.batch_size = pipe, output, num_samples, batch_size
        self.seed, self.call_kwargs = seed, dict(call_kwargs or {})
        self.png_dir, self.keep_float, self.group_size = png_dir, keep_float, group_size
        self.labels = sample_labels(num_samples, pipe.transformer.config.num_classes, seed, label_mode)
        self.parts_dir = output + ".parts"
        self.record = {
            "num_samples": num_samples,
            "batch_size": batch_size,
            "seed": seed,
            "label_mode": label_mode,
            "keep_float": keep_float,
            "labels_sha256": hashlib.sha256(self.labels.tobytes()).hexdigest(),
            "call": {k: _describe(v) for k, v in sorted(self.call_kwargs.items())},
            **{k: _describe(v) for k, v in sorted((settings or {}).items())},
        }

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_path(self, batch: int) -> str:
        return os.path.join(self.parts_dir, f"batch-{batch:06d}.npz")

    def prepare(self, is_main_process: bool) -> None:
        """Main process: create the parts folder with the run's record, or check that an existing one matches."""
        if not is_main_process:
            return
        record_path = os.path.join(self.parts_dir, RUN_RECORD)
        if os.path.isfile(record_path) and self.finished_samples() > 0:
            with open(record_path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous != json.loads(json.dumps(self.record)):
                keys = self.record.keys() | previous.keys()
                changed = sorted(k for k in keys if previous.get(k) != self.record.get(k))
                raise ValueError(
                    f"{self.parts_dir} holds the parts of a run with other settings ({', '.join(changed)} differ). "
                    "Resume with the same settings, or remove that folder to start over."
                )
            return
        os.makedirs(self.parts_dir, exist_ok=True)
        write_text_atomically(record_path, json.dumps(self.record, indent=2))

    def my_batches(self, process_index: int, num_processes: int) -> list[int]:
        """The unfinished batches of this process: batch b runs on the processes of group b % (num_processes /
        group_size), groups of `group_size` consecutive processes."""
        mine = range(process_index // self.group_size, self.num_batches, num_processes // self.group_size)
        return [b for b in mine if not self._readable_part(b)]

    def _batch_indices(self, batch: int) -> np.ndarray:
        return np.arange(batch * self.batch_size, min((batch + 1) * self.batch_size, self.num_samples))

    def _readable_part(self, batch: int) -> bool:
        """Whether batch `batch`'s part file exists and holds that batch; a damaged one is removed (to resample)."""
        path = self.batch_path(batch)
        if not os.path.isfile(path):
            return False
        try:
            if np.array_equal(read_npz(path, ["indices"]).get("indices"), self._batch_indices(batch)):
                return True
            problem = f"{path} does not hold the samples of batch {batch}."
        except DamagedNpzError as err:
            problem = str(err)
        logger.warning(f"{problem} It is removed and sampled again.")
        os.remove(path)
        return False

    def sample_batch(self, batch: int) -> tuple[np.ndarray, torch.Tensor]:
        """The indices of one global batch and its float images, checked to be finite (nothing written)."""
        indices = self._batch_indices(batch)
        images = generate_images(self.pipe, indices, self.labels[indices], self.seed, self.call_kwargs)
        if not torch.isfinite(images).all():
            raise ValueError(
                f"The model produced NaN or infinite pixels in samples {indices[0]}..{indices[-1]}, so they were not "
                "kept. Its weights or this sampler setting are broken: try the folder's own scheduler and default "
                "--guidance-scale, or re-convert it."
            )
        return indices, images

    def run_batch(self, batch: int) -> None:
        """Samples one global batch and writes its part file."""
        indices, images = self.sample_batch(batch)
        pixels = to_pixels(images)
        arrays = {"images": torch.floor(pixels).to(torch.uint8).numpy(), "indices": indices}
        if self.keep_float:
            arrays["pixels"] = pixels.numpy()
        if self.png_dir is not None:
            _write_pngs(self.png_dir, indices, arrays["images"])
        _save_npz(self.batch_path(batch), arrays)

    def finished_samples(self) -> int:
        """Samples on disk (all processes)."""
        done = 0
        for batch in range(self.num_batches):
            if os.path.isfile(self.batch_path(batch)):
                done += min(self.batch_size, self.num_samples - batch * self.batch_size)
        return done

    def assemble(self) -> None:
        """Main process, after every batch is written: the final `.npz` in index order; removes the parts."""
        images, pixels = [], []
        for batch in range(self.num_batches):
            path = self.batch_path(batch)
            names = ["images", "pixels"] if self.keep_float else ["images"]
            try:
                part = read_npz(path, names)
                if len(part) < len(names):
                    raise DamagedNpzError(f"{path} lacks {', '.join(sorted(set(names) - set(part)))}.")
            except DamagedNpzError as err:
                os.remove(path)
                raise ValueError(
                    f"{err} It was removed; rerun the same command to sample that batch again (the other batches "
                    "are kept)."
                ) from None
            images.append(part["images"])
            if self.keep_float:
                pixels.append(part["pixels"])
        arrays = {"arr_0": np.concatenate(images), "arr_1": self.labels}
        if self.keep_float:
            arrays["arr_float"] = np.concatenate(pixels)
        _save_npz(self.output, arrays)
        shutil.rmtree(self.parts_dir)


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` of `arrays` to `path`, all-or-nothing (a killed process never leaves half a file)."""
    with written_atomically(path) as partial, open(partial, "wb") as f:
        np.savez(f, **arrays)


def _write_pngs(folder: str, indices, images: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for index, image in zip(indices, images):
        mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        mode_image.save(os.path.join(folder, f"{int(index):06d}.png"))


def run_sampling(run: SampleRun, state, progress: bool = True) -> None:
    """
    Runs `run` on this process's batches and assembles the file on the main process.

    Args:
        run: The `SampleRun`.
        state: An `accelerate.PartialState` (process index, count, barrier).
        progress: Show a progress bar (main process) over the samples of all processes.

    A run that fails or is interrupted keeps its finished batches; one that finished none leaves no parts folder.
    """
    try:
        _sample_batches(run, state, progress)
    except BaseException:
        if state.is_main_process and run.finished_samples() == 0:
            shutil.rmtree(run.parts_dir, ignore_errors=True)  # nothing worth keeping: no state for a rerun to meet
        raise
    if state.is_main_process:
        run.assemble()
    state.wait_for_everyone()


def _sample_batches(run: SampleRun, state, progress: bool) -> None:
    """Every process samples its unfinished batches (see `run_sampling`)."""
    from tqdm.auto import tqdm

    run.prepare(state.is_main_process)
    state.wait_for_everyone()
    batches = run.my_batches(state.process_index, state.num_processes)
    bar = tqdm(
        total=run.num_samples,
        initial=run.finished_samples(),
        unit="sample",
        desc="sampling",
        disable=not (progress and state.is_main_process),
    )
    for batch in batches:
        if state.process_index % run.group_size == 0:
            run.run_batch(batch)
        else:  # another rank of the expert-parallel group writes it
            run.sample_batch(batch)
        if not bar.disable:
            bar.n = run.finished_samples()  # the parts of all processes, on the shared folder
            bar.refresh()
    state.wait_for_everyone()
    if not bar.disable:
        bar.n = run.finished_samples()
    bar.close()
