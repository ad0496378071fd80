#!/usr/bin/env python
"""
Encodes an image dataset with a VAE into latent shards for `train_class_conditional.py --train_latents_dir` (the way
the upstream repositories train, Fast-DiT style: one VAE posterior sample per image, multiplied by the scaling factor).

    accelerate launch training/extract_features.py --train_data_dir imagenet/train --resolution 256 \
        --vae_name_or_path stabilityai/sd-vae-ft-mse --output_dir imagenet-256-latents

Shard i holds the images i * shard_size ... (i + 1) * shard_size - 1 of the dataset in its order. Finished shards are
kept, so running the command again resumes an interrupted extraction; with several processes each takes every
num_processes-th shard. Shards are reproducible: shard i draws its posterior sample from a generator seeded with
seed + i.
"""

import argparse
import json
import math
import os
import sys

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffmoe_hf.atomic_files import write_text_atomically
from diffmoe_hf.cli import CommandError
from diffmoe_hf.dtypes import DTYPES
from diffmoe_hf.training.data import (
    LATENTS_METADATA,
    ImageTransform,
    check_labels,
    collate,
    folder_class_ids,
    load_image_dataset,
    relabel,
    shard_name,
    write_latent_shard,
)
from diffmoe_hf.training.options import (
    check_counts,
    check_data_folder,
    check_output_dir,
    run_script,
    user_input_errors,
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Extract VAE latents of an image dataset.")
    parser.add_argument("--dataset_name", type=str, default=None)
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None)
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument(
        "--vae_name_or_path",
        type=str,
        default="stabilityai/sd-vae-ft-mse",
        help="An AutoencoderKL folder or Hub repo, or a pipeline with a vae/ subfolder.",
    )
    parser.add_argument("--vae_subfolder", type=str, default=None, help="e.g. 'vae' for a pipeline folder.")
    parser.add_argument("--num_classes", type=int, default=None, help="Check that labels are below this.")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--shard_size", type=int, default=4096)
    parser.add_argument(
        "--latent_sample",
        type=str,
        default="sample",
        choices=["sample", "mean"],
        help="Store a posterior sample (upstream) or the posterior mean.",
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default="fp32",
        choices=list(DTYPES),
        help="Storage dtype of the latents (the VAE runs in float32).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--output_dir", type=str, required=True)
    args = parser.parse_args(input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise CommandError("Give exactly one of --dataset_name and --train_data_dir.")
    check_counts(args)
    check_data_folder("--train_data_dir", args.train_data_dir)
    check_output_dir(args.output_dir)
    return args


def main(args):
    accelerator = Accelerator()
    with accelerator.main_process_first(), user_input_errors():
        dataset, class_names = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.cache_dir,
            args.image_column,
            args.label_column,
        )
    id2label = {str(i): name for i, name in enumerate(class_names)} if class_names else None
    if args.train_data_dir is not None:  # digit folder names are class ids (an empty folder shifts nothing)
        with user_input_errors():
            folder_ids = folder_class_ids(class_names)
        dataset = relabel(dataset, args.label_column, class_names, folder_ids)
        id2label = {str(i): name for name, i in sorted(folder_ids.items(), key=lambda item: item[1])}
    num_classes = args.num_classes or (max(int(i) for i in id2label) + 1 if id2label else None)
    with user_input_errors():
        if num_classes is not None:
            check_labels(dataset, args.label_column, num_classes, args.image_column)
        vae = AutoencoderKL.from_pretrained(
            args.vae_name_or_path, subfolder=args.vae_subfolder, cache_dir=args.cache_dir
        )
    vae.requires_grad_(False).to(accelerator.device).eval()
    dataset = dataset.with_transform(ImageTransform(args.resolution, 3, args.image_column, args.label_column))

    num_shards = math.ceil(len(dataset) / args.shard_size)
    metadata = {
        "num_samples": len(dataset),
        "num_shards": num_shards,
        "shard_size": args.shard_size,
        "resolution": args.resolution,
        "vae": args.vae_name_or_path,
        "scaling_factor": vae.config.scaling_factor,
        "latent_sample": args.latent_sample,
        "num_classes": num_classes,
        "id2label": id2label,
        "seed": args.seed,
    }
    metadata_path = os.path.join(args.output_dir, LATENTS_METADATA)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if os.path.isfile(metadata_path):
            with open(metadata_path, encoding="utf-8") as f:
                previous = {k: v for k, v in json.load(f).items() if k != "complete"}
            if previous != metadata:
                changed = ", ".join(sorted(k for k in {*previous, *metadata} if previous.get(k) != metadata.get(k)))
                raise CommandError(
                    f"--output_dir {args.output_dir} holds an extraction with other settings ({changed}): use another"
                    " folder, or the same settings to resume it."
                )
        write_text_atomically(metadata_path, json.dumps({**metadata, "complete": False}, indent=2))
    accelerator.wait_for_everyone()

    storage_dtype = DTYPES[args.dtype]
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [i for i in mine if not os.path.isfile(os.path.join(args.output_dir, shard_name(i)))]
    if len(todo) < len(mine):
        accelerator.print(f"Resuming: {len(mine) - len(todo)} of this process's {len(mine)} shards are done.")
    rows = sum(min(args.shard_size, len(dataset) - i * args.shard_size) for i in todo)
    progress = tqdm(total=rows, desc="Encoding", unit="img", disable=not accelerator.is_local_main_process)
    for index in todo:
        start = index * args.shard_size
        shard = dataset.select(range(start, min(start + args.shard_size, len(dataset))))
        loader = torch.utils.data.DataLoader(
            shard, batch_size=args.batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers
        )
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + index)
        latents, labels = [], []
        for batch in loader:
            with torch.no_grad():
                posterior = vae.encode(batch["x0"].to(accelerator.device)).latent_dist
            z = posterior.sample(generator) if args.latent_sample == "sample" else posterior.mean
            latents.append((z * vae.config.scaling_factor).to(storage_dtype).cpu())
            labels.append(batch["class_labels"])
            progress.update(len(batch["class_labels"]))
        write_latent_shard(args.output_dir, index, torch.cat(latents), torch.cat(labels))
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomically(metadata_path, json.dumps({**metadata, "complete": True}, indent=2))
        accelerator.print(f"Wrote {len(dataset)} latents in {num_shards} shards to {args.output_dir}.")
    accelerator.end_training()


def run(argv: list[str] | None = None) -> int:
    """The script's entry point: extracts, and returns the exit status (see `run_script`)."""
    return run_script("extract_features.py", parse_args, main, argv, _what_was_kept)


def _what_was_kept(args) -> str:
    """After an interruption (a shard being written is never left half-written): the finished shards."""
    if args is None or not os.path.isdir(args.output_dir):
        return "nothing was written."
    done = sum(name.startswith("latents-") and name.endswith(".safetensors") for name in os.listdir(args.output_dir))
    return f"{done} finished shards are kept in {args.output_dir}; run the same command again to resume."


if __name__ == "__main__":
    sys.exit(run())
