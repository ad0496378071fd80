"""The benchmark suite runs end to end on tiny configs (a smoke test: nothing here is timed or compared)."""

import json

from benchmarks import run

from .helpers import assert_float32_close, model_float32_tolerance


def test_quick_benchmark_run_writes_every_section(tmp_path):
    output = tmp_path / "results.json"
    # the three expert banks (SwiGLU, GELU MLP, modulated SwiGLU); an earlier family id is accepted as an alias
    families = ["dit-moe", "diffmoe-dts", "spatial-temporal-moe"]
    report = run.main(["--quick", "--repeats", "1", "--families", *families, "--output", str(output)])
    assert json.loads(output.read_text())["settings"]["size"] == "tiny"
    assert list(report["results"]["layer"]) == ["dit-moe", "dynamic-token-moe", "spatial-temporal-moe"]
    for section in run.SECTIONS:
        for family, result in report["results"][section].items():
            assert "error" not in result, (section, family, result.get("error"))
    forward = report["results"]["forward"]["dit-moe"]
    assert {"median_ratio", "min_ratio", "moe_flops", "dense_flops", "gflops_per_s_median"} <= forward.keys()
    assert abs(forward["dense_flops"] / forward["moe_flops"] - 1) < 0.25  # the dense DiT is sized to the MoE FLOPs
    assert report["results"]["pipeline"]["spatial-temporal-moe"]["images_per_s"] > 0
    for family, layer in report["results"]["layer"].items():  # every expert GEMM is counted
        assert 0.95 < layer["moe_flops"] / layer["dense_flops"] < 1.6, family


def test_regional_compile_of_the_repeated_blocks():
    import torch

    from benchmarks import models

    for name in (
        "dynamic-token-moe",
        "spatial-temporal-moe",
    ):  # data-dependent expert counts; the family's own block class
        model = models.BENCHMARKED[name].build("tiny")
        inputs = models.model_inputs(model, 2, "cpu", torch.float32)
        models.calibrate_capacity(model, inputs)
        with torch.no_grad():
            want = model(**inputs).sample
            model.compile_repeated_blocks(fullgraph=True, backend="eager")
            assert_float32_close(model(**inputs).sample, want, model_float32_tolerance(model, want))
        torch._dynamo.reset()
