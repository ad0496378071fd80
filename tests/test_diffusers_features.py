"""diffusers' own machinery acting on the models of every family: layerwise casting, group offloading, loading and
casting under `torch.inference_mode()`, `compile_repeated_blocks`, gradient checkpointing, LoRA and torchao
quantization. Each feature is compared with the same tiny model without it, and the expert banks are checked to run
the backend they should (a fast backend only where reading the experts' weights directly is valid)."""

import copy
import os
import re

import pytest
import torch
from torch import nn

from diffmoe_hf.families import get_family
from diffmoe_hf.models.dynamic_token_moe_layer import DynamicTokenMoE
from diffmoe_hf.models.moe import (
    default_expert_backend,
    reads_weights_directly,
    resolve_expert_backend,
)

from .helpers import (
    expert_banks,
    float32_tolerance,
    model_float32_tolerance,
    model_inputs,
    randomize_weights,
    registered_families,
)


os.environ.setdefault("HF_HUB_OFFLINE", "1")

# two blocks of each kind (dense and MoE where a family mixes them)
BLOCKS = 4


def tiny_model(family: str) -> nn.Module:
    """A tiny eval-mode model whose every parameter matters (adaLN branches and gates are not zero)."""
    torch.manual_seed(0)
    model = randomize_weights(get_family(family).tiny_model(num_layers=BLOCKS).eval())
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DynamicTokenMoE):  # calibrated thresholds: a varying number of tokens per expert
                layer.capacity_predictor.expert_threshold.fill_(0.5)
    return model


def backends_seen(model: nn.Module, inputs: dict) -> set[str]:
    """The backends the expert banks resolve to during a forward on `inputs` (on the rows they receive)."""
    seen, banks = set(), expert_banks(model)
    for bank in banks:

        def forward_grouped(rows, *args, bank=bank, original=bank.forward_grouped, **kwargs):
            seen.add(bank.backend(rows))
            return original(rows, *args, **kwargs)

        bank.forward_grouped = forward_grouped  # an instance attribute over the class's method
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for bank in banks:
            del bank.forward_grouped
    return seen


def routing_record(model: nn.Module) -> tuple[list, list]:
    """Hooks recording every routing decision of a forward: (expert ids per MoE layer, handles)."""
    decisions, handles = [], []
    for module in model.modules():
        if isinstance(module, DynamicTokenMoE):  # its router returns the experts' choices as ExpertSegments
            handles.append(
                module.router.register_forward_hook(
                    lambda m, args, out: decisions.append((out.token_index.clone(), out.expert_index.clone()))
                )
            )
        elif hasattr(module, "router") and hasattr(module, "experts"):
            handles.append(module.router.register_forward_hook(lambda m, args, out: decisions.append(out[0].clone())))
    return decisions, handles


def assert_same_routing(routing: list, want_routing: list) -> None:
    """Every routing decision of two forwards (`routing_record`) is identical."""
    assert len(routing) == len(want_routing) > 0
    for got, expected in zip(routing, want_routing):
        if isinstance(got, tuple):  # DiffMoE: (token_index, expert_index) of the selection
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        else:
            assert torch.equal(got, expected)


def run(model: nn.Module, inputs: dict, record_routing: bool = False):
    decisions, handles = routing_record(model) if record_routing else ([], [])
    try:
        with torch.no_grad():
            out = model(**inputs).sample
    finally:
        for handle in handles:
            handle.remove()
    return (out, decisions) if record_routing else out


# ----------------------------------------------------------------------------------------------------------------
# The rule that decides when a fast backend may read the experts' weights


