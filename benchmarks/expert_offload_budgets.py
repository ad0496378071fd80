"""Memory and speed budgets of the expert-offload tiers on DiT-MoE models of the real sizes, with random weights.

One measurement per process (`python -m benchmarks.expert_offload_budgets measure ...`), so that each peak is its own:
the model is built on the meta device, its non-expert weights drawn in memory and each expert bank drawn right before
its tier takes it (`benchmarks.streamed_models`: never the whole model in memory; the `disk` tier writes the experts
to the offload folder bank by bank), then the pipeline samples `--steps` steps of one image at 256x256 px (32x32
latents) with the model's default guidance (classifier-free guidance: a batch of 2 through the transformer), returning
latents (no VAE). Recorded: the peak RssAnon and VmRSS of the process while building and while sampling (sampled every 2 ms from
/proc; VmHWM, the kernel's own peak of VmRSS; RssAnon at the start: the imported libraries), the bytes the plan
computes, the seconds of building and of sampling per step, and on
CUDA the peak allocated device memory (`torch.cuda.max_memory_allocated`).

`--blocks N` measures the full width with only N of the model's blocks (where the full model does not fit this
machine's memory or disk); the row then also carries the full-depth numbers extrapolated per block: resident bytes
grow by the non-expert bytes of one block (computed), seconds per step by the measured time per block.

`python -m benchmarks.expert_offload_budgets table RESULTS.jsonl` prints the Markdown table of README.md; a row whose
device is not present on the machine is written as "not measured" (the GPU rows on a CPU-only machine).
"""

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time

import torch

from benchmarks.process_memory import PeakMemory
from benchmarks.streamed_models import streamed_model
from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.conversion.low_memory import init_empty_model
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.models.moe.offload import EXPERT_OFFLOAD_TIERS, enable_expert_offload, plan_expert_offload
from diffmoe_hf.models.transformer_dit_moe import DIT_MOE_PRESETS, DiTMoETransformer2DModel


MODELS = {
    "DiT-MoE-XL/2-8E2A": dict(DIT_MOE_PRESETS["DiT-MoE-XL/2"], num_experts=8, num_experts_per_tok=2),
    "DiT-MoE-G/2-16E2A": dict(DIT_MOE_PRESETS["DiT-MoE-G/2"], num_experts=16, num_experts_per_tok=2),
}
LATENT = dict(sample_size=32, in_channels=4, out_channels=8, num_classes=1000)  # 256x256 px through the SD VAE
GIB = 1024**3


def model_config(name: str, blocks: int | None) -> dict:
    config = dict(MODELS[name], **LATENT)
    if blocks is not None:
        config["num_layers"] = blocks
    return config


