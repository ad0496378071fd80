"""The benchmark suite runs end to end on tiny configs (a smoke test: nothing here is timed or compared)."""

import json

from benchmarks import run


def test_quick_benchmark_run_writes_every_section(tmp_path):
    output = tmp_path / "results.json"
    report = run.main(["--quick", "--repeats", "1", "--output", str(output)])
    assert json.loads(output.read_text())["settings"]["size"] == "tiny"
    for section in run.SECTIONS:
        for family, result in report["results"][section].items():
            assert "error" not in result, (section, family, result.get("error"))
    forward = report["results"]["forward"]["dsmoe"]
    assert {"median_ratio", "min_ratio", "moe_flops", "dense_flops", "gflops_per_s_median"} <= forward.keys()
    assert abs(forward["dense_flops"] / forward["moe_flops"] - 1) < 0.25  # the dense DiT is sized to the MoE FLOPs
    assert report["results"]["pipeline"]["diff-moe"]["images_per_s"] > 0
