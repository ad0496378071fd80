"""
Benchmark suite: MoE layer, full forward, training step and pipeline sampling of every family, against dense models
of equal activated FLOPs, timed side by side with interleaved repetitions (see `timing.interleaved`).

    python -m benchmarks.run --output results.json                    # CPU, fp32, S presets, batch 8
    python -m benchmarks.run --quick --output quick.json              # tiny configs, seconds
    python -m benchmarks.run --device cuda --dtype bfloat16 --size B --batch-size 32 --output gpu.json

Writes a JSON file and prints a table of median and min times and their ratios to the dense baseline.
"""

import argparse
import json
import os
import platform
import resource
import time

import torch

from diffmoe_hf.families import FAMILY_ALIASES
from diffmoe_hf.formulations import get_formulation

from . import models
from .timing import interleaved, ratios


SECTIONS = ("layer", "forward", "train", "pipeline")


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _to(module, device, dtype):
    """Moves a model; casts only for low precision (routers still compute in float32)."""
    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def bench_layer(family, args, device, dtype) -> dict:
    model = _to(family.build(args.size), device, dtype)
    layer = models.first_moe_layer(model)
    dense, width = models.dense_equivalent_layer(layer)
    dense = dense.to(device, dtype).eval()
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    num_tokens = (model.config.sample_size // model.config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.batch_size, num_tokens, dim, generator=generator).to(device, dtype)
    conditioning = torch.randn(args.batch_size, dim, generator=generator).to(device, dtype)
    run_moe = models.layer_call(layer, tokens, conditioning)
    models.calibrate_capacity(layer, run_moe)
    with torch.no_grad():
        result = interleaved({"moe": run_moe, "dense": lambda: dense(tokens)}, args.repeats, device=device)
    result.update(ratios(result, "moe", "dense"))
    result.update(moe_flops=models.count_flops(run_moe), dense_flops=models.count_flops(lambda: dense(tokens)))
    result.update(activated_width=width, tokens=args.batch_size * num_tokens, dim=dim)
    return result


def _full_models(family, args, device, dtype):
    model = family.build(args.size)
    inputs = models.model_inputs(model, args.batch_size, "cpu", torch.float32)
    models.calibrate_capacity(model, inputs)
    moe_flops = models.count_flops(lambda: model(**inputs))
    dense, width, dense_inputs = models.dense_dit_of_equal_flops(model, moe_flops, inputs)
    dense_flops = models.count_flops(lambda: dense(**dense_inputs))
    cast = {"hidden_states": lambda x: x.to(device, dtype)}
    to_device = lambda d: {k: cast.get(k, lambda x: x.to(device))(v) for k, v in d.items()}  # noqa: E731
    model, dense = _to(model, device, dtype), _to(dense, device, dtype)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
        dense.compile_repeated_blocks(fullgraph=True)
    info = dict(moe_flops=moe_flops, dense_flops=dense_flops, dense_ff_width=width)
    return model, to_device(inputs), dense, to_device(dense_inputs), info


def bench_forward(family, args, device, dtype) -> dict:
    model, inputs, dense, dense_inputs, info = _full_models(family, args, device, dtype)
    rows = inputs["hidden_states"].shape[0] * (model.config.sample_size // model.config.patch_size) ** 2
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    # the practical ceiling: one plain matmul with the model's FLOPs, (rows, D) @ (D, W)
    width = max(16, round(info["moe_flops"] / (2 * rows * dim) / 16) * 16)
    a = torch.randn(rows, dim, device=device, dtype=dtype)
    b = torch.randn(dim, width, device=device, dtype=dtype)
    with torch.no_grad():
        result = interleaved(
            {"moe": lambda: model(**inputs), "dense": lambda: dense(**dense_inputs), "matmul": lambda: a @ b},
            args.repeats,
            device=device,
        )
    result.update(ratios(result, "moe", "dense"))
    matmul_flops = 2 * rows * dim * width
    gflops = {
        "moe": info["moe_flops"] / result["moe"]["median_ms"] / 1e6,
        "dense": info["dense_flops"] / result["dense"]["median_ms"] / 1e6,
        "matmul": matmul_flops / result["matmul"]["median_ms"] / 1e6,
    }
    result.update(info, gflops_per_s_median=gflops, moe_fraction_of_matmul=gflops["moe"] / gflops["matmul"])
    return result


def _train_step(model, inputs, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        output = model(**inputs)
        loss = output.sample.float().square().mean()
        aux_loss = getattr(output, "aux_loss", None)  # the dense DiT's output has none
        if aux_loss is not None:
            loss = loss + aux_loss
        loss.backward()
        optimizer.step()

    return step


def bench_train(family, args, device, dtype) -> dict:
    model, inputs, dense, dense_inputs, info = _full_models(family, args, device, dtype)
    model.train(), dense.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing(), dense.enable_gradient_checkpointing()
    steps = {
        "moe": _train_step(model, inputs, torch.optim.AdamW(model.parameters(), lr=1e-5)),
        "dense": _train_step(dense, dense_inputs, torch.optim.AdamW(dense.parameters(), lr=1e-5)),
    }
    result = interleaved(steps, args.train_repeats or args.repeats, device=device)
    result.update(ratios(result, "moe", "dense"))
    result.update(info)
    return result


def bench_pipeline(family, args, device, dtype) -> dict:
    from diffmoe_hf import ClassConditionalMoEPipeline

    model = family.build(args.size)
    models.calibrate_capacity(model, models.model_inputs(model, args.batch_size, "cpu", torch.float32))
    scheduler = get_formulation(model.config.formulation).default_scheduler()
    pipe = ClassConditionalMoEPipeline(transformer=_to(model, device, dtype), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % model.config.num_classes for i in range(args.batch_size)]

    def sample():
        pipe(class_labels=labels, num_inference_steps=args.steps, generator=torch.manual_seed(0), output_type="latent")

    sample()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.pipeline_repeats):
        sample()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.pipeline_repeats
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS so far"
    return {
        "images_per_s": args.batch_size / seconds,
        "seconds_per_call": seconds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
    }


BENCHES = {"layer": bench_layer, "forward": bench_forward, "train": bench_train, "pipeline": bench_pipeline}


def print_table(results: dict) -> None:
    header = ("section", "family", "moe med/min ms", "dense med/min ms", "ratio med", "ratio min")
    print("\n{:9s} {:12s} {:>20s} {:>20s} {:>9s} {:>9s}".format(*header))
    for section, per_family in results.items():
        for name, r in per_family.items():
            if "error" in r:
                print(f"{section:9s} {name:12s} ERROR {r['error']}")
            elif section == "pipeline":
                print(
                    f"{section:9s} {name:12s} {r['images_per_s']:10.2f} images/s, peak {r['peak_memory_mib']:.0f} MiB"
                    f" ({r['peak_memory_kind']})"
                )
            else:
                moe, dense = r["moe"], r["dense"]
                extra = (
                    f"  {100 * r['moe_fraction_of_matmul']:.0f}% of matmul" if "moe_fraction_of_matmul" in r else ""
                )
                print(
                    f"{section:9s} {name:12s} {moe['median_ms']:9.1f}/{moe['min_ms']:9.1f} "
                    f"{dense['median_ms']:9.1f}/{dense['min_ms']:9.1f} {r['median_ratio']:9.2f} "
                    f"{r['min_ratio']:9.2f}{extra}"
                )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs, batch 2, 3 repeats (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--size", default="S", choices=("S", "B", "tiny"), help="preset size (--quick: tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 7, quick 3)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed training steps (default: --repeats)")
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(models.BENCHMARKED),
        choices=[*models.BENCHMARKED, *FAMILY_ALIASES],
        help="benchmarked families; the earlier family ids diff-moe and diffmoe-dts are accepted too",
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--steps", type=int, default=4, help="pipeline sampling steps")
    parser.add_argument("--pipeline-repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile_repeated_blocks(fullgraph=True) first")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in the training step")
    parser.add_argument("--output", default="benchmark_results.json")
    args = parser.parse_args(argv)
    args.families = list(dict.fromkeys(FAMILY_ALIASES.get(name, name) for name in args.families))
    if args.quick:
        args.size, args.batch_size, args.steps, args.pipeline_repeats = "tiny", 2, 2, 1
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    return args


def _write(report: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(report, file, indent=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report = {
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "load_average_start": _load(),
        "results": {},
    }
    for section in args.sections:
        report["results"][section] = {}
        for name in args.families:
            family = models.BENCHMARKED[name]
            if args.size not in family.presets and args.size != "tiny":
                continue
            started = time.perf_counter()
            try:
                result = BENCHES[section](family, args, device, dtype)
            except Exception as error:  # a family that cannot run here is reported, the others still run
                result = {"error": f"{type(error).__name__}: {error}"}
            result["wall_s"] = round(time.perf_counter() - started, 1)
            result["load_average"] = _load()
            report["results"][section][name] = result
            print(f"[{section}] {name} done in {result['wall_s']} s (load {result['load_average']})", flush=True)
            _write(report, args.output)  # partial results survive an interrupted run
    report["load_average_end"] = _load()
    _write(report, args.output)
    print_table(report["results"])
    print(
        f"\nwrote {args.output}; load average start {report['load_average_start']}, end {report['load_average_end']}"
    )
    return report


if __name__ == "__main__":
    main()
