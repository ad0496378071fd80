"""`MoECollector`: how training-mode MoE layers hand their losses and statistics to the caller of a forward."""

import threading

import pytest
import torch

from diffmoe_hf import DiTMoETransformer2DModel
from diffmoe_hf.families import get_family
from diffmoe_hf.models.moe import MoECollector, SoftmaxTopKRouter, active_moe_collector


TINY = get_family("dit-moe").tiny_config(
    "ddpm",
    sample_size=4,
    num_attention_heads=2,
    attention_head_dim=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=16,
)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 4, 4, generator=generator), torch.rand(2, generator=generator), torch.tensor([1, 2])


def test_a_layer_outside_any_call_reports_nothing_and_computes_the_same():
    router = SoftmaxTopKRouter(dim=8, num_experts=4, num_experts_per_tok=2).train()
    tokens = torch.randn(6, 8)
    assert active_moe_collector() is None
    outside = router(tokens)
    with MoECollector() as collector:
        inside = router(tokens)
    assert active_moe_collector() is None
    for a, b in zip(outside, inside):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(collector.aux_losses) == 1 and list(collector.statistics) == [router]
    assert not hasattr(router, "aux_loss")


def test_a_model_call_keeps_its_reports_to_itself():
    model = DiTMoETransformer2DModel(**TINY).train()
    with MoECollector() as outer:
        output = model(*_inputs())
    assert outer.aux_losses == [] and outer.statistics == {}  # the model's own collector took them
    assert output.aux_loss is not None and len(output.moe_statistics) == TINY["num_layers"]


def test_collectors_are_per_thread():
    seen = []
    with MoECollector():
        thread = threading.Thread(target=lambda: seen.append(active_moe_collector()))
        thread.start()
        thread.join()
    assert seen == [None]  # e.g. the autograd engine's device threads, which run recomputations on accelerators


def test_collectors_close_in_order_and_a_layer_reports_once():
    first, second = MoECollector(), MoECollector()
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    assert active_moe_collector() is None

    router = SoftmaxTopKRouter(dim=8, num_experts=4, num_experts_per_tok=2).train()
    with MoECollector(), pytest.raises(RuntimeError, match="once per model call"):
        router(torch.randn(6, 8))
        router(torch.randn(6, 8))
