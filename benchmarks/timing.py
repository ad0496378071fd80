"""Side-by-side timing: the candidates of one comparison run in the same process, interleaved, so a machine whose
load changes during the run slows all of them alike."""

import statistics
import time
from collections.abc import Callable

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, dict]:
    """
    Times each candidate `repeats` times, round-robin (a, b, a, b, ...) after `warmup` untimed rounds.

    Returns:
        `{name: {"median_ms", "min_ms", "times_ms"}}`.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for run in candidates.values():
            run()
    _synchronize(device)
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "times_ms": [round(t, 3) for t in ts]}
        for name, ts in times.items()
    }


def ratios(result: dict[str, dict], candidate: str, baseline: str) -> dict[str, float]:
    """Median / median and min / min of `candidate` over `baseline`."""
    return {
        "median_ratio": result[candidate]["median_ms"] / result[baseline]["median_ms"],
        "min_ratio": result[candidate]["min_ms"] / result[baseline]["min_ms"],
    }