def test_fast_backends_step_aside_for_anything_that_changes_what_a_projection_computes():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from diffusers.hooks import HookRegistry, ModelHook
    from peft import LoraConfig, inject_adapter_in_model

    rows = torch.zeros(3, 8)

    def linear():
        return nn.Linear(8, 4)

    assert reads_weights_directly(linear(), rows)
    hooked = linear()
    hooked.register_forward_hook(lambda *args: None)
    pre_hooked = linear()
    pre_hooked.register_forward_pre_hook(lambda *args: None)
    diffusers_hooked = linear()
    HookRegistry.check_if_exists_or_initialize(diffusers_hooked).register_hook(ModelHook(), "noop")
    accelerate_hooked = linear()
    add_hook_to_module(accelerate_hooked, AlignDevicesHook(execution_device="cpu"))
    wrapped = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), nn.ModuleDict({"proj": linear()}))
    half = linear().half()
    on_meta = nn.Linear(8, 4, device="meta")
    subclass_weight = linear()
    subclass_weight.weight = nn.Parameter(torch.zeros(4, 8).as_subclass(_MarkedTensor))
    for module in (
        hooked,
        pre_hooked,
        diffusers_hooked,
        accelerate_hooked,
        wrapped["proj"],
        half,
        on_meta,
        subclass_weight,
    ):
        assert not reads_weights_directly(module, rows), module
        assert resolve_expert_backend("segment_linear", [linear(), module], rows) == "modules"
    assert reads_weights_directly(half, rows.half())
    assert resolve_expert_backend("auto", [linear()], rows) == default_expert_backend(rows) == "segment_linear"
    assert resolve_expert_backend("grouped_mm", [linear()], rows) == "grouped_mm"
    assert resolve_expert_backend("modules", [linear()], rows) == "modules"
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert resolve_expert_backend("auto", [linear()], rows) == "modules"
    finally:
        handle.remove()


@pytest.mark.parametrize("change", ["diffusers_hook", "lora"])
def test_a_compiled_layer_sees_experts_hooked_or_wrapped_after_compilation(change):
    from diffusers.hooks import HookRegistry, ModelHook
    from peft import LoraConfig, inject_adapter_in_model

    from diffmoe_hf.models.moe import DeepSeekMoE

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    torch.manual_seed(0)
    layer = DeepSeekMoE(dim=16, num_experts=4, num_experts_per_tok=2, intermediate_size=8).eval()
    hidden = torch.randn(2, 6, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            before = compiled(hidden)
            if change == "diffusers_hook":
                for expert in layer.experts:
                    HookRegistry.check_if_exists_or_initialize(expert.down_proj).register_hook(Double(), "double")
            else:
                config = LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)
                inject_adapter_in_model(config, layer.experts)
            after, eager = compiled(hidden), layer(hidden)
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, eager, atol=float32_tolerance(eager, 16, depth=2), rtol=0)


class _MarkedTensor(torch.Tensor):
    """A tensor subclass standing in for quantized weights (torchao's are subclasses too)."""