def measure(args) -> dict:
    """Builds, samples and measures one (model, tier, device, blocks) case; returns its record."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = model_config(args.model, args.blocks)
    plan_tier = "none" if args.tier == "cpu" else args.tier
    # the disk tier stores the experts in bfloat16 (as released checkpoints are) and casts each projection when it
    # runs; the other tiers draw them in the compute dtype
    stored_dtype = torch.bfloat16 if args.tier == "disk" else dtype
    plan = plan_expert_offload(init_empty_model(DiTMoETransformer2DModel, **config), args.tier, dtype, stored_dtype)
    folder = None
    if args.tier == "disk":
        folder = args.offload_dir or tempfile.mkdtemp(prefix="diffmoe-budget-")
    with PeakMemory() as building:
        start = time.perf_counter()
        transformer = streamed_model(
            DiTMoETransformer2DModel, config, plan_tier, folder, dtype=dtype, stored_dtype=stored_dtype
        )
        if args.tier == "cpu":
            enable_expert_offload(transformer, "cpu")
        else:
            transformer.to(device)
        built = time.perf_counter() - start
        gc.collect()
    with PeakMemory() as sampling:
        pipe = ClassConditionalMoEPipeline(
            transformer=transformer, scheduler=get_formulation(transformer.config.formulation).default_scheduler()
        )
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        latents = pipe(class_labels=[207], num_inference_steps=args.steps, generator=generator, output_type="latent")
        sampled = time.perf_counter() - start
    if folder is not None and args.offload_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    full_layers = MODELS[args.model]["num_layers"]
    layers = config["num_layers"]
    resident_per_block = _resident_bytes_per_block(args.model, dtype)
    record = dict(
        model=args.model,
        tier=args.tier,
        device=str(device),
        dtype=args.dtype,
        stored_dtype=str(stored_dtype).removeprefix("torch."),
        blocks=layers,
        full_blocks=full_layers,
        steps=args.steps,
        start_rss_anon=building.start["RssAnon"],
        building_peak_rss_anon=building.peak_anon,
        peak_rss_anon=max(building.peak_anon, sampling.peak_anon),
        sampling_peak_rss_anon=sampling.peak_anon,
        peak_vm_rss=max(building.peak_rss, sampling.peak_rss),
        sampling_peak_vm_rss=sampling.peak_rss,
        vm_hwm=sampling.hwm,
        plan_resident=plan.resident_bytes,
        plan_experts=plan.expert_bytes,
        plan_tier_resident=plan.tier_resident_bytes,
        plan_stored=plan.stored_bytes,
        build_seconds=built,
        seconds_per_step=sampled / args.steps,
        finite=bool(torch.isfinite(latents.images).all()),
        threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        record["peak_device_allocated"] = torch.cuda.max_memory_allocated(device)
    if layers != full_layers:
        extra = full_layers - layers
        record["extrapolated_peak_rss_anon"] = record["peak_rss_anon"] + extra * resident_per_block[args.tier]
        record["extrapolated_seconds_per_step"] = record["seconds_per_step"] * full_layers / layers
    return record


def _resident_bytes_per_block(name: str, dtype: torch.dtype) -> dict[str, int]:
    """Per tier: the bytes one more block keeps resident (the plan of 2 blocks minus the plan of 1 block)."""
    plans = {
        blocks: {
            tier: plan_expert_offload(
                init_empty_model(DiTMoETransformer2DModel, **model_config(name, blocks)), tier, dtype
            ).peak_bytes
            for tier in EXPERT_OFFLOAD_TIERS
        }
        for blocks in (1, 2)
    }
    return {tier: plans[2][tier] - plans[1][tier] for tier in EXPERT_OFFLOAD_TIERS}


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def table(path: str) -> str:
    """The Markdown table of the records in the JSON-lines file `path`."""
    lines = [
        "| model | tier | device | blocks measured | peak RssAnon GiB: building / sampling | peak VmRSS GiB "
        "| peak device GiB | plan: weights resident GiB | s / step | full depth, extrapolated: peak RssAnon GiB, s / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    for r in records:
        if r.get("not_measured"):
            lines.append(f"| {r['model']} | {r['tier']} | {r['device']} | not measured | | | | | | |")
            continue
        extrapolated = "(all blocks measured)"
        if r["blocks"] != r["full_blocks"]:
            extrapolated = f"{_gib(r['extrapolated_peak_rss_anon'])}, {r['extrapolated_seconds_per_step']:.0f}"
        lines.append(
            f"| {r['model']} | {r['tier']} | {r['device']} | {r['blocks']} of {r['full_blocks']} "
            f"| {_gib(r['building_peak_rss_anon'])} / {_gib(r['sampling_peak_rss_anon'])} | {_gib(r['peak_vm_rss'])} "
            f"| {_gib(r.get('peak_device_allocated'))} | {_gib(r['plan_resident'] + r['plan_tier_resident'])} | {r['seconds_per_step']:.0f} | {extrapolated} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="measure one case and append its JSON record to --output")
    run.add_argument("--model", choices=sorted(MODELS), required=True)
    run.add_argument("--tier", choices=EXPERT_OFFLOAD_TIERS, required=True)
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--blocks", type=int, help="measure with this many blocks (default: all)")
    run.add_argument("--steps", type=int, default=1)
    run.add_argument("--offload-dir", help="disk tier folder (default: a temporary folder, removed afterwards)")
    run.add_argument("--output", required=True, help="JSON-lines file the record is appended to")
    show = commands.add_parser("table", help="print the Markdown table of a JSON-lines file")
    show.add_argument("results")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table(args.results))
        return
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        record = dict(model=args.model, tier=args.tier, device=args.device, not_measured=True)
    else:
        record = measure(args)
    with open(args.output, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
