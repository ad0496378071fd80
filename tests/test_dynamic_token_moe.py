"""DiffMoE (Shi et al., dynamic token selection): routing semantics, batch dependence, training mode, presets and the
converter, on tiny configurations."""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from diffmoe_hf import ClassConditionalMoEPipeline, DynamicTokenMoETransformer2DModel
from diffmoe_hf.conversion import CheckpointError, convert_checkpoint, load_original_checkpoint
from diffmoe_hf.conversion.convert_dynamic_token_moe import build_dynamic_token_moe_transformer
from diffmoe_hf.formulations import get_formulation
from diffmoe_hf.models import dynamic_token_moe_layer
from diffmoe_hf.models.dynamic_token_moe_layer import DynamicTokenMoE
from diffmoe_hf.models.moe import EXPERT_BACKENDS, MoECollector, segments_from_expert_choice

from .conftest import parity_root
from .helpers import assert_float32_close, float32_tolerance, model_float32_tolerance, randomize_weights


DIM, EXPERTS = 8, 4
EXPERT_WIDTH = 12  # intermediate size of `tiny_layer`'s experts


def tiny_model(**overrides) -> DynamicTokenMoETransformer2DModel:
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        mlp_ratio=1.0,
        num_classes=10,
        num_experts=EXPERTS,
        moe_intermediate_size=8,
    )
    model = randomize_weights(DynamicTokenMoETransformer2DModel(**{**config, **overrides})).eval()
    model.transformer_blocks[1].ff.capacity_predictor.expert_threshold.copy_(torch.tensor([0.3, 0.4, 0.5, 0.6]))
    return model


def tiny_layer(**kwargs) -> DynamicTokenMoE:
    return DynamicTokenMoE(dim=DIM, num_experts=EXPERTS, intermediate_size=EXPERT_WIDTH, **kwargs)


