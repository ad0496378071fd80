"""`diffmoe_hf.routing.record_routing` on every family's MoE layers."""

import pytest
import torch

from diffmoe_hf.families import get_family
from diffmoe_hf.routing import record_routing

from .helpers import registered_families, tiny_dsmoe


def _inputs(model, batch=2):
    config = model.config
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size)
    t = torch.rand(batch) if config.formulation != "ddpm-learned-sigma" else torch.randint(0, 1000, (batch,))
    return x, t, torch.randint(0, config.num_classes, (batch,))


def test_token_choice_routing_matches_the_router_outputs():
    model = tiny_dsmoe()
    x, t, y = _inputs(model)
    seen = {}
    handle = model.transformer_blocks[1].ff.router.register_forward_hook(lambda m, i, o: seen.update(ids=o[0]))
    with record_routing(model) as routing:
        model(x, t, y)
    handle.remove()
    assert list(routing) == ["transformer_blocks.1.ff"]  # block 0 is dense
    layer = routing["transformer_blocks.1.ff"]
    tokens = 2 * (8 // 2) ** 2
    assert layer.calls == 1 and layer.expert_ids[0].shape == (tokens, 2)
    assert torch.equal(layer.expert_ids[0], seen["ids"])
    assert torch.equal(layer.counts, torch.bincount(seen["ids"].reshape(-1), minlength=4))
    assert abs(float(layer.load().sum()) - 1.0) < 1e-6
    assert 1.0 <= layer.imbalance() <= 4.0
    model(x, t, y)  # hooks are gone after the context
    assert layer.calls == 1


def test_counts_accumulate_and_summary_flags_collapse():
    model = tiny_dsmoe()
    x, t, y = _inputs(model)
    router = model.transformer_blocks[1].ff.router
    with torch.no_grad():  # every token prefers expert 3 (and 2 as second choice)
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 20.0]))
    with record_routing(model, keep_expert_ids=False) as routing:
        model(x, t, y)
        model(x, t, y)
    layer = routing["transformer_blocks.1.ff"]
    assert layer.calls == 2 and layer.expert_ids == []
    assert layer.counts.tolist() == [0, 0, 64, 64]
    assert layer.unused_experts() == 2 and layer.imbalance() == 2.0
    stats = routing.summary()
    assert stats["routing/transformer_blocks.1.ff/unused_experts"] == 2.0
    assert stats["routing/max_imbalance"] == 2.0
    assert routing.expert_shares()["transformer_blocks.1.ff"] == [0.0, 0.0, 0.5, 0.5]
    shares = routing.summary(per_expert=True)
    assert [shares[f"routing/transformer_blocks.1.ff/expert_{e}"] for e in range(4)] == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("family", registered_families())
def test_every_family_is_recorded(family):
    model = get_family(family).tiny_model()
    x, t, y = _inputs(model)
    for training in (True, False):
        model.train(training)
        with record_routing(model) as routing:
            model(x, t, y)
        assert routing, type(model).__name__
        for layer in routing.values():
            assert layer.calls == 1 and int(layer.counts.sum()) > 0


def test_expert_choice_layers_balance_the_experts_in_training():
    """DiffMoE (expert choice): every expert takes the same number of tokens in training."""
    model = get_family("dynamic-token-moe").tiny_model("no-shared-expert")
    x, t, y = _inputs(model)
    model.train()
    with record_routing(model) as routing:
        model(x, t, y)
    assert all(layer.imbalance() == 1.0 and layer.expert_ids == [] for layer in routing.values())


@torch.no_grad()
def test_expert_choice_routing_is_read_from_the_router_output():
    model = get_family("dynamic-token-moe").tiny_model("no-shared-expert").eval()
    model.transformer_blocks[1].ff.capacity_predictor.expert_threshold.fill_(0.5)  # a varying count per expert
    x, t, y = _inputs(model)
    seen = []
    handle = model.transformer_blocks[1].ff.router.register_forward_hook(lambda m, i, o: seen.append(o))
    with record_routing(model) as routing:
        model(x, t, y)
    handle.remove()
    layer = routing["transformer_blocks.1.ff"]
    assert len(layer.selections) == 1 and len(seen) == 1
    (selection, num_tokens), output = layer.selections[0], seen[0]
    assert num_tokens == 2 * (8 // 2) ** 2 and layer.expert_ids == []
    assert torch.equal(selection.token_index, output.token_index)
    assert torch.equal(selection.expert_index, output.expert_index)
    assert torch.equal(layer.counts, torch.bincount(output.expert_index, minlength=4))
    top = layer.top_experts(0)
    for token in range(num_tokens):
        took = output.token_index == token
        expected = int(output.expert_index[took][output.weights[took].argmax()]) if took.any() else -1
        assert int(top[token]) == expected

    model.train()  # training statistics in the output agree with the recorded routing
    with record_routing(model) as routing:
        statistics = model(x, t, y).moe_statistics
    assert torch.equal(
        statistics["transformer_blocks.1.ff"]["tokens_per_expert"], routing["transformer_blocks.1.ff"].counts
    )
