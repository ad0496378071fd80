"""Renders one or more `benchmarks.run` JSON files as Markdown tables (for BENCHMARKS.md).

python -m benchmarks.report results.json [more.json ...]
"""

import json
import sys

from diffmoe_hf.families import FAMILY_ALIASES


def _family(name: str) -> str:
    """The current id of a family recorded under an earlier one (`diff-moe`, `diffmoe-dts`)."""
    return FAMILY_ALIASES.get(name, name)


def _ratio_rows(section: str, per_family: dict) -> list[str]:
    rows = []
    for name, r in per_family.items():
        name = _family(name)
        if "error" in r:
            rows.append(f"| {name} | error: {r['error']} |")
            continue
        moe, dense = r["moe"], r["dense"]
        flops = f"{r['moe_flops'] / r['dense_flops']:.2f}" if r.get("dense_flops") else "-"
        cells = [
            name,
            f"{moe['median_ms']:.1f} / {moe['min_ms']:.1f}",
            f"{dense['median_ms']:.1f} / {dense['min_ms']:.1f}",
            f"**{r['median_ratio']:.2f}** / {r['min_ratio']:.2f}",
            flops,
        ]
        if section == "forward":
            gflops = r["gflops_per_s_median"]
            cells.append(f"{gflops['moe']:.1f} / {gflops['dense']:.1f} / {gflops['matmul']:.1f}")
            cells.append(f"{100 * r['moe_fraction_of_matmul']:.0f}%")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine.get('gpu', 'no GPU')}, torch "
        f"{machine['torch']}, {machine['torch_threads']} threads, env {machine.get('env', {})}; device "
        f"{settings['device']}, {settings['dtype']}, size {settings['size']}, batch {settings['batch_size']}, "
        f"{settings['repeats']} interleaved repeats; load average {report['load_average_start']} -> "
        f"{report.get('load_average_end')}.",
        "",
    ]
    for section, per_family in report["results"].items():
        lines.append(f"**{section}**")
        lines.append("")
        if section == "pipeline":
            lines.append("| family | images/s | peak memory (MiB) |")
            lines.append("|---|---|---|")
            for name, r in per_family.items():
                name = _family(name)
                if "error" in r:
                    lines.append(f"| {name} | error: {r['error']} | |")
                else:
                    memory = f"{r['peak_memory_mib']:.0f} ({r['peak_memory_kind']})"
                    lines.append(f"| {name} | {r['images_per_s']:.2f} | {memory} |")
        else:
            header = "| family | MoE ms (median / min) | dense ms (median / min) | ratio (median / min) | FLOP ratio |"
            rule = "|---|---|---|---|---|"
            if section == "forward":
                header += " GFLOP/s MoE / dense / matmul | MoE vs matmul |"
                rule += "---|---|"
            lines += [header, rule, *_ratio_rows(section, per_family)]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as file:
            print(render(json.load(file)))