@pytest.mark.parametrize("family", registered_families())
def test_every_backend_gives_the_same_model_output(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    assert backends_seen(model, inputs) == {"segment_linear"}
    reference = run(model, inputs)
    for backend in ("modules", "grouped_mm"):
        model.set_expert_backend(backend)
        assert backends_seen(model, inputs) == {backend}
        torch.testing.assert_close(
            run(model, inputs), reference, atol=model_float32_tolerance(model, reference), rtol=0
        )


# ----------------------------------------------------------------------------------------------------------------
# Layerwise casting


def _layerwise_cast_modules(model: nn.Module) -> list[str]:
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    return [
        name
        for name, module in model.named_modules()
        if hasattr(module, "_diffusers_hook") and module._diffusers_hook.get_hook(_LAYERWISE_CASTING_HOOK) is not None
    ]


_ROUTER = r"router|capacity_predictor"  # every family's router; DiffMoE's capacity predictor


@pytest.mark.parametrize(
    "storage_dtype, compute_dtype",
    [(torch.float8_e4m3fn, torch.float32), (torch.float16, torch.float32), (torch.float8_e4m3fn, torch.bfloat16)],
    ids=["fp8-fp32", "fp16-fp32", "fp8-bf16"],
)
@pytest.mark.parametrize("family", registered_families())
def test_layerwise_casting_computes_with_the_stored_weights_and_exact_routers(
    family, storage_dtype, compute_dtype, tmp_path
):
    model = tiny_model(family)
    inputs = model_inputs(model)
    if compute_dtype != torch.float32:  # loaded in the compute dtype, routers kept float32 (`_keep_in_fp32_modules`)
        model.save_pretrained(tmp_path)
        model = type(model).from_pretrained(tmp_path, torch_dtype=compute_dtype).eval()
        inputs["hidden_states"] = inputs["hidden_states"].to(compute_dtype)
    reference = copy.deepcopy(model)
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    cast = _layerwise_cast_modules(model)
    # the reference holds the very values the hooks compute with: the cast modules' weights through the storage dtype
    with torch.no_grad():
        for name in cast:
            for tensor in reference.get_submodule(name).parameters():
                tensor.copy_(tensor.to(storage_dtype).to(compute_dtype))
    for bank in expert_banks(model):  # every expert projection is stored in the low precision
        assert all(p.dtype == storage_dtype for p in bank.parameters() if p.dim() == 2)
    routers = [n for n, _ in model.named_parameters() if re.search(_ROUTER, n)]
    assert routers and all(model.get_parameter(n).dtype == torch.float32 for n in routers)
    assert not any(re.search(_ROUTER, name) for name in cast)

    assert backends_seen(model, inputs) == {"modules"}  # the experts' hooks must run
    reference.set_expert_backend("modules")  # the same computation, on the same values
    out, routing = run(model, inputs, record_routing=True)
    want, want_routing = run(reference, inputs, record_routing=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert_same_routing(routing, want_routing)


# ----------------------------------------------------------------------------------------------------------------
# Group offloading


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("family", registered_families())
def test_group_offloading_gives_the_model_output(family, offload_type, to_disk, tmp_path):
    model = tiny_model(family)
    inputs = model_inputs(model)
    reference = copy.deepcopy(model)
    cpu = torch.device("cpu")
    options = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    if to_disk:
        options["offload_to_disk_path"] = str(tmp_path)
    model.enable_group_offload(cpu, offload_device=cpu, offload_type=offload_type, **options)
    # block level onloads a whole block before it runs: the fast backend reads onloaded weights; leaf level hooks
    # every expert projection, which must then run through its module
    expected_backend = "segment_linear" if offload_type == "block_level" else "modules"
    assert backends_seen(model, inputs) == {expected_backend}
    reference.set_expert_backend(expected_backend)
    for _ in range(2):  # the second call runs on weights onloaded again (from disk where offloaded there)
        out = run(model, inputs)
        assert not out.isnan().any()
        torch.testing.assert_close(out, run(reference, inputs), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA device")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("family", registered_families())
def test_group_offloading_with_cuda_streams(family, offload_type):
    model = tiny_model(family)
    inputs = {k: v.cuda() for k, v in model_inputs(model).items()}
    reference = copy.deepcopy(model).cuda()
    options = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cuda"), offload_type=offload_type, use_stream=True, **options)
    want = run(reference, inputs)
    for _ in range(2):
        out = run(model, inputs)
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, atol=model_float32_tolerance(model, want), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Loading and casting under torch.inference_mode()


@pytest.mark.parametrize("family", registered_families())
def test_loading_casting_and_updating_under_inference_mode(family, tmp_path):
    model = tiny_model(family)
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path)
    want = run(model, inputs)
    with torch.inference_mode():
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert all(p.is_inference() for p in loaded.parameters())
        inside = loaded(**inputs).sample
    torch.testing.assert_close(inside, want, atol=0, rtol=0)
    torch.testing.assert_close(run(loaded, inputs), want, atol=0, rtol=0)  # a later forward, outside

    with torch.inference_mode():
        loaded.to(torch.float64)
    torch.testing.assert_close(
        run(loaded, {**inputs, "hidden_states": inputs["hidden_states"].double()}),
        run(copy.deepcopy(model).double(), {**inputs, "hidden_states": inputs["hidden_states"].double()}),
        atol=0,
        rtol=0,
    )
    # weights updated in place (no version counter on inference tensors) are what the next forward computes with
    other = tiny_model(family)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.5)
    with torch.inference_mode():
        loaded.to(torch.float32)
        loaded.load_state_dict(other.state_dict())
    torch.testing.assert_close(run(loaded, inputs), run(other, inputs), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Regional compilation


@pytest.mark.parametrize("family", registered_families())
def test_compile_repeated_blocks_fullgraph_compiles_each_block_class_once(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    want = run(model, inputs)
    block_classes = {type(block).__name__ for block in model.transformer_blocks}
    assert block_classes <= set(model._repeated_blocks)
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):  # a second graph for any block class fails
            for _ in range(2):
                torch.testing.assert_close(run(model, inputs), want, atol=model_float32_tolerance(model, want), rtol=0)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.mark.parametrize("family", registered_families())
def test_gradient_checkpointing_gives_the_same_gradients(family):
    def gradients(checkpointing: bool):
        model = tiny_model(family).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        inputs = model_inputs(model)
        torch.manual_seed(2)  # label dropout draws the same labels in both runs
        output = model(**inputs)
        out, aux_loss = output.sample, output.aux_loss
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        (loss if aux_loss is None else loss + aux_loss).backward()
        state = {n: b.clone() for n, b in model.named_buffers()}  # after the backward's recomputation
        return out, aux_loss, state, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out, aux_loss, state, grads = gradients(False)
    checkpointed_out, checkpointed_aux_loss, checkpointed_state, checkpointed_grads = gradients(True)
    torch.testing.assert_close(checkpointed_out, out, atol=0, rtol=0)
    torch.testing.assert_close(checkpointed_aux_loss, aux_loss, atol=0, rtol=0)  # reported once, not per recompute
    for name, buffer in state.items():  # DiffMoE's thresholds moved once, not again in the recomputation
        torch.testing.assert_close(checkpointed_state[name], buffer, atol=0, rtol=0, msg=name)
    assert grads.keys() == checkpointed_grads.keys()
    assert any(".experts." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=0, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def expert_projections(model: nn.Module) -> str:
    """A peft `target_modules` regex for every `nn.Linear` of the routed experts (`...experts.<e>.<name>`)."""
    names = {
        re.sub(r".*\.experts\.\d+\.", "", name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.search(r"\.experts\.\d+\.", name)
    }
    return rf".*\.experts\.\d+\.({'|'.join(re.escape(name) for name in sorted(names))})"


@pytest.mark.parametrize("family", registered_families())
def test_lora_keeps_the_fast_backend_unless_it_wraps_the_experts(family):
    from peft import LoraConfig

    model = tiny_model(family)
    inputs = model_inputs(model)
    base = run(model, inputs)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]), adapter_name="attention")
    assert backends_seen(model, inputs) == {"segment_linear"}
    torch.testing.assert_close(run(model, inputs), base, atol=0, rtol=0)  # lora_B starts at zero

    model.add_adapter(LoraConfig(r=2, target_modules=expert_projections(model)), adapter_name="experts")
    model.set_adapters(["attention", "experts"])
    assert backends_seen(model, inputs) == {"modules"}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    with_lora = run(model, inputs)
    assert not torch.allclose(with_lora, base)
    model.fuse_lora()  # the adapters merged into plain nn.Linear weights (the wrappers stay, inactive)
    model.unload_lora()
    assert backends_seen(model, inputs) == {"segment_linear"}
    torch.testing.assert_close(run(model, inputs), with_lora, atol=model_float32_tolerance(model, with_lora), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Quantization


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter occupies, counting the inner tensors of a tensor subclass (torchao's quantized weights)."""
    if type(tensor) in (nn.Parameter, torch.Tensor):
        return tensor.nbytes
    names, _ = tensor.__tensor_flatten__()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


@pytest.mark.parametrize("family", registered_families())
def test_torchao_int8_weight_only_quantizes_every_expert(family, tmp_path):
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    model = tiny_model(family)
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path)
    quantized = (
        type(model)
        .from_pretrained(
            tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
        )
        .eval()
    )
    expert_weights = [linear.weight for bank in expert_banks(quantized) for linear in bank.projections()]
    assert len(expert_weights) > 0 and all(type(w) is not nn.Parameter for w in expert_weights)  # every one of them
    routers = [p for n, p in quantized.named_parameters() if re.search(_ROUTER, n)]
    assert routers and all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in routers)
    unquantized_bytes = sum(linear.weight.nbytes for bank in expert_banks(model) for linear in bank.projections())
    quantized_bytes = sum(stored_bytes(w) for w in expert_weights)
    # int8 values plus a scale and a zero point (at most 4 bytes each) per output row
    rows = sum(w.shape[0] for w in expert_weights)
    assert quantized_bytes <= unquantized_bytes // 4 + rows * 8

    assert backends_seen(quantized, inputs) == {"modules"}  # the quantized linears compute, not their raw weights
    # reference: the unquantized model holding the dequantized weights, i.e. the values the int8 kernels multiply by
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in quantized.named_parameters():
            if type(parameter) is not nn.Parameter:
                dequantized.get_parameter(name).copy_(parameter.dequantize())
    dequantized.set_expert_backend("modules")
    out, routing = run(quantized, inputs, record_routing=True)
    want, want_routing = run(dequantized, inputs, record_routing=True)
    torch.testing.assert_close(out, want, atol=model_float32_tolerance(model, want), rtol=0)
    assert_same_routing(routing, want_routing)
    # and close to the unquantized model: symmetric int8 rounding moves a weight by at most max|row| / 254, i.e. a
    # row's output by at most sqrt(in_features) / 254 of its norm; first order, the errors of the (at most 4 per
    # block, plus input and output layers) quantized linears a signal passes in series add up
    plain = run(model, inputs)
    widest = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    bound = (4 * len(model.transformer_blocks) + 2) * widest**0.5 / 254
    assert (out - plain).norm() / plain.norm() < bound


def test_pipeline_quantization_config_reaches_the_experts(tmp_path):
    pytest.importorskip("torchao")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from diffmoe_hf import ClassConditionalMoEPipeline

    from .helpers import tiny_pipeline

    tiny_pipeline(with_vae=False).save_pretrained(tmp_path)
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = ClassConditionalMoEPipeline.from_pretrained(tmp_path, quantization_config=config, torch_dtype=torch.float32)
    expert_weights = [linear.weight for bank in expert_banks(pipe.transformer) for linear in bank.projections()]
    assert len(expert_weights) > 0 and all(type(w) is not nn.Parameter for w in expert_weights)
    latents = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="latent").images
    assert latents.shape[0] == 2 and not latents.isnan().any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' bitsandbytes quantizer needs a CUDA GPU")
@pytest.mark.parametrize("family", registered_families())
def test_bitsandbytes_int8_quantizes_every_expert(family, tmp_path):
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    quantized = (
        type(model)
        .from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), torch_dtype=torch.float32
        )
        .eval()
    )
    linears = [linear for bank in expert_banks(quantized) for linear in bank.projections()]
    assert len(linears) > 0 and all(type(linear) is not nn.Linear for linear in linears)
    inputs = {k: v.cuda() for k, v in model_inputs(model).items()}
    assert backends_seen(quantized, inputs) == {"modules"}
    out, plain = run(quantized, inputs), run(model.cuda(), inputs)
    widest = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    bound = (4 * len(model.transformer_blocks) + 2) * widest**0.5 / 254  # as for torchao's int8 above
    assert not out.isnan().any() and (out - plain).norm() / plain.norm() < bound
