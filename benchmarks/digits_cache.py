"""diffusers' caches on the shipped digits models: sampling speed-up and the digits quality metrics, with and without
each cache (FirstBlockCache, TaylorSeer, MagCache), all in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.digits_cache [--num-samples 1000] [--steps 25] [--output FILE.json]

Quality: `diffmoe_hf.evaluation.digits.evaluate_pipeline` (what `diffmoe evaluate-digits` runs) at the folder's default
guidance and scheduler, checked against the model cards' targets. Speed: the uncached and each cached pipeline sample
the same batch in alternation, `--rounds` times; the speed-up is the median of the per-round time ratios, so a load
change on a shared machine affects both sides of a ratio alike.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from diffmoe_hf import ClassConditionalMoEPipeline, default_models
from diffmoe_hf.evaluation.digits import DigitsReference, evaluate_pipeline
from diffmoe_hf.training.digits_recipe import TARGETS, meets


def residual_magnitude_ratios(pipe, call_kwargs) -> dict[str, list[float]]:
    """
    MagCache's calibration, per cache context: for every transformer call, the mean over tokens of
    `|r_i| / |r_(i-1)|`, with r the residual of the transformer blocks (last block output minus first block input).
    """
    blocks = pipe.transformer.transformer_blocks
    ratios, previous, current = {}, {}, {}
    inputs = {}

    def remember_input(module, args):
        inputs["head"] = args[0]

    def measure(module, args, output):
        residual = (output - inputs["head"]).float()
        name = current["context"]
        if name in previous:
            norms = torch.linalg.norm(residual, dim=-1) / (torch.linalg.norm(previous[name], dim=-1) + 1e-8)
            ratios[name].append(norms.mean().item())
        else:
            ratios[name] = [1.0]
        previous[name] = residual

    original_context = pipe.transformer.cache_context

    def recording_context(name):
        current["context"] = name
        return original_context(name)

    handles = [blocks[0].register_forward_pre_hook(remember_input), blocks[-1].register_forward_hook(measure)]
    pipe.transformer.cache_context = recording_context
    try:
        pipe(**call_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        del pipe.transformer.cache_context
    return ratios


def cache_configs(pipe, call_kwargs) -> dict:
    """The benchmarked settings; MagCache's ratios are calibrated on this model and sampler (its main context)."""
    ratios = residual_magnitude_ratios(pipe, {**call_kwargs, "class_labels": list(range(10)), "output_type": "pt"})
    main_context = max(ratios, key=lambda name: len(ratios[name]))
    calls = len(ratios[main_context])
    return {
        "FirstBlockCache(threshold=0.05)": FirstBlockCacheConfig(threshold=0.05),
        "FirstBlockCache(threshold=0.1)": FirstBlockCacheConfig(threshold=0.1),
        "TaylorSeer(interval=2, warmup=3, order=1)": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32
        ),
        "MagCache(threshold=0.06, K=2, calibrated)": MagCacheConfig(
            threshold=0.06,
            max_skip_steps=2,
            retention_ratio=0.2,
            num_inference_steps=calls,
            mag_ratios=ratios[main_context],
        ),
    }


def time_against_uncached(pipe, config, call_kwargs, rounds: int) -> float:
    """Median over `rounds` of (uncached seconds / cached seconds) for the same call, run in alternation."""
    ratios = []
    for _ in range(rounds):
        seconds = []
        for cached in (False, True):
            if cached:
                pipe.transformer.enable_cache(config)
            start = time.perf_counter()
            pipe(generator=torch.manual_seed(0), **call_kwargs)
            seconds.append(time.perf_counter() - start)
            if cached:
                pipe.transformer.disable_cache()
        ratios.append(seconds[0] / seconds[1])
    return statistics.median(ratios)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (the model cards' setting)")
    parser.add_argument("--timing-batch", type=int, default=100, help="images per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per cache")
    parser.add_argument("--output", help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    reference = DigitsReference(0)
    results = {
        "num_samples": args.num_samples,
        "steps": args.steps,
        "timing_batch": args.timing_batch,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "models": {},
    }
    for name, folder in default_models().items():
        pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        call_kwargs = {"num_inference_steps": args.steps}
        timing_kwargs = {
            **call_kwargs,
            "output_type": "pt",
            "class_labels": [i % 10 for i in range(args.timing_batch)],
        }
        rows = {}
        for label, config in {"none": None, **cache_configs(pipe, call_kwargs)}.items():
            if config is not None:
                pipe.transformer.enable_cache(config)
            metrics = evaluate_pipeline(pipe, args.num_samples, reference=reference, **call_kwargs).as_dict()
            metrics["frechet_over_floor"] = metrics["frechet_distance"] / metrics["frechet_floor"]
            if config is not None:
                pipe.transformer.disable_cache()
            row = {
                k: metrics[k]
                for k in (
                    "accuracy",
                    "worst_class_accuracy",
                    "frechet_over_floor",
                    "c2st_accuracy",
                    "memorisation_rate",
                )
            }
            row["meets_targets"] = all(meets(k, row[k]) for k in TARGETS)
            if config is not None:
                row["speedup"] = time_against_uncached(pipe, config, timing_kwargs, args.rounds)
            rows[label] = row
            print(name, label, json.dumps(row), flush=True)
        results["models"][name] = rows
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
