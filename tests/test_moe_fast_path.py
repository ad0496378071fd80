"""The fast expert paths users run (CPU `segment_linear`, CUDA-style stacked grouped GEMM) agree with the per-expert
modules, in values and gradients, for every family's MoE layer, and compile without graph breaks."""

import pytest
import torch

from diffmoe_hf.models.dynamic_token_moe_layer import DynamicTokenMoE
from diffmoe_hf.models.moe import DeepSeekMoE, segment_linear, set_expert_backend
from diffmoe_hf.models.spatial_temporal_moe_layer import SpatialTemporalMoE
from diffmoe_hf.models.transformer_dit_moe import SoftmaxTopKMoE

from .helpers import assert_float32_close, float32_tolerance


LONGEST_DOT = 32  # the widest expert hidden layer of `_layers` (token width 16, 12 tokens)


def _close(actual, expected, backward=False, msg=""):
    """Equal up to float32 summation order through a MoE layer (projections, recalibration, weighted sum), and back."""
    depth = 8 if backward else 4
    assert_float32_close(actual, expected, float32_tolerance(expected, LONGEST_DOT, depth), msg)


def _layers():
    torch.manual_seed(0)
    return {
        "deepseek": DeepSeekMoE(
            dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8, n_group=2, topk_group=2
        ),
        "deepseek-bias": DeepSeekMoE(dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8, bias=True),
        "softmax-topk": SoftmaxTopKMoE(
            dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8, shared_expert_intermediate_size=8
        ),
        "dynamic-token": DynamicTokenMoE(dim=16, num_experts=4, intermediate_size=32),
        "spatial-temporal": SpatialTemporalMoE(
            dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=8,
            shared_expert_intermediate_size=8,
            modulation_rank=4,
        ),
    }


def _call(layer, hidden, conditioning):
    return layer(hidden, conditioning) if isinstance(layer, SpatialTemporalMoE) else layer(hidden)


def _run(layer, path, grad=False):
    """Output (and parameter gradients) of `layer` on fixed inputs through expert backend `path`: "auto" (what runs
    on CPU), "grouped_mm" (the grouped GEMM over stacked weights) or "modules" (per-expert modules, the LoRA path)."""
    set_expert_backend(layer, path)
    try:
        generator = torch.Generator().manual_seed(1)
        hidden = torch.randn(2, 6, 16, generator=generator)
        conditioning = torch.randn(2, 16, generator=generator)
        layer.zero_grad()
        with torch.set_grad_enabled(grad):
            out = _call(layer, hidden, conditioning)
        if not grad:
            return out, {}
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    finally:
        set_expert_backend(layer, "auto")


@pytest.mark.parametrize("name", ["deepseek", "deepseek-bias", "softmax-topk", "dynamic-token", "spatial-temporal"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_path_matches_stacked_and_module_paths(name, mode):
    layer = _layers()[name].train(mode == "train")
    if isinstance(layer, DynamicTokenMoE):
        layer.capacity_predictor.expert_threshold.fill_(0.5)  # eval: variable counts per expert
    grad = mode == "train"
    assert layer.experts.backend(torch.zeros(1, 16)) == "segment_linear"
    fast, fast_grads = _run(layer, "auto", grad)
    for path in ("grouped_mm", "modules"):
        out, grads = _run(layer, path, grad)
        _close(out, fast)
        assert grads.keys() == fast_grads.keys()
        for key in grads:
            _close(grads[key], fast_grads[key], backward=True, msg=f"{path}: {key}")


def test_segment_linear_values_and_gradients_match_per_segment_linears():
    torch.manual_seed(0)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # the middle expert gets no rows
    rows = torch.randn(10, 8, requires_grad=True)
    weights = [torch.randn(6 if i % 2 == 0 else 5, 8, requires_grad=True) for i in range(6)]  # (gate, up) x 3
    biases = [torch.randn(w.shape[0], requires_grad=True) for w in weights]
    for bias in (biases, []):
        out = segment_linear(rows, weights, bias, offsets)
        bounds = [(0, 4), (4, 4), (4, 10)]
        ref = torch.cat(
            [
                torch.cat(
                    [
                        torch.nn.functional.linear(rows[s:e], weights[2 * i + p], *bias[2 * i + p : 2 * i + p + 1])
                        for p in range(2)
                    ],
                    dim=1,
                )
                for i, (s, e) in enumerate(bounds)
            ]
        )
        upstream = torch.randn_like(out)
        inputs = [rows, *weights, *bias]
        got = torch.autograd.grad((out * upstream).sum(), inputs, allow_unused=True)
        want = torch.autograd.grad((ref * upstream).sum(), inputs, allow_unused=True)
        # inner dimensions: 8 features forward, up to 6 outputs and 10 rows backward
        assert_float32_close(out, ref, float32_tolerance(ref, rows.shape[0]))
        for g, w in zip(got, want):
            want_grad = torch.zeros_like(g) if w is None else w
            assert_float32_close(g, want_grad, float32_tolerance(want_grad, rows.shape[0]))


@pytest.mark.parametrize("name", ["softmax-topk", "dynamic-token", "spatial-temporal"])
def test_each_family_layer_compiles_fullgraph_forward_and_backward(name):
    layer = _layers()[name].train()  # training: fixed expert-choice counts for DiffMoE, aux losses for the routers
    hidden, conditioning = torch.randn(2, 6, 16), torch.randn(2, 16)
    compiled = torch.compile(lambda h, c: _call(layer, h, c), fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    want = _call(layer, hidden, conditioning)
    want_grad = torch.autograd.grad(want.square().sum(), list(layer.experts.parameters()), allow_unused=True)
    got = compiled(hidden, conditioning)
    got_grad = torch.autograd.grad(got.square().sum(), list(layer.experts.parameters()), allow_unused=True)
    _close(got, want)
    for g, w in zip(got_grad, want_grad):
        assert (g is None) == (w is None)
        if g is not None:
            _close(g, w, backward=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cpu_default_backend_runs_segment_linear_on_the_experts_own_weights(mode, monkeypatch):
    from diffmoe_hf.models.moe.layers import expert_backends

    layer = _layers()["deepseek"].train(mode == "train")
    calls = []

    def counting_segment_linear(rows, weights, biases, offsets):
        calls.append([w.data_ptr() for w in weights])
        return segment_linear(rows, weights, biases, offsets)

    monkeypatch.setattr(expert_backends, "segment_linear", counting_segment_linear)
    monkeypatch.setattr(expert_backends, "stacked_expert_parameters", lambda *args: pytest.fail("stacked a copy"))
    with torch.set_grad_enabled(mode == "train"):
        layer(torch.randn(2, 6, 16))
    own = {p.data_ptr() for p in layer.experts.parameters()}
    assert len(calls) == 2 and all(set(ptrs) <= own for ptrs in calls)  # [gate | up], then down
