"""The shared MoE dispatch: grouped path, per-module fallback and a naive reference agree."""

import torch
from peft import LoraConfig, inject_adapter_in_model

from diffmoe_hf.models.moe import DeepSeekMoE, SigmoidGroupLimitedRouter, SwiGLUExperts, segments_from_topk

from .helpers import assert_float32_close, float32_tolerance


WIDTH = 16  # token width of every layer here, the longest dot product on the way (expert widths are smaller)


def _close(actual, expected, msg=""):
    """Equal up to float32 summation order through an expert: two projections and the weighted sum over k."""
    assert_float32_close(actual, expected, float32_tolerance(expected, WIDTH, depth=3), msg)


def _naive(hidden, ids, weights, experts):
    out = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            out[token] += weights[token, slot] * experts[ids[token, slot]](hidden[token : token + 1])[0]
    return out


def _routing(num_tokens=37, num_experts=6, k=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 16, generator=generator)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)])
    ids[:, 0] = ids[:, 0].clamp(max=num_experts - 2)  # expert num_experts-1 may get few tokens
    ids[ids == 3] = 2 if k == 1 else ids[ids == 3]  # and with k == 1 expert 3 gets none
    return hidden, ids, torch.rand(num_tokens, k, generator=generator)


def test_grouped_dispatch_matches_naive_loop():
    torch.manual_seed(0)
    for bias, k in ((False, 2), (True, 1), (False, 3)):
        experts = SwiGLUExperts(num_experts=6, dim=16, intermediate_size=12, bias=bias)
        hidden, ids, weights = _routing(k=k)
        ids = ids.unique(dim=1) if k > 1 else ids
        with torch.no_grad():
            got = experts.forward_routed(hidden, segments_from_topk(ids, weights, 6))
            _close(got, _naive(hidden, ids, weights, experts))


def test_in_place_inference_matches_autograd_path_and_frozen_experts_still_pass_gradients():
    """Without autograd the activation and the routing weights are applied in place; with it (here: frozen experts,
    trainable routing weights and inputs) the result is the same and the gradients are those of the naive loop."""
    torch.manual_seed(0)
    for bias in (False, True):
        experts = SwiGLUExperts(num_experts=6, dim=16, intermediate_size=12, bias=bias).requires_grad_(False)
        hidden, ids, weights = _routing()
        with torch.no_grad():
            inference = experts.forward_routed(hidden, segments_from_topk(ids, weights, 6))
        leaves = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
        reference = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
        trained = experts.forward_routed(leaves[0], segments_from_topk(ids, leaves[1], 6))
        _close(trained, inference)
        trained.square().sum().backward()
        _naive(reference[0], ids, reference[1], experts).square().sum().backward()
        for got, expected in zip(leaves, reference):
            _close(got.grad, expected.grad)


def test_lora_wrapped_experts_take_the_module_path_and_agree():
    torch.manual_seed(0)
    experts = SwiGLUExperts(num_experts=6, dim=16, intermediate_size=12)
    hidden, ids, weights = _routing()
    segments = segments_from_topk(ids, weights, 6)
    with torch.no_grad():
        before = experts.forward_routed(hidden, segments)
    wrapped = inject_adapter_in_model(LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]), experts)
    assert wrapped.backend(hidden) == "modules"
    with torch.no_grad():  # lora_B starts at zero: same function, other code path
        _close(wrapped.forward_routed(hidden, segments), before)


def test_in_place_weight_updates_are_seen():
    torch.manual_seed(0)
    experts = SwiGLUExperts(num_experts=4, dim=16, intermediate_size=8)
    hidden, ids, weights = _routing(num_experts=4)
    segments = segments_from_topk(ids, weights, 4)
    with torch.no_grad():
        first = experts.forward_routed(hidden, segments)
        experts[ids[0, 0]].down_proj.weight.mul_(2.0)
        second = experts.forward_routed(hidden, segments)
    assert not torch.allclose(first, second)
    with torch.no_grad():
        _close(second, _naive(hidden, ids, weights, experts))


def test_group_limited_router_masks_dropped_groups_with_zero():
    router = SigmoidGroupLimitedRouter(dim=4, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.copy_(torch.tensor([0.3, 0.2, -0.6, -0.7]))
    ids, weights = router(torch.randn(3, 4))
    # group 0 (experts 0, 1) wins; dropped experts score 0.0 which ties below the kept ones
    assert ids.sort(-1).values.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5))  # unbiased sigmoid(0) = 0.5 each, normalised


def test_top1_weights_are_not_renormalised():
    router = SigmoidGroupLimitedRouter(dim=4, num_experts=4, num_experts_per_tok=1, routed_scaling_factor=1.5)
    hidden = torch.randn(5, 4)
    ids, weights = router(hidden)
    expected = torch.sigmoid(hidden @ router.weight.T).gather(-1, ids) * 1.5
    assert_float32_close(weights, expected, float32_tolerance(expected, hidden.shape[-1], depth=2))


def test_moe_without_shared_expert_adds_its_input():
    torch.manual_seed(0)
    layer = DeepSeekMoE(
        dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8, shared_expert_intermediate_size=0
    )
    for expert in layer.experts:
        torch.nn.init.zeros_(expert.down_proj.weight)
    hidden = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), hidden, atol=0, rtol=0)  # zero expert outputs add nothing


def test_dispatch_compiles_without_graph_breaks():
    torch.manual_seed(0)
    layer = DeepSeekMoE(dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8).eval()
    hidden = torch.randn(2, 6, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        _close(compiled(hidden), layer(hidden))


def test_segment_mm_gradients_match_per_segment_matmuls():
    from diffmoe_hf.models.moe.ops.grouped_gemm import segment_mm

    torch.manual_seed(0)
    rows = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(3, 12, 8, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # the middle expert gets no rows
    out = segment_mm(rows, weight, offsets)
    upstream = torch.randn_like(out)
    grad_rows, grad_weight = torch.autograd.grad((out * upstream).sum(), (rows, weight))
    ref = torch.cat([rows[:4] @ weight[0].T, rows[4:4] @ weight[1].T, rows[4:] @ weight[2].T])
    ref_rows, ref_weight = torch.autograd.grad((ref * upstream).sum(), (rows, weight))
    longest = max(rows.shape)  # inner dimensions: 8 features forward, 12 outputs and 10 rows backward
    for got, want in ((out, ref), (grad_rows, ref_rows), (grad_weight, ref_weight)):
        assert_float32_close(got, want, float32_tolerance(want, max(longest, weight.shape[1])))


def test_unaligned_expert_width_falls_back_to_the_segment_loop():
    torch.manual_seed(0)
    experts = SwiGLUExperts(
        num_experts=4, dim=16, intermediate_size=6
    )  # 6 fp32 features are not 16-byte aligned: no grouped GEMM kernel
    hidden, ids, weights = _routing(num_experts=4)
    with torch.no_grad():
        got = experts.forward_routed(hidden, segments_from_topk(ids, weights, 4))
        _close(got, _naive(hidden, ids, weights, experts))
