#!/usr/bin/env python
"""
Fine-tunes (LoRA or full, with EMA) or pre-trains a class-conditional diffmoe_hf transformer of any family.

    accelerate launch training/train_class_conditional.py \
        --pretrained_model_name_or_path <converted pipeline folder or Hub id> \
        --train_data_dir <folder with one sub-folder per class> --resolution 256 \
        --use_lora --rank 16 --output_dir my-lora

The family comes from the model config: the loss is the one of the transformer's `config.formulation`
(`diffmoe_hf.training_losses`) and the MoE terms are the ones its layers compute (the model output's `aux_loss`). See
training/README.md for every recipe (LoRA, full training, latents, resume, multi-GPU).
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    get_int_from_env,
    set_seed,
)
from diffusers import AutoencoderKL
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel, _collate_lora_metadata, cast_training_params, free_memory
from diffusers.utils import check_min_version
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm

from diffmoe_hf import diffusers_floors
from diffmoe_hf.atomic_files import apply_umask
from diffmoe_hf.cli import CommandError
from diffmoe_hf.dtypes import DTYPES
from diffmoe_hf.families import FAMILIES, family_names, get_family, resolve_family
from diffmoe_hf.formulations import TimeSampling, check_scheduler, get_formulation
from diffmoe_hf.parallel import model_outline
from diffmoe_hf.pipelines import ClassConditionalMoEPipeline
from diffmoe_hf.routing import record_routing
from diffmoe_hf.training.checkpoints import (
    FINAL_STAGING,
    LEFTOVER_NAME,
    checkpoint_steps,
    model_record,
    read_marker,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    staged_final_output,
    why_incomplete,
    why_model_differs,
    why_random_state_unrestorable,
)
from diffmoe_hf.training.data import (
    ImageTransform,
    LatentDataset,
    check_labels,
    collate,
    find_unreadable_images,
    folder_class_ids,
    load_image_dataset,
    relabel,
    repeated_to_fill,
)
from diffmoe_hf.training.expert_parallel import ExpertParallelTraining, check_expert_parallel_arguments
from diffmoe_hf.training.lora_merge import load_non_lora_state, merged_lora_model, save_non_lora_state
from diffmoe_hf.training.new_classes import (
    NEW_CLASS_MODES,
    parse_init_class_from,
    plan_classes,
    resize_class_embedding,
)
from diffmoe_hf.training.options import (
    check_counts,
    check_data_folder,
    check_floats,
    check_output_dir,
    check_preset,
    parse_class_ids,
    resolve_tracker,
    run_script,
    user_input_errors,
)
from diffmoe_hf.training.parameter_groups import router_parameters, trainable_parameter_table
from diffmoe_hf.training_losses import diffusion_training_loss


check_min_version(diffusers_floors.TRAIN)

logger = get_logger(__name__)

LORA_LAYER_KINDS = ("attention", "experts", "shared_experts", "dense_ff")
EXPERT_PARTS = ("up", "down", "modulation")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
SCRIPT = "train_class_conditional.py"
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train a class-conditional diffmoe_hf transformer.")
    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A converted pipeline folder or Hub repo (model_index.json), or a transformer folder.",
    )
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument(
        "--preset",
        type=str,
        default=None,
        help="Start from fresh weights with a released architecture, a preset of --model_family: "
        + "; ".join(f"{family.id}: {', '.join(family.presets)}" for family in FAMILIES.values()),
    )
    parser.add_argument(
        "--model_family",
        type=str,
        default=None,
        choices=family_names(),
        help=f"Family of --preset, a `diffmoe convert` family id ({', '.join(FAMILIES)}) or an alias of one.",
    )
    parser.add_argument(
        "--model_config_overrides",
        type=str,
        default=None,
        help="JSON dict of config overrides for --preset, e.g. '{\"num_classes\": 10}'.",
    )
    parser.add_argument(
        "--vae_name_or_path",
        type=str,
        default=None,
        help=f"VAE for latent models started from --preset (default {DEFAULT_VAE} for 4 channels).",
    )
    parser.add_argument(
        "--no_vae",
        action="store_true",
        help="Pixel-space training without a VAE (automatic for 1- or 3-channel models without one).",
    )
    # data
    parser.add_argument("--dataset_name", type=str, default=None)
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None, help="Image folder with one sub-folder per class.")
    parser.add_argument("--train_latents_dir", type=str, default=None, help="Latents from extract_features.py.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--resolution", type=int, default=256, help="Image size (center crop as ADM/DiT).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--cache_latents", action="store_true", help="Encode the images once before training.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument(
        "--image_check",
        type=str,
        default="decode",
        choices=["decode", "verify", "none"],
        help="Before training, read every image in full ('decode'), check only each file's structure ('verify': "
        "faster, misses some damage) or not at all; an unreadable image then stops the run when its batch comes.",
    )
    parser.add_argument(
        "--skip_unreadable_images",
        action="store_true",
        help="Train without the images the check cannot read (a warning names them) instead of stopping.",
    )
    # objective
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default=None,
        choices=["uniform", "logit_normal"],
        help="Flow time sampling; default: the formulation's upstream one.",
    )
    parser.add_argument("--logit_mean", type=float, default=None)
    parser.add_argument("--logit_std", type=float, default=None)
    parser.add_argument(
        "--aux_loss_coef",
        type=float,
        default=1.0,
        help="Multiplier on the MoE losses the layers compute (routers' load-balancing losses at their "
        "configured alpha, the capacity-predictor loss of DiffMoE (Shi et al.)); 1 trains as upstream, 0 disables.",
    )
    parser.add_argument(
        "--class_dropout_prob",
        type=float,
        default=None,
        help="Override the model's label dropout for classifier-free guidance.",
    )
    # LoRA
    parser.add_argument("--use_lora", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=None, help="Defaults to --rank.")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora_layers",
        type=str,
        default="attention,experts,shared_experts,dense_ff",
        help=f"Comma-separated kinds of {LORA_LAYER_KINDS} (routers are never adapted).",
    )
    # new classes on a pretrained model, and what is trained (training/new_classes.py, training/parameter_groups.py)
    parser.add_argument(
        "--new_classes",
        type=str,
        default=None,
        choices=NEW_CLASS_MODES,
        help="Fine-tune a pretrained model on classes it does not have (data class names that are not its class "
        "names): 'replace' makes the data's classes the model's only classes, 'append' adds them after the model's "
        "own. The class embedding is resized (the null class for guidance stays last) and trained in full, also "
        "under LoRA.",
    )
    parser.add_argument(
        "--init_class_from",
        type=str,
        default=None,
        help="With --new_classes: start new classes from an old class's embedding, e.g. 'square=box,disc=3' "
        "(old class name or id); others start from the mean of the old classes' embeddings.",
    )
    parser.add_argument(
        "--routers",
        type=str,
        default=None,
        choices=["frozen", "trained"],
        help="Whether the routers (and DiffMoE's capacity predictor) are trained, in full: default frozen under "
        "--use_lora, trained in full fine-tuning.",
    )
    parser.add_argument(
        "--lora_expert_parts",
        type=str,
        default=",".join(EXPERT_PARTS),
        help=f"Comma-separated parts of the (shared) experts that LoRA adapts, of {EXPERT_PARTS}: 'up' the input "
        "projections (gate_proj, up_proj; net.0.proj in DiffMoE of Shi et al.), 'down' the output projection "
        "(down_proj; net.2), 'modulation' the per-expert modulation of Diff-MoE (Cheng et al.).",
    )
    # full fine-tuning
    parser.add_argument(
        "--expert_parallel_size",
        type=int,
        default=None,
        help="Expert parallelism: K processes share one copy of the experts, each holding E/K of every MoE layer's "
        "experts (K divides the number of processes and every expert count; checkpoints load at any K). See "
        "training/README.md.",
    )
    parser.add_argument(
        "--non_expert_parallel",
        type=str,
        default="ddp",
        choices=["ddp", "fsdp2"],
        help="With --expert_parallel_size: the other weights replicated on every rank (ddp) or sharded over all ranks "
        "(fsdp2, torch's fully_shard).",
    )
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights on the CPU.")
    # optimisation
    parser.add_argument("--output_dir", type=str, default="diffmoe-model")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true")
    parser.add_argument("--lr_scheduler", type=str, default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--lr_num_cycles", type=int, default=1)
    parser.add_argument("--lr_power", type=float, default=1.0)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    # logging, validation, checkpoints, hub
    parser.add_argument(
        "--report_to",
        type=str,
        default=None,
        help="Trackers ('tensorboard', 'wandb', 'all', 'none'); default: tensorboard when it is installed, else none.",
    )
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--routing_log_steps", type=int, default=50, help="Log the expert load every N steps.")
    parser.add_argument("--validation_epochs", type=int, default=1)
    parser.add_argument(
        "--validation_class_labels",
        type=str,
        default=None,
        help="Class ids to sample at validation, e.g. '0,1,2'; default: the first 4 classes of the training data.",
    )
    parser.add_argument("--num_validation_images", type=int, default=1, help="Images per validation class.")
    parser.add_argument("--validation_inference_steps", type=int, default=50)
    parser.add_argument("--validation_guidance_scale", type=float, default=None)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    parser.add_argument(
        "--allow_inexact_resume",
        action="store_true",
        help="Resume even when a process's random state cannot be restored (a checkpoint of another number of "
        "processes, a missing or unreadable random_states file): the run then differs from an uninterrupted one.",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_token", type=str, default=None)
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(input_args)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    check_args(args)
    return args


def check_new_class_options(args) -> None:
    """--new_classes, --init_class_from and --routers checked; sets `args.init_class_pairs` ({new: old}),
    `args.routers` (its default) and `args.merge_lora` (a LoRA run that also trains parameters in full: its output is
    the whole pipeline with the adapter merged, see `save_final`)."""
    if args.new_classes is not None and args.preset is not None:
        raise CommandError("--new_classes is for a pretrained model; a model from --preset takes the data's classes.")
    if args.new_classes is not None and args.train_latents_dir is not None:
        raise CommandError(
            "--new_classes needs the data's class names: use --train_data_dir or a --dataset_name with named labels "
            "(latents hold class ids only)."
        )
    if args.init_class_from is not None and args.new_classes is None:
        raise CommandError("--init_class_from starts new classes: give it with --new_classes replace|append.")
    args.init_class_pairs = parse_init_class_from(args.init_class_from)
    if args.routers is None:
        args.routers = "frozen" if args.use_lora else "trained"
    args.merge_lora = args.use_lora and (args.new_classes is not None or args.routers == "trained")


def check_args(args) -> None:
    """Every option checked before any work (see training/options.py); `CommandError` names the first bad one. Also
    resolves the defaults that depend on the machine (`--report_to`) and parses `--validation_class_labels`."""
    if (args.pretrained_model_name_or_path is None) == (args.preset is None):
        raise CommandError("Give exactly one of --pretrained_model_name_or_path and --preset.")
    if args.preset is not None and args.model_family is None:
        raise CommandError("--preset needs --model_family (one of " + ", ".join(FAMILIES) + ").")
    if args.model_family is not None:
        args.model_family = resolve_family(args.model_family)
    if sum(x is not None for x in (args.dataset_name, args.train_data_dir, args.train_latents_dir)) != 1:
        raise CommandError("Give exactly one of --dataset_name, --train_data_dir and --train_latents_dir.")
    if args.use_lora and args.use_ema:
        raise CommandError("--use_ema is for full fine-tuning; LoRA training keeps no EMA.")
    kinds = set(filter(None, args.lora_layers.split(",")))
    if "router" in kinds:
        raise CommandError("Routers are never LoRA-adapted (they score experts in float32 from their raw weight).")
    if kinds - set(LORA_LAYER_KINDS) or not kinds:
        raise CommandError(
            f"--lora_layers {args.lora_layers!r}: give a comma-separated list of {', '.join(LORA_LAYER_KINDS)}."
        )
    parts = set(filter(None, args.lora_expert_parts.split(",")))
    if parts - set(EXPERT_PARTS) or not parts:
        raise CommandError(
            f"--lora_expert_parts {args.lora_expert_parts!r}: give a comma-separated list of {', '.join(EXPERT_PARTS)}."
        )
    if args.non_expert_parallel != "ddp" and args.expert_parallel_size is None:
        raise CommandError(f"--non_expert_parallel {args.non_expert_parallel} needs --expert_parallel_size.")
    check_new_class_options(args)
    check_counts(args)
    check_floats(args)
    check_preset(args)
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise CommandError(
            f"--lr_scheduler {args.lr_scheduler!r} is unknown; choose one of {', '.join(LR_SCHEDULERS)}."
        )
    if args.validation_class_labels is not None:
        args.validation_class_labels = parse_class_ids(args.validation_class_labels, "--validation_class_labels")
    args.report_to = resolve_tracker(args.report_to)
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise CommandError(
            "--use_8bit_adam needs bitsandbytes: install it (pip install bitsandbytes) or leave it out."
        )
    check_data_folder("--train_data_dir", args.train_data_dir)
    check_data_folder("--train_latents_dir", args.train_latents_dir)
    check_output_dir(args.output_dir)


# ----------------------------------------------------------------------------------------------------------------------
# models


def load_components(args, num_classes_from_data: int | None, data_id2label: dict[str, str] | None):
    """Transformer, VAE (or None) and scheduler to train, plus the class names for the saved pipeline (a fresh model
    from --preset takes the data's)."""
    if args.pretrained_model_name_or_path is not None:
        path = args.pretrained_model_name_or_path
        load_kwargs = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
        if is_model_folder(path):
            from diffusers import AutoModel

            transformer = AutoModel.from_pretrained(path, **load_kwargs)
            formulation = get_formulation(transformer.config.formulation)
            return transformer, load_vae(args, transformer.config.in_channels), formulation.default_scheduler(), None
        pipeline = ClassConditionalMoEPipeline.from_pretrained(path, **load_kwargs)
        check_scheduler(pipeline.transformer.config.formulation, pipeline.scheduler, f"{path}: scheduler/")
        vae = None if args.no_vae else pipeline.vae
        return pipeline.transformer, vae, pipeline.scheduler, pipeline.config.id2label

    overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else {}
    cls = get_family(args.model_family).model_class
    if "num_classes" not in overrides and num_classes_from_data is not None:
        overrides["num_classes"] = num_classes_from_data
    with torch.device("meta"):  # the architecture only, to know its input channels
        in_channels = cls.from_preset(args.preset, **overrides).config.in_channels
    vae = load_vae(args, in_channels)
    if "sample_size" not in overrides:
        downsampling = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        overrides["sample_size"] = args.resolution // downsampling
    transformer = cls.from_preset(args.preset, **overrides)
    id2label = None
    if data_id2label and max(int(i) for i in data_id2label) < transformer.config.num_classes:
        id2label = data_id2label
    return transformer, vae, get_formulation(transformer.config.formulation).default_scheduler(), id2label


def is_model_folder(path: str) -> bool:
    """Whether --pretrained_model_name_or_path is a local folder of a transformer alone (not of a pipeline)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "model_index.json")
    )


def transformer_outline(args) -> torch.nn.Module:
    """The transformer this run trains, built on the meta device from its preset or its config file alone (no
    weights, no data: the number of classes may still change), for checks before the expensive work."""
    if args.pretrained_model_name_or_path is None:
        overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else {}
        with torch.device("meta"):
            return get_family(args.model_family).model_class.from_preset(args.preset, **overrides)
    path = args.pretrained_model_name_or_path
    subfolder = None if is_model_folder(path) else "transformer"
    return model_outline(path, subfolder, revision=args.revision, cache_dir=args.cache_dir)


def new_classes(transformer, data_names: list[str] | None, id2label: dict[str, str] | None, args):
    """
    --new_classes: the class table of `transformer` rebuilt for the data's classes (training/new_classes.py), the plan
    logged.

    Returns:
        `(data class name -> class id, the new id2label)`.
    """
    if data_names is None:
        raise CommandError(
            f"--new_classes needs the data's class names, but column {args.label_column!r} of {args.dataset_name} has "
            "none (it is no ClassLabel column): use a dataset with named labels, or an image folder."
        )
    num_old = transformer.config.num_classes
    with user_input_errors():
        plan = plan_classes(args.new_classes, data_names, num_old, id2label, args.init_class_pairs)
    names = {class_id: name for name, class_id in plan.data_ids.items()}

    def start(class_id: int) -> str:
        source = plan.sources[class_id]
        if source is None:
            return "the mean of the old classes"
        return f"old class {source}" + (
            f" ({id2label[str(source)]!r})" if id2label and str(source) in id2label else ""
        )

    shown = "; ".join(f"{names[i]} -> {i} (from {start(i)})" for i in sorted(names))
    logger.info(
        f"--new_classes {args.new_classes}: {num_old} classes -> {plan.num_classes} (null class {plan.num_classes} "
        f"last); data classes: {shown}"
    )
    resize_class_embedding(transformer, plan.sources)
    return plan.data_ids, plan.id2label


def load_vae(args, channels: int) -> AutoencoderKL | None:
    """The VAE for a model started without one: none for pixel-space models (1 or 3 channels) or with --no_vae."""
    if args.no_vae or (args.vae_name_or_path is None and channels in (1, 3)):
        return None
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path or DEFAULT_VAE, cache_dir=args.cache_dir)
    if vae.config.latent_channels != channels:
        raise ValueError(
            f"The VAE has {vae.config.latent_channels} latent channels, the transformer takes {channels}."
        )
    return vae


def expert_part(name: str) -> str:
    """The part (of `EXPERT_PARTS`) of the linear layer `name` inside an expert or shared expert: `up` (gate_proj,
    up_proj, DiffMoE's net.0.proj), `down` (down_proj, DiffMoE's net.2) or `modulation` (anything else: the
    per-expert modulation of Diff-MoE of Cheng et al.)."""
    if re.search(r"\.(gate_proj|up_proj|net\.0\.proj)$", name):
        return "up"
    if re.search(r"\.(down_proj|net\.2)$", name):
        return "down"
    return "modulation"


def lora_target_modules(transformer, kinds: list[str], expert_parts: tuple[str, ...] = EXPERT_PARTS) -> str:
    """
    A regular expression over module names (peft matches it in full) selecting the `nn.Linear` layers of the given
    kinds: `attention` (to_q, to_k, to_v, to_out.0), `experts` (the linears of the routed experts, e.g. gate_proj /
    up_proj / down_proj or net.0.proj / net.2 in DiffMoE of Shi et al.), `shared_experts`, `dense_ff` (feed-forwards of
    blocks without experts); in experts and shared experts only the `expert_parts` (see `expert_part`). Routers,
    capacity predictors and modulation / embedding layers of the blocks are never selected.
    """
    patterns = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith("transformer_blocks."):
            continue
        if re.search(r"\.attn\.(to_q|to_k|to_v|to_out\.0)$", name):
            kind = "attention"
        elif ".ff.shared_experts." in name:
            kind = "shared_experts"
        elif ".ff.experts." in name:
            kind = "experts"
        elif ".ff." in name and not re.search(r"\.ff\.(router|gate|capacity_predictor|recalibration)\b", name):
            kind = "dense_ff"
        else:
            continue
        if kind in ("experts", "shared_experts") and expert_part(name) not in expert_parts:
            continue
        if kind in kinds:
            patterns.append(re.sub(r"\\\.(\d+)\\\.", r"\\.\\d+\\.", re.escape(name)))
    if not patterns:
        raise ValueError(
            f"--lora_layers {','.join(kinds)} (expert parts {','.join(expert_parts)}): the transformer has no layers "
            f"of these kinds to adapt; choose among {', '.join(LORA_LAYER_KINDS)}."
        )
    return "|".join(sorted(set(patterns)))


# ----------------------------------------------------------------------------------------------------------------------
# training


def cast_keeping_float32_modules(model, device, dtype: torch.dtype):
    """`model` moved to `device` with its floating-point parameters and buffers in `dtype`, except those of the modules
    its class keeps in float32 (`_keep_in_fp32_modules`, e.g. routers), as `from_pretrained(torch_dtype=...)` casts;
    unlike `ModelMixin.to(dtype)`, which casts those too and warns about them. Returns `model`."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    model.to(device)
    for name, module in model.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(target)
    return model


# where torchrun / accelerate launch and MPI launchers put the number of processes (as accelerate reads it)
LAUNCHER_WORLD_SIZES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


def exact_resume_ddp_kwargs(num_processes: int) -> DistributedDataParallelKwargs:
    """
    DDP's options for a run that resumes bit for bit. DDP rebuilds its gradient buckets once, after the first step, in
    the order the gradients became ready, so a resumed run's first step reduces in the initial layout; with more than
    2 processes another layout adds each gradient's terms in another order (measured: last-bit differences up to 1e-5
    after 2 steps of 4 processes). A DDP that looks for unused parameters never rebuilds, at the price of one autograd
    graph traversal per step (1% of a step measured here) and torch's warning that it found none (the training loop
    touches every parameter, see `touch_all_parameters`).
    """
    return DistributedDataParallelKwargs(find_unused_parameters=num_processes > 2)


def unwrap(accelerator, model):
    model = accelerator.unwrap_model(model)
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[exact_resume_ddp_kwargs(get_int_from_env(LAUNCHER_WORLD_SIZES, 1))],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true" and accelerator.distributed_type != engine:
            logger.warning(
                f"The accelerate config asks for {engine} but accelerate runs {accelerator.distributed_type.value} (it "
                f"enables {engine} only on GPUs or other accelerators): parameters and optimizer states are not "
                "sharded."
            )
    native_checkpoints = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else 0
    sharded_params = accelerator.distributed_type == DistributedType.FSDP or zero_stage == 3
    # DDP reduces every parameter's gradient once per step; experts that received no token and the capacity predictor
    # of DiffMoE (Shi et al.; trained only through its side loss, which DDP's unused-parameter search cannot see) get
    # theirs through a zero-weighted term, which also keeps gradient checkpointing compatible with DDP
    # (FSDP2 on the non-expert weights under EP reduces every gradient whether its parameter was used or not)
    touch_all_parameters = (
        accelerator.num_processes > 1 and not native_checkpoints and args.non_expert_parallel == "ddp"
    )
    if args.use_ema and sharded_params:
        raise CommandError("--use_ema needs every rank to hold full parameters: use DDP or DeepSpeed ZeRO-2.")
    expert_parallel = None
    if args.expert_parallel_size is not None:
        check_expert_parallel_arguments(args, accelerator.num_processes, native_checkpoints)
        expert_parallel = ExpertParallelTraining(
            args.expert_parallel_size, args.non_expert_parallel, accelerator.device.type
        )
        with user_input_errors():  # the expert counts, before the data and the weights are read
            expert_parallel.check_model(transformer_outline(args))
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_incomplete_checkpoints(args.output_dir)
    resume_path = None  # resolved before any work, so that a wrong path is reported at once
    if args.resume_from_checkpoint:
        with user_input_errors():
            resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        check_random_state(resume_path, accelerator, args.allow_inexact_resume)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # data (first: a fresh model takes its number of classes from it)
    class_names, image_dataset = None, None
    if args.train_latents_dir is None:
        with accelerator.main_process_first(), user_input_errors():
            image_dataset, class_names = load_image_dataset(
                args.dataset_name,
                args.dataset_config_name,
                args.train_data_dir,
                args.cache_dir,
                args.image_column,
                args.label_column,
            )
    # image folders: class ids from the folder names (see folder_class_ids), for a fresh model from the data alone
    num_classes_from_data, data_id2label, folder_ids = None, None, None
    if args.train_data_dir is not None and args.preset is not None:
        with user_input_errors():
            folder_ids = folder_class_ids(class_names)
    if folder_ids is not None:
        num_classes_from_data = max(folder_ids.values()) + 1
        data_id2label = {str(class_id): name for name, class_id in sorted(folder_ids.items(), key=lambda x: x[1])}
    elif class_names is not None:
        num_classes_from_data = len(class_names)
        data_id2label = {str(class_id): name for class_id, name in enumerate(class_names)}

    building = expert_parallel.building() if expert_parallel is not None else contextlib.nullcontext()
    with user_input_errors(), building:
        transformer, vae, noise_scheduler, id2label = load_components(args, num_classes_from_data, data_id2label)
    if args.new_classes is not None:
        folder_ids, id2label = new_classes(transformer, class_names, id2label, args)
        image_dataset = relabel(image_dataset, args.label_column, class_names, folder_ids)
    if expert_parallel is not None:
        expert_parallel.prepare(transformer)
    config = transformer.config
    if args.train_data_dir is not None and args.new_classes is None:
        if folder_ids is None:
            with user_input_errors():
                folder_ids = folder_class_ids(class_names, config.num_classes, id2label)
        by_id = sorted(folder_ids.items(), key=lambda item: item[1])
        mapping = ", ".join(f"{name}/ -> {class_id}" for name, class_id in by_id)
        logger.info(f"Class folders of {args.train_data_dir} -> class ids: {mapping}")
        image_dataset = relabel(image_dataset, args.label_column, class_names, folder_ids)
    formulation = get_formulation(config.formulation).for_model(config)
    if args.class_dropout_prob is not None:
        labels = transformer.embedding.class_embedder
        if args.class_dropout_prob > 0 and labels.embedding_table.num_embeddings <= config.num_classes:
            raise CommandError(
                f"--class_dropout_prob {args.class_dropout_prob}: this model has no null-class embedding, so its "
                "labels cannot be dropped; leave the option out or set it to 0."
            )
        labels.dropout_prob = args.class_dropout_prob
        transformer.register_to_config(class_dropout_prob=args.class_dropout_prob)
    sample_shape = (config.in_channels, config.sample_size, config.sample_size)
    if vae is None and config.in_channels not in (1, 3) and args.train_latents_dir is None:
        raise CommandError(f"A {config.in_channels}-channel model trained on images needs a VAE (--vae_name_or_path).")

    if args.train_latents_dir is not None:
        with user_input_errors():
            train_dataset = LatentDataset(args.train_latents_dir, sample_shape, config.num_classes)
        if vae is not None and abs(train_dataset.metadata["scaling_factor"] - vae.config.scaling_factor) > 1e-8:
            raise CommandError(
                f"The latents of {args.train_latents_dir} were scaled by {train_dataset.metadata['scaling_factor']}, "
                f"this VAE scales by {vae.config.scaling_factor}: extract them again with this VAE."
            )
        data_classes = sorted(set(train_dataset.labels.tolist()))
    else:
        with user_input_errors():
            check_labels(image_dataset, args.label_column, config.num_classes, args.image_column)
        if args.max_train_samples is not None:
            if args.max_train_samples > len(image_dataset):
                raise CommandError(
                    f"--max_train_samples {args.max_train_samples} is more than the {len(image_dataset)} samples of "
                    "the data: lower it or leave it out."
                )
            image_dataset = image_dataset.shuffle(seed=args.seed).select(range(args.max_train_samples))
        if args.image_check != "none":
            image_dataset = without_unreadable_images(image_dataset, args, accelerator)
        data_classes = sorted(set(image_dataset[args.label_column]))
        channels = 3 if vae is not None else config.in_channels
        train_dataset = image_dataset.with_transform(
            ImageTransform(args.resolution, channels, args.image_column, args.label_column)
        )
        size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
        if (config.in_channels, size, size) != sample_shape:
            raise CommandError(
                f"--resolution {args.resolution} gives inputs of shape {(config.in_channels, size, size)} but the model"
                f" takes {sample_shape}: train at --resolution {args.resolution * config.sample_size // size}."
            )
    if args.validation_epochs:
        args.validation_class_labels = choose_validation_classes(
            args.validation_class_labels, config.num_classes, data_classes
        )

    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)  # mixed precision "no": float32
    if vae is not None:
        cast_keeping_float32_modules(vae.requires_grad_(False), accelerator.device, torch.float32).eval()
    if args.cache_latents and vae is not None and args.train_latents_dir is None:
        train_dataset = encode_dataset(train_dataset, vae, args, accelerator)

    # model to train
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        cast_keeping_float32_modules(transformer, accelerator.device, weight_dtype)
        kinds = [kind for kind in args.lora_layers.split(",") if kind]
        parts = tuple(part for part in args.lora_expert_parts.split(",") if part)
        with user_input_errors():
            target_modules = lora_target_modules(transformer, kinds, parts)
        transformer.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.lora_alpha or args.rank,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=target_modules,
            )
        )
        if expert_parallel is not None:  # each expert rank's adapters from its own random stream
            expert_parallel.draw_expert_adapters(transformer)
        if args.new_classes is not None:  # the resized class table is trained in full
            transformer.embedding.class_embedder.requires_grad_(True)
        if args.routers == "trained":  # routers are float32 modules already
            for parameter in router_parameters(transformer):
                parameter.requires_grad_(True)
        if args.mixed_precision == "fp16":
            cast_training_params(transformer, dtype=torch.float32)
    else:
        transformer.requires_grad_(True).to(accelerator.device)
        if args.routers == "frozen":
            for parameter in router_parameters(transformer):
                parameter.requires_grad_(False)
    logger.info(
        f"Parameters by group (trained: in full, or through LoRA adapters):\n{trainable_parameter_table(transformer)}"
    )
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if expert_parallel is not None:  # the experts out of DDP, or the rest sharded, before the EMA and optimizer
        expert_parallel.distribute(transformer)

    ema = None
    if args.use_ema:
        ema = EMAModel(
            [p.detach().clone() for p in transformer.parameters()],
            decay=args.ema_decay,
            model_cls=type(transformer),
            model_config=transformer.config,
        )
        ema.to("cpu" if args.offload_ema else accelerator.device)

    # checkpoints in diffusers formats (LoRA via save_lora_weights, full models via save_pretrained); DeepSpeed and FSDP
    # keep their own sharded formats and the final model is gathered at the end
    def save_model_hook(models, weights, output_dir):
        if expert_parallel is not None:  # every rank saves what it holds; accelerate saves no model
            expert_parallel.save(output_dir, unwrap(accelerator, transformer), optimizer.optimizer, ema)
            weights.clear()
            return
        if not accelerator.is_main_process:
            return
        if ema is not None:
            ema.save_pretrained(os.path.join(output_dir, "transformer_ema"))
        if native_checkpoints:
            return
        for model in models:
            model = unwrap(accelerator, model)
            if args.use_lora:
                from peft.utils import get_peft_model_state_dict

                ClassConditionalMoEPipeline.save_lora_weights(
                    output_dir,
                    transformer_lora_layers=get_peft_model_state_dict(model),
                    **_collate_lora_metadata({"transformer": model}),
                )
                save_non_lora_state(model, output_dir)
            else:
                model.save_pretrained(os.path.join(output_dir, "transformer"))
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        if expert_parallel is not None:  # accelerate loads no model
            models.clear()
            expert_parallel.load(input_dir, unwrap(accelerator, transformer), optimizer.optimizer, ema)
            return
        if ema is not None:
            # the model class, not the DDP wrapper `transformer` is after `prepare`
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "transformer_ema"), ema.model_cls)
            ema.load_state_dict(loaded.state_dict())
            ema.to("cpu" if args.offload_ema else accelerator.device)
        if native_checkpoints:
            return
        while models:
            model = unwrap(accelerator, models.pop())
            if args.use_lora:
                from peft.utils import set_peft_model_state_dict

                state = ClassConditionalMoEPipeline.lora_state_dict(input_dir)
                state = {k.removeprefix("transformer."): v for k, v in state.items()}
                incompatible = set_peft_model_state_dict(model, state, adapter_name="default")
                if getattr(incompatible, "unexpected_keys", None):
                    raise ValueError(f"Unexpected LoRA keys in {input_dir}: {incompatible.unexpected_keys[:5]}")
                load_non_lora_state(model, input_dir)
                if args.mixed_precision == "fp16":
                    cast_training_params(model, dtype=torch.float32)
            else:
                loaded = type(model).from_pretrained(input_dir, subfolder="transformer")
                model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in transformer.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    if len(train_dataset) == 0:
        raise CommandError("The dataset has no samples left to train on: add data.")
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(train_dataset) < global_batch:  # a few images: every epoch holds each of them several times
        repeats = math.ceil(global_batch / len(train_dataset))
        logger.warning(
            f"The dataset has {len(train_dataset)} samples, fewer than one batch of {global_batch}: each epoch goes "
            f"through them {repeats} times."
        )
        train_dataset = repeated_to_fill(train_dataset, repeats)
    # its own generator: starting an epoch then draws no number from the global RNG, so a resumed run that skips
    # batches consumes the same random numbers as an uninterrupted one
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed or 0),
    )

    num_warmup_steps = args.lr_warmup_steps * accelerator.num_processes
    if args.max_train_steps is None:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
        num_training_steps = args.num_train_epochs * steps_per_epoch * accelerator.num_processes
    else:
        num_training_steps = args.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    if expert_parallel is not None and expert_parallel.shards_non_experts:  # sharded already: no DDP around it
        optimizer, train_dataloader, lr_scheduler = accelerator.prepare(optimizer, train_dataloader, lr_scheduler)
    else:
        transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            transformer, optimizer, train_dataloader, lr_scheduler
        )
    if expert_parallel is not None:  # its state is saved per rank by the hooks, not by accelerate
        accelerator._optimizers.remove(optimizer)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("diffmoe-training", config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Family = {type(unwrap(accelerator, transformer)).__name__}, formulation = {formulation.name}")
    logger.info(f"  Num examples = {len(train_dataset)}, num epochs = {args.num_train_epochs}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    global_step, first_epoch, resume_batches = 0, 0, 0
    record = model_record(unwrap(accelerator, transformer), args)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No complete checkpoint in {args.output_dir}: starting a new training run.")
    elif resume_path is not None:
        saved = read_marker(resume_path)
        reason = why_model_differs(resume_path, record)
        if reason is not None:
            raise CommandError(
                f"--resume_from_checkpoint {resume_path} does not fit this run: {reason}. Resume with the model and "
                "options the checkpoint was written with, or start a new run in another --output_dir."
            )
        logger.info(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)
        global_step = saved["step"]
        first_epoch = global_step // steps_per_epoch
        resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    time_sampling = TimeSampling(args.weighting_scheme, args.logit_mean, args.logit_std)
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    model = unwrap(accelerator, transformer)

    model_outputs = []  # the model outputs of the current step, for their MoE auxiliary losses
    # accelerate's `prepare` makes a model's forward autocast; a model it did not prepare (FSDP2 under EP) needs it here
    sharded_here = expert_parallel is not None and expert_parallel.shards_non_experts
    autocast = accelerator.autocast if sharded_here else contextlib.nullcontext

    def denoiser(sample, timestep, class_labels):
        # a LoRA model's frozen weights are in weight_dtype: feed it inputs of that dtype (autocast may be off, e.g.
        # fp16 on the CPU); the losses are computed in float32 from its output
        with autocast():
            output = transformer(sample.to(weight_dtype) if args.use_lora else sample, timestep, class_labels)
        model_outputs.append(output)
        return output

    start_time, start_step = time.perf_counter(), global_step
    for epoch in range(first_epoch, args.num_train_epochs):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
            log_routing = (global_step + 1) % args.routing_log_steps == 0
            with accelerator.accumulate(transformer):
                x0 = prepare_x0(batch["x0"], vae, args.random_flip)
                recording = record_routing(model, keep_expert_ids=False) if log_routing else contextlib.nullcontext()
                model_outputs.clear()
                with recording as routing:
                    result = diffusion_training_loss(
                        formulation,
                        denoiser,
                        x0,
                        batch["class_labels"],
                        scheduler=noise_scheduler,
                        time_sampling=time_sampling,
                    )
                aux_losses = [output.aux_loss for output in model_outputs if output.aux_loss is not None]
                aux = torch.stack(aux_losses).sum() if aux_losses else None
                loss = (
                    result.loss if aux is None or args.aux_loss_coef == 0 else result.loss + args.aux_loss_coef * aux
                )
                if touch_all_parameters:
                    loss = loss + 0.0 * sum(p.sum() for p in params)
                accelerator.backward(loss)
                if expert_parallel is not None:
                    if accelerator.sync_gradients:
                        expert_parallel.finish_gradients(model, args.max_grad_norm)
                elif accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            progress_bar.update(1)
            logs = {"loss": result.loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            if result.vb is not None:
                logs["vb"] = result.vb.detach().item()
            if aux is not None:
                logs["moe_aux_loss"] = aux.detach().item()
            if log_routing:
                logs.update(routing.summary(per_expert=True))
            progress_bar.set_postfix(loss=logs["loss"])
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:  # every process saves its random state
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, record)
            if global_step >= args.max_train_steps:
                break

        # the last epoch's validation is the final one, after the weights are saved
        validate = args.validation_epochs and (epoch + 1) % args.validation_epochs == 0
        validate = validate and global_step < args.max_train_steps
        every_rank_samples = sharded_params or expert_parallel is not None  # sharded weights or experts
        if validate and (accelerator.is_main_process or every_rank_samples):
            log_validation(model, vae, noise_scheduler, id2label, args, accelerator, ema, global_step)

    elapsed = time.perf_counter() - start_time
    if global_step > start_step:
        logger.info(
            f"  {global_step - start_step} steps in {elapsed:.1f}s ({(global_step - start_step) / elapsed:.2f} "
            "steps/s, checkpoints and validation included)"
        )

    accelerator.wait_for_everyone()
    if expert_parallel is not None:  # the main process exports every expert (the EMA weights if kept)
        model, ema = expert_parallel.full_model(model, ema), None
    save_final(
        accelerator, transformer, model, vae, noise_scheduler, id2label, ema, args, native_checkpoints, sharded_params
    )
    accelerator.end_training()


def check_random_state(resume_path: str | None, accelerator, allow_inexact: bool) -> None:
    """Refuses to resume from `resume_path` when this process cannot restore its random state (the run would not
    continue as an uninterrupted one), or with `allow_inexact` says so in a warning."""
    if resume_path is None:
        return
    reason = why_random_state_unrestorable(
        resume_path, accelerator.process_index, accelerator.num_processes, accelerator.device.type
    )
    if reason is None:
        return
    message = f"Process {accelerator.process_index} cannot restore its random state from {resume_path}: {reason}"
    if not allow_inexact:
        raise CommandError(
            f"{message}. Resume with the same number of processes and devices it was saved with, or pass "
            "--allow_inexact_resume to continue with fresh random states."
        )
    logger.warning(
        f"{message}. --allow_inexact_resume: continuing with fresh random states; THIS RUN IS NO LONGER EXACT (it "
        "differs from an uninterrupted one).",
        main_process_only=False,
    )


def choose_validation_classes(requested: list[int] | None, num_classes: int, data_classes: list[int]) -> list[int]:
    """
    The classes validation samples: `requested` (--validation_class_labels), else the first 4 classes of the training
    data. A `CommandError` for a class the model lacks; a warning names requested classes the data lacks.
    """
    if requested is None:
        return data_classes[:4]
    beyond = [label for label in requested if label >= num_classes]
    if beyond:
        raise CommandError(
            f"--validation_class_labels {','.join(map(str, beyond))}: the model has classes 0..{num_classes - 1}; "
            "give class ids in that range."
        )
    absent = [label for label in requested if label not in set(data_classes)]
    if absent:
        shown = ", ".join(map(str, data_classes[:20])) + (", ..." if len(data_classes) > 20 else "")
        logger.warning(
            f"--validation_class_labels {','.join(map(str, absent))} are not in the training data (its classes: "
            f"{shown}): their validation images show the model's other classes, not what it learns here."
        )
    return requested


def without_unreadable_images(dataset, args, accelerator):
    """`dataset` after reading every image (the processes share the work): unchanged when all are readable, without
    the unreadable ones with --skip_unreadable_images (a warning names them), else a `CommandError` naming them."""
    bad = find_unreadable_images(
        dataset,
        args.image_column,
        args.image_check == "decode",
        accelerator.num_processes,
        accelerator.process_index,
        progress=accelerator.is_local_main_process,
    )
    if accelerator.num_processes > 1:
        bad = gather_object(bad)
    if not bad:
        return dataset
    bad = sorted(bad)
    listed = "; ".join(message for _, message in bad[:10]) + (f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
    summary = f"{len(bad)} of {len(dataset)} training images cannot be read: {listed}"
    if not args.skip_unreadable_images:
        raise CommandError(
            f"{summary}. Replace or delete these files, or pass --skip_unreadable_images to train without them."
        )
    logger.warning(f"{summary}. Training without them (--skip_unreadable_images).")
    unreadable = {row for row, _ in bad}
    return dataset.select([row for row in range(len(dataset)) if row not in unreadable])


def prepare_x0(x0: torch.Tensor, vae, random_flip: bool) -> torch.Tensor:
    """The batch's clean data: images (flipped at random, encoded when a VAE is used) or pre-extracted latents."""
    if random_flip:
        flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    if vae is None or x0.shape[1] == vae.config.latent_channels:
        return x0
    with torch.no_grad():
        latents = vae.encode(x0.to(vae.dtype)).latent_dist.sample()
    return (latents * vae.config.scaling_factor).float()


def encode_dataset(dataset, vae, args, accelerator) -> list[dict]:
    """--cache_latents: every image encoded once (one VAE posterior sample, DiT-style)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate)
    cached = []
    for batch in tqdm(loader, desc="Caching latents", disable=not accelerator.is_local_main_process):
        latents = prepare_x0(batch["x0"].to(accelerator.device), vae, random_flip=False).cpu()
        cached.extend({"x0": x, "class_labels": y} for x, y in zip(latents, batch["class_labels"]))
    return cached


def validation_labels(args) -> list[int]:
    """The class of each validation image: every class of `choose_validation_classes`, --num_validation_images
    times."""
    return [label for label in args.validation_class_labels for _ in range(args.num_validation_images)]


def log_validation(model, vae, scheduler, id2label, args, accelerator, ema, global_step: int, final: bool = False):
    """Samples the validation classes (with the EMA weights if any), saves the images and logs them to the trackers."""
    logger.info(f"Running validation at step {global_step}")
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    pipeline = ClassConditionalMoEPipeline(
        transformer=model, scheduler=copy.deepcopy(scheduler), vae=vae, id2label=id2label
    )
    pipeline.set_progress_bar_config(disable=True)
    labels = validation_labels(args)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    model.eval()
    with torch.random.fork_rng(devices=[]), accelerator.autocast():
        images = pipeline(
            class_labels=labels,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            generator=generator,
            output_type="pil",
        ).images
    model.train()
    if ema is not None:
        ema.restore(model.parameters())

    if not accelerator.is_main_process:
        return images
    folder = os.path.join(args.output_dir, "validation", "final" if final else f"step-{global_step}")
    os.makedirs(folder, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        image.save(os.path.join(folder, f"{i:03d}-class{label}.png"))
    phase = "test" if final else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(phase, stacked, global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({phase: [wandb.Image(img, caption=f"class {y}") for img, y in zip(images, labels)]})
    del pipeline
    free_memory()
    return images


def save_final(
    accelerator, transformer, model, vae, scheduler, id2label, ema, args, native_checkpoints, sharded_params
) -> None:
    """LoRA weights (`save_lora_weights`) or the whole pipeline (EMA weights if kept; for a LoRA run that trains
    parameters in full, --new_classes or --routers trained, the adapter merged), a model card, optional push."""
    state_dict = accelerator.get_state_dict(transformer) if native_checkpoints else None  # collective
    if not accelerator.is_main_process:
        return
    saves_lora = args.use_lora and not args.merge_lora
    if args.merge_lora:
        model = merged_lora_model(model, state_dict).to(accelerator.device)
    elif state_dict is not None and not args.use_lora:  # gathered from DeepSpeed / FSDP shards
        model = type(model).from_config(model.config)
        model.load_state_dict(state_dict)
        model.to(accelerator.device)
    if not saves_lora:
        model = cast_keeping_float32_modules(model, accelerator.device, torch.float32)
    if ema is not None and not saves_lora:
        ema.copy_to(model.parameters())
    with staged_final_output(args.output_dir) as staging:  # Ctrl-C or a crash leaves no half-written weights
        if saves_lora:
            from peft.utils import get_peft_model_state_dict

            ClassConditionalMoEPipeline.save_lora_weights(
                staging,
                transformer_lora_layers=get_peft_model_state_dict(model, state_dict=state_dict),
                **_collate_lora_metadata({"transformer": model}),
            )
        else:
            pipeline = ClassConditionalMoEPipeline(transformer=model, scheduler=scheduler, vae=vae, id2label=id2label)
            pipeline.save_pretrained(staging)
    apply_umask(args.output_dir, skip=(r"checkpoint-.*", re.escape(args.logging_dir), "validation"))

    images = None
    if args.validation_epochs and not (sharded_params and saves_lora):
        images = log_validation(model, vae, scheduler, id2label, args, accelerator, None, args.max_train_steps, True)
    repo_id = args.hub_model_id or Path(args.output_dir).name
    save_model_card(repo_id, args, model, images)
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            token=args.hub_token,
            ignore_patterns=["step_*", "epoch_*", "checkpoint-*", "logs/*"],
        )


def merged_note(args) -> str:
    """The model card's sentence about a merged LoRA run and new classes (empty for other runs)."""
    note = ""
    if args.new_classes is not None:
        note = f"Its classes are new (`--new_classes {args.new_classes}`), named in `model_index.json` (`id2label`). "
    if args.merge_lora:
        trained = ["the resized class embedding"] * (args.new_classes is not None) + ["the routers"] * (
            args.routers == "trained"
        )
        note += (
            f"The LoRA adapter is merged into the weights: {' and '.join(trained)} were trained in full, which a LoRA "
            "adapter cannot carry, so this folder holds the whole model (no `load_lora_weights` on the base model)."
        )
    return note


def save_model_card(repo_id: str, args, model, images) -> None:
    base = (
        args.pretrained_model_name_or_path
        or f"{get_family(args.model_family).label} preset {args.preset} (fresh weights)"
    )
    kind = "LoRA adapter" if args.use_lora and not args.merge_lora else "model"
    family = type(model).__name__
    images_md = ""
    if images:
        folder = os.path.join(args.output_dir, "validation", "final")
        images_md = "\n".join(f"![{name}](validation/final/{name})" for name in sorted(os.listdir(folder)))
    if args.use_lora and not args.merge_lora:
        usage = (
            "```python\nfrom diffmoe_hf import ClassConditionalMoEPipeline\n\n"
            f'pipe = ClassConditionalMoEPipeline.from_pretrained("{args.pretrained_model_name_or_path}")\n'
            f'pipe.load_lora_weights("{repo_id}")\nimage = pipe(class_labels=[0]).images[0]\n```'
        )
    else:
        usage = (
            "```python\nfrom diffmoe_hf import ClassConditionalMoEPipeline\n\n"
            f'pipe = ClassConditionalMoEPipeline.from_pretrained("{repo_id}")\n'
            "image = pipe(class_labels=[0]).images[0]\n```"
        )
    description = f"""
# {repo_id}

A class-conditional {family} {kind} trained with `diffmoe_hf`'s `training/train_class_conditional.py` from
{base}, formulation `{model.config.formulation}`, {args.max_train_steps} steps, learning rate {args.learning_rate},
batch size {args.train_batch_size} per device, mixed precision {args.mixed_precision}
{f"(LoRA rank {args.rank}, layers {args.lora_layers})" if args.use_lora else ("(EMA weights)" if args.use_ema else "")}.
{merged_note(args)}

## Usage

{usage}

## Validation samples

{images_md or "None logged."}
"""
    # made here from diffusers' training template: loading an existing card would contact the Hub (and could take
    # another repo's README when repo_id names one)
    card_data = ModelCardData(
        license="apache-2.0", library_name="diffusers", base_model=args.pretrained_model_name_or_path
    )
    card = ModelCard.from_template(card_data, template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    tags = [
        "diffusers",
        "diffmoe_hf",
        "class-conditional",
        "mixture-of-experts",
        family,
        "lora" if args.use_lora else "full",
    ]
    card = populate_model_card(card, tags=tags)
    card.save(os.path.join(args.output_dir, "README.md"))


def run(argv: list[str] | None = None) -> int:
    """The script's entry point: trains, and returns the exit status (see `run_script`)."""
    return run_script(SCRIPT, parse_args, main, argv, lambda args: what_was_kept(args.output_dir if args else None))


def what_was_kept(output_dir: str | None) -> str:
    """After an interruption: removes the checkpoint being written, names the newest complete one (for messages)."""
    if output_dir is None or not os.path.isdir(output_dir):
        return "nothing was written."
    for name in os.listdir(output_dir):
        if LEFTOVER_NAME.fullmatch(name) or name == FINAL_STAGING:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for step in reversed(checkpoint_steps(output_dir)):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if why_incomplete(path) is None:
            return f"kept {path} (step {step}); continue with --resume_from_checkpoint latest."
    return f"no checkpoint was kept in {output_dir} (none was complete yet)."


if __name__ == "__main__":
    sys.exit(run())