def routed(layer: DynamicTokenMoE, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer(hidden)` and the (E,) tokens each expert took, read from the router's output."""
    selections = []
    handle = layer.router.register_forward_hook(lambda module, args, output: selections.append(output))
    try:
        out = layer(hidden)
    finally:
        handle.remove()
    (selection,) = selections
    return out, torch.diff(selection.offsets, prepend=selection.offsets.new_zeros(1)).long()


def reference_eval(layer: DynamicTokenMoE, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference rule written out per expert: k_e = #{p > threshold_e} over the pool; expert e takes its k_e
    best-scoring tokens; outputs are added with the gate score."""
    tokens = hidden.reshape(-1, DIM)
    scores = F.linear(tokens, layer.router.weight).softmax(-1)
    probs = layer.capacity_predictor(tokens).sigmoid()
    out, counts = torch.zeros_like(tokens), []
    for e, expert in enumerate(layer.experts):
        k = int((probs[:, e] > layer.capacity_predictor.expert_threshold[e]).sum())
        weight, index = scores[:, e].topk(k)
        out[index] += weight.unsqueeze(-1) * expert(tokens[index])
        counts.append(k)
    return out.view_as(hidden), torch.tensor(counts)


@pytest.mark.parametrize("thresholds", [[0.2, 0.45, 0.5, 0.7], [1.0, 0.3, 1.0, 0.5]], ids=["all", "idle-experts"])
@torch.no_grad()
def test_eval_routing_matches_the_dynamic_token_rule(thresholds):
    layer = tiny_layer().eval()
    layer.capacity_predictor.expert_threshold.copy_(torch.tensor(thresholds))
    hidden = torch.randn(3, 5, DIM)
    expected, counts = reference_eval(layer, hidden)
    with MoECollector() as collector:
        out, tokens_per_expert = routed(layer, hidden)
    assert_float32_close(out, expected, float32_tolerance(expected, EXPERT_WIDTH, depth=3))
    assert torch.equal(tokens_per_expert, counts)
    assert 0 < counts.sum() < EXPERTS * 15, "thresholds should make the experts take part of the pool"
    assert collector.aux_losses == [] and collector.statistics == {}  # eval mode reports nothing


@torch.no_grad()
def test_threshold_is_strict():
    layer = tiny_layer().eval()
    hidden = torch.randn(2, 4, DIM)
    probs = layer.capacity_predictor(hidden.reshape(-1, DIM)).sigmoid()
    layer.capacity_predictor.expert_threshold.copy_(probs[3])  # token 3 sits exactly on every threshold
    _, tokens_per_expert = routed(layer, hidden)
    assert torch.equal(tokens_per_expert, (probs > probs[3]).sum(0))
    assert not torch.equal(tokens_per_expert, (probs >= probs[3]).sum(0))


@torch.no_grad()
def test_no_selected_token_gives_zero_moe_output():
    layer = tiny_layer().eval()
    layer.capacity_predictor.expert_threshold.fill_(1.0)
    out, tokens_per_expert = routed(layer, torch.randn(2, 4, DIM))
    assert torch.equal(out, torch.zeros(2, 4, DIM))
    assert torch.equal(tokens_per_expert, torch.zeros(EXPERTS, dtype=torch.int64))


@torch.no_grad()
def test_segments_from_expert_choice_keeps_leading_choices():
    token_ids = torch.tensor([[3, 1, 0], [2, 0, 1]])
    weights = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]])
    segments = segments_from_expert_choice(token_ids, weights, torch.tensor([1, 2]))
    assert segments.token_index.tolist() == [3, 2, 0]
    assert segments.expert_index.tolist() == [0, 1, 1]
    assert segments.offsets.tolist() == [1, 3]
    everything = segments_from_expert_choice(token_ids, weights)
    assert everything.token_index.tolist() == [3, 1, 0, 2, 0, 1] and everything.offsets.tolist() == [3, 6]


@torch.no_grad()
def test_grouped_gelu_experts_match_the_expert_modules():
    layer = tiny_layer()
    segments = segments_from_expert_choice(torch.randint(0, 6, (EXPERTS, 3)), torch.rand(EXPERTS, 3))
    rows = torch.randn(EXPERTS * 3, DIM)
    per_module = EXPERT_BACKENDS["modules"].run(layer.experts, rows, segments)
    grouped = layer.experts.forward_grouped(rows, segments)
    assert_float32_close(grouped, per_module, float32_tolerance(per_module, EXPERT_WIDTH, depth=2))


@torch.no_grad()
def test_output_depends_on_the_rest_of_the_batch():
    model = tiny_model()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    together = model(x, t, y).sample
    alone = model(x[:1], t[:1], y[:1]).sample
    assert model.routing_depends_on_batch
    assert (together[:1] - alone).abs().max() > model_float32_tolerance(model, together)  # not rounding: routing
    torch.testing.assert_close(model(x, t, y).sample, together, atol=0, rtol=0)  # same composition, same result


def test_pipeline_runs_cond_and_uncond_as_separate_calls():
    model = tiny_model()
    scheduler = get_formulation("rf-noise-at-0").default_scheduler()
    pipe = ClassConditionalMoEPipeline(transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[2].tolist()))
    pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    assert calls == [[1, 2], [10, 10]] * 3
    calls.clear()
    pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert calls == [[1, 2]] * 2


def test_training_is_expert_choice_with_capacity_loss():
    layer = tiny_layer(capacity_loss_weight=0.5).train()
    hidden = torch.randn(2, 6, DIM, requires_grad=True)
    with MoECollector() as collector:
        out, tokens_per_expert = routed(layer, hidden)
    tokens = hidden.reshape(-1, DIM)
    k = int(12 / EXPERTS * 1.0)
    scores = F.linear(tokens, layer.router.weight).softmax(-1)
    weight, index = scores.t().topk(k)
    expected = torch.zeros_like(tokens)
    chosen = torch.zeros(12, EXPERTS)
    for e, expert in enumerate(layer.experts):
        expected = expected.index_add(0, index[e], weight[e].unsqueeze(-1) * expert(tokens[index[e]]))
        chosen[index[e], e] = 1.0
    assert_float32_close(out, expected.view_as(hidden), float32_tolerance(expected, EXPERT_WIDTH, depth=3))
    assert tokens_per_expert.tolist() == [k] * EXPERTS
    assert collector.statistics[layer]["tokens_per_expert"].tolist() == [k] * EXPERTS
    logits = layer.capacity_predictor(tokens.detach())
    (capacity_loss,) = collector.aux_losses
    torch.testing.assert_close(capacity_loss, 0.5 * F.binary_cross_entropy_with_logits(logits, chosen))
    kth_largest = logits.sigmoid().topk(k, dim=0).values[-1]
    torch.testing.assert_close(collector.statistics[layer]["capacity_quantile"], kth_largest, atol=0, rtol=0)
    assert torch.equal(layer.capacity_predictor.expert_threshold, torch.zeros(EXPERTS))  # the model moves them

    out.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts[0].net[0].proj.weight.grad.abs().sum() > 0
    assert layer.capacity_predictor.linear_1.weight.grad is None  # trained only by its own loss
    capacity_loss.backward()
    assert layer.capacity_predictor.linear_1.weight.grad.abs().sum() > 0


def test_model_returns_the_capacity_losses_and_statistics():
    model = tiny_model(num_layers=4).train()
    layers = [b.ff for b in model.transformer_blocks if isinstance(b.ff, DynamicTokenMoE)]
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in layers]
    torch.manual_seed(0)
    output = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    for handle in handles:
        handle.remove()
    assert list(output.moe_statistics) == ["transformer_blocks.1.ff", "transformer_blocks.3.ff"]
    losses = []
    for layer, hidden in zip(layers, inputs):
        tokens = hidden.detach().reshape(-1, DIM)
        segments = layer.router(tokens, 32 // EXPERTS)
        chosen = torch.zeros(32, EXPERTS)
        chosen[segments.token_index, segments.expert_index] = 1.0
        losses.append(F.binary_cross_entropy_with_logits(layer.capacity_predictor(tokens), chosen))
    torch.testing.assert_close(output.aux_loss, losses[0] + losses[1], atol=0, rtol=0)
    assert not any(hasattr(layer, name) for layer in layers for name in ("aux_loss", "tokens_per_expert", "selection"))
    sample, aux_loss, statistics = model(
        torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), return_dict=False
    )
    assert aux_loss.ndim == 0 and statistics.keys() == output.moe_statistics.keys()
    model.eval()
    with torch.no_grad():
        assert len(model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), return_dict=False)) == 1
        assert model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])).aux_loss is None


def _expected_thresholds(model, inputs: list[torch.Tensor], before: list[torch.Tensor]) -> list[torch.Tensor]:
    """One EMA step of each MoE layer's thresholds towards the k-th largest predicted probability, by hand."""
    expected = []
    for layer, hidden, threshold in zip(_moe_layers(model), inputs, before):
        tokens = hidden.detach().reshape(-1, DIM)
        probs = layer.capacity_predictor(tokens).sigmoid()
        kth_largest = probs.topk(tokens.shape[0] // EXPERTS, dim=0).values[-1]
        decay = layer.capacity_predictor.ema_decay  # float32 0.95
        expected.append(threshold * decay + (1 - decay) * kth_largest)
    return expected


def _moe_layers(model) -> list[DynamicTokenMoE]:
    return [b.ff for b in model.transformer_blocks if isinstance(b.ff, DynamicTokenMoE)]


@contextlib.contextmanager
def recording_layer_inputs(model):
    """Yields the list of the inputs of every call of the MoE layers while open (recomputations included)."""
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, args: calls.append(args[0])) for layer in _moe_layers(model)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _training_loss(model) -> torch.Tensor:
    torch.manual_seed(0)
    output = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    return output.sample.square().mean() + output.aux_loss


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_training_step_moves_each_threshold_exactly_once(checkpointing):
    assert not torch.distributed.is_initialized()
    model = tiny_model(num_layers=4).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    before = [layer.capacity_predictor.expert_threshold.clone() for layer in _moe_layers(model)]
    with recording_layer_inputs(model) as calls:
        loss = _training_loss(model)
        after_forward = [layer.capacity_predictor.expert_threshold.clone() for layer in _moe_layers(model)]
        loss.backward()
    assert len(calls) == (4 if checkpointing else 2)  # the blocks really were recomputed in backward
    for layer, expected, moved in zip(
        _moe_layers(model), _expected_thresholds(model, calls[:2], before), after_forward
    ):
        torch.testing.assert_close(moved, expected, atol=0, rtol=0)
        assert torch.equal(layer.capacity_predictor.expert_threshold, moved)  # the recomputation changed nothing
    assert _moe_layers(model)[0].capacity_predictor.ema_decay.item() == pytest.approx(0.95)


def test_training_thresholds_are_averaged_across_ranks_in_one_collective(monkeypatch):
    other_rank = torch.rand(2 * EXPERTS)
    reduced = []

    def all_reduce(tensor, op):
        assert op == torch.distributed.ReduceOp.SUM
        reduced.append(tensor.clone())
        tensor += other_rank

    monkeypatch.setattr(dynamic_token_moe_layer.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dynamic_token_moe_layer.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dynamic_token_moe_layer.dist, "all_reduce", all_reduce)
    model = tiny_model(num_layers=4).train()
    model.enable_gradient_checkpointing()
    before = [layer.capacity_predictor.expert_threshold.clone() for layer in _moe_layers(model)]
    with recording_layer_inputs(model) as calls:
        _training_loss(model).backward()
    assert len(reduced) == 1  # one collective for both layers, none in the recomputation
    local = torch.cat(_expected_thresholds(model, calls[:2], before))
    torch.testing.assert_close(reduced[0], local, atol=0, rtol=0)
    averaged = torch.cat([layer.capacity_predictor.expert_threshold for layer in _moe_layers(model)])
    torch.testing.assert_close(averaged, (local + other_rank) / 2, atol=0, rtol=0)


@torch.no_grad()
def test_training_threshold_update_in_a_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model().train()
        before = [layer.capacity_predictor.expert_threshold.clone() for layer in _moe_layers(model)]
        with recording_layer_inputs(model) as calls:
            _training_loss(model)
        (expected,) = _expected_thresholds(model, calls, before)
        torch.testing.assert_close(_moe_layers(model)[0].capacity_predictor.expert_threshold, expected)
    finally:
        torch.distributed.destroy_process_group()


def test_training_needs_a_token_per_expert():
    with pytest.raises(ValueError, match="tokens per expert"):
        tiny_layer().train()(torch.randn(1, 3, DIM))


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    model.save_pretrained(tmp_path)
    loaded = DynamicTokenMoETransformer2DModel.from_pretrained(tmp_path).eval()
    predictor = loaded.transformer_blocks[1].ff.capacity_predictor
    assert torch.equal(predictor.expert_threshold, torch.tensor([0.3, 0.4, 0.5, 0.6]))
    assert predictor.ema_decay.item() == pytest.approx(0.95)
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


@torch.no_grad()
def test_lora_on_experts_uses_the_per_expert_path():
    from peft import LoraConfig

    model = tiny_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    base = model(x, t, y).sample
    model.add_adapter(LoraConfig(r=2, target_modules=r".*experts\.\d+\.net\.(0\.proj|2)"))
    tolerance = model_float32_tolerance(model, base)
    assert_float32_close(model(x, t, y).sample, base, tolerance)  # lora_B starts at zero: the per-expert path agrees
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_()
    assert (model(x, t, y).sample - base).abs().max() > tolerance


@pytest.mark.parametrize(
    "name, total, active, experts",
    [
        ("DiffMoE-S-E16", 140.2, 33.8, 16),
        ("DiffMoE-B-E16", 559.0, 134.0, 16),
        ("DiffMoE-L-E16", 1175.7, 470.6, 8),  # the yaml called L_E16 defines 8 experts
        ("DiffMoE-L-E8", 1175.7, 470.6, 8),
    ],
)
def test_preset_parameter_counts(name, total, active, experts):
    with torch.device("meta"):
        model = DynamicTokenMoETransformer2DModel.from_preset(name)
    params = sum(p.numel() for p in model.parameters())
    moe_layers = [b.ff for b in model.transformer_blocks if isinstance(b.ff, DynamicTokenMoE)]
    per_expert = sum(p.numel() for p in moe_layers[0].experts[0].parameters())
    assert model.config.num_experts == experts
    assert round(params / 1e6, 1) == total
    assert round((params - len(moe_layers) * (experts - 1) * per_expert) / 1e6, 1) == active


def test_unknown_preset():
    with pytest.raises(ValueError, match="DiffMoE-S-E16"):
        DynamicTokenMoETransformer2DModel.from_preset("DiffMoE-XL-E16")


# converter -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def fixture_case():
    case = os.path.join(parity_root(), "diffmoe-dts-e4-cap")
    if not os.path.isdir(case):
        pytest.fail(f"missing fixture case {case}")
    return case


def write_yaml(tmp_path, case, edit):
    with open(os.path.join(case, "config.yaml")) as f:
        config = yaml.safe_load(f)
    edit(config["model"]["params"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_converter_needs_exactly_one_architecture_source(fixture_case):
    checkpoint = load_original_checkpoint(os.path.join(fixture_case, "checkpoint_ema_only.pt"))
    with pytest.raises(CheckpointError, match="do not store their architecture"):
        build_dynamic_token_moe_transformer(checkpoint)
    with pytest.raises(CheckpointError, match="not both"):
        build_dynamic_token_moe_transformer(
            checkpoint, config_path=os.path.join(fixture_case, "config.yaml"), preset="DiffMoE-S-E16"
        )
    with pytest.raises(CheckpointError, match=r"Unknown DynamicTokenMoE \(DiffMoE, Shi et al. 2025\) preset"):
        build_dynamic_token_moe_transformer(checkpoint, preset="DiffMoE-XL")


def test_converter_rejects_other_configs(fixture_case, tmp_path):
    checkpoint = load_original_checkpoint(os.path.join(fixture_case, "checkpoint_ema_only.pt"))
    swiglu = write_yaml(tmp_path, fixture_case, lambda p: p.update(use_swiglu=True))
    with pytest.raises(CheckpointError, match="use_swiglu"):
        build_dynamic_token_moe_transformer(checkpoint, config_path=swiglu)
    dsmoe = write_yaml(tmp_path, fixture_case, lambda p: p["MoE_config"].pop("capacity"))
    with pytest.raises(CheckpointError, match="does not look like a DiffMoE"):
        build_dynamic_token_moe_transformer(checkpoint, config_path=dsmoe)


def test_converter_reports_a_mismatched_checkpoint(fixture_case, tmp_path):
    shallow = write_yaml(tmp_path, fixture_case, lambda p: p.update(depth=2))
    with pytest.raises(CheckpointError, match="converted keys the model does not have"):
        convert_checkpoint(
            "diffmoe-dts",
            os.path.join(fixture_case, "checkpoint_ema_only.pt"),
            str(tmp_path / "out"),
            config_path=shallow,
        )
    assert not (tmp_path / "out").exists()


def test_converter_keeps_the_calibrated_buffers(fixture_case):
    checkpoint = load_original_checkpoint(os.path.join(fixture_case, "checkpoint.pt"))
    stored = checkpoint.state_dict["blocks.1.mlp.expert_threshold"].clone()
    model = build_dynamic_token_moe_transformer(checkpoint, config_path=os.path.join(fixture_case, "config.yaml"))
    predictor = model.transformer_blocks[1].ff.capacity_predictor
    assert torch.equal(predictor.expert_threshold, stored)
    assert "transformer_blocks.1.ff.capacity_predictor.expert_threshold" in model.state_dict()
    assert "transformer_blocks.1.ff.capacity_predictor.ema_decay" in model.state_dict()
