"""Expert offload tiers (`enable_expert_offload`): every tier this CPU runs, on every family, against the resident
model; the checks that refuse bad input before anything changes; the CLI options."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffmoe_hf import default_models
from diffmoe_hf.cli import main
from diffmoe_hf.models.moe import set_expert_backend
from diffmoe_hf.models.moe.offload import EXPERT_OFFLOAD_TIERS, enable_expert_offload, expert_linears
from diffmoe_hf.models.moe.offload import tiers as tiers_module
from diffmoe_hf.models.moe.offload.tiers import offload_banks_to_host

from .helpers import (
    assert_float32_close,
    model_float32_tolerance,
    model_inputs,
    registered_families,
    run_memory_worker,
    tiny_model,
    unwritable_folder,
)
from .pipeline_families import family_pipeline


FP8_RELATIVE_STEP = 2.0**-4  # float8_e4m3fn: 3 mantissa bits, so rounding moves a normal value by <= 2**-4 of it
FP8_SMALLEST_HALF_STEP = 2.0**-10  # half the subnormal spacing 2**-9, the bound below the normal range
SAMPLING_LIMIT = 16 * 2**20  # bytes of anonymous memory sampling may add: 16 one-MiB expert projections


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _resident_reference(model: nn.Module, expert_parameters: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A resident copy of `model` running each expert module on its rows (`"modules"`, the computation every tier
    leaves in place), with the expert parameters `expert_parameters` (by qualified name) where given."""
    reference = copy.deepcopy(model)
    set_expert_backend(reference, "modules")
    with torch.no_grad():
        for name, tensor in (expert_parameters or {}).items():
            reference.get_parameter(name).copy_(tensor)
    return reference


@pytest.mark.parametrize("family", registered_families())
def test_tiers_that_do_not_round_give_the_resident_output_exactly(family, tmp_path):
    model = tiny_model(family)
    inputs = model_inputs(model)
    expected = _output(_resident_reference(model), inputs)
    host = tiny_model(family)
    offload_banks_to_host(host, torch.device("cpu"))  # the cpu tier's machinery, with the CPU as the "device"
    disk = tiny_model(family)
    enable_expert_offload(disk, "disk", str(tmp_path / "experts"))
    assert all(linear.weight.numel() == 0 for _, linear in expert_linears(disk))  # nothing kept in memory
    for tier, offloaded in (("cpu machinery", host), ("disk", disk)):
        assert torch.equal(_output(offloaded, inputs), expected), tier
    # against the resident model as it runs by default (a fast backend: the same sums in another order)
    default = _output(model, inputs)
    assert_float32_close(_output(disk, inputs), default, model_float32_tolerance(model, default), "disk vs default")
    # the state dict (save_pretrained) has the real weights
    original = tiny_model(family).state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in disk.state_dict().items())


def test_disk_tier_follows_a_cast_of_the_model_after_offloading(tmp_path):
    """Experts stored in bfloat16 and computed in float32 (the cast a folder stored in bfloat16 needs)."""
    model = tiny_model("dit-moe").to(torch.bfloat16)
    enable_expert_offload(model, "disk", str(tmp_path))
    model.to(torch.float32)
    reference = _resident_reference(tiny_model("dit-moe").to(torch.bfloat16).to(torch.float32))
    inputs = model_inputs(reference)
    assert torch.equal(_output(model, inputs), _output(reference, inputs))


@pytest.mark.parametrize("family", registered_families())
def test_quantized_tiers_equal_the_model_with_rounded_expert_weights(family):
    model = tiny_model(family)
    inputs = model_inputs(model)
    originals = {
        f"{name}.{kind}": parameter.detach().clone()
        for name, linear in expert_linears(model)
        for kind, parameter in linear.named_parameters()
    }

    int8 = tiny_model(family)
    plan = enable_expert_offload(int8, "int8")
    held = sum(
        linear.weight.qdata.nbytes + linear.weight.scale.nbytes + (0 if linear.bias is None else linear.bias.nbytes)
        for _, linear in expert_linears(int8)
    )
    assert held == plan.tier_resident_bytes  # the plan counts what the quantized experts hold
    dequantized = {}
    for name, linear in expert_linears(int8):
        # torchao's per-row symmetric int8: weight ~ q * scale, |q| <= 127, rounding error <= scale / 2 (plus the
        # float32 rounding of the product)
        assert linear.weight.qdata.dtype == torch.int8
        original = originals[f"{name}.weight"]
        dequantized[f"{name}.weight"] = linear.weight.dequantize()
        half_step = linear.weight.scale.reshape(-1, 1) / 2 + original.abs() * torch.finfo(torch.float32).eps
        assert ((dequantized[f"{name}.weight"] - original).abs() <= half_step).all(), name
    reference = _resident_reference(model, dequantized)
    expected = _output(reference, inputs)
    assert_float32_close(_output(int8, inputs), expected, model_float32_tolerance(int8, expected), "int8")

    fp8 = tiny_model(family)
    plan = enable_expert_offload(fp8, "fp8")
    largest = max(sum(p.numel() for p in linear.parameters()) * 4 for _, linear in expert_linears(fp8))
    held = sum(p.nbytes for _, linear in expert_linears(fp8) for p in linear.parameters())
    assert held + largest == plan.tier_resident_bytes  # float8 storage plus one float32 projection while it runs
    rounded = {}  # weights and biases are both stored in float8
    for name, linear in expert_linears(fp8):
        for kind, parameter in linear.named_parameters():
            assert parameter.dtype == torch.float8_e4m3fn
            original = originals[f"{name}.{kind}"]
            rounded[f"{name}.{kind}"] = parameter.float()
            error = (parameter.float() - original).abs()
            assert (error <= original.abs() * FP8_RELATIVE_STEP + FP8_SMALLEST_HALF_STEP).all(), f"{name}.{kind}"
    reference = _resident_reference(model, rounded)
    assert torch.equal(_output(fp8, inputs), _output(reference, inputs))  # the same upcast, the same modules


def test_pipeline_samples_the_same_images_with_experts_on_disk(tmp_path):
    resident, offloaded = family_pipeline("dit-moe"), family_pipeline("dit-moe")
    set_expert_backend(resident.transformer, "modules")
    plan = offloaded.enable_expert_offload("disk", str(tmp_path))
    assert plan.stored_bytes == plan.expert_bytes > 0 and plan.tier_resident_bytes < plan.expert_bytes
    call = dict(class_labels=[0, 1], num_inference_steps=2, output_type="np")
    expected = resident(**call, generator=torch.Generator().manual_seed(0)).images
    assert (offloaded(**call, generator=torch.Generator().manual_seed(0)).images == expected).all()


@pytest.mark.parametrize("tier", ["int8", "fp8"])
def test_cli_quantizes_a_lower_precision_folder_bank_by_bank_as_the_api_does(tier, tmp_path):
    """A bfloat16 folder computed in float32 (`--expert-offload int8|fp8`): the CLI loads it in bfloat16 and upcasts
    one expert bank at a time before quantizing it (never the whole model in float32); the result is the model the
    API gives from the same folder loaded in float32 and then offloaded."""
    import argparse

    from diffmoe_hf import ClassConditionalMoEPipeline
    from diffmoe_hf.cli_expert_offload import load_pipeline_with_expert_offload

    pipe = family_pipeline("dit-moe")
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "bf16")
    args = argparse.Namespace(expert_offload=tier, offload_dir=None, memory_budget=None)
    float32_banks = []  # at each bank's turn: the expert banks held in float32 and not yet quantized
    offload_bank = tiers_module._offload_bank

    def counting_offload_bank(tier, name, linears, offload_dir):
        plain = [linear for _, linear in expert_linears(cli_model[0]) if type(linear.weight) is nn.Parameter]
        float32_banks.append(sum(linear.weight.dtype == torch.float32 for linear in plain) / len(linears))
        offload_bank(tier, name, linears, offload_dir)

    cli_model = []
    load = ClassConditionalMoEPipeline.from_pretrained

    def recording_load(*a, **k):
        loaded = load(*a, **k)
        cli_model.append(loaded.transformer)
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiers_module, "_offload_bank", counting_offload_bank)
        patch.setattr(ClassConditionalMoEPipeline, "from_pretrained", recording_load)
        cli = load_pipeline_with_expert_offload(str(tmp_path / "bf16"), args, torch.device("cpu"), torch.float32)
    assert float32_banks and max(float32_banks) == 1  # one bank in float32 at a time
    api = ClassConditionalMoEPipeline.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float32)
    api.enable_expert_offload(tier)
    assert all(p.dtype == torch.float32 for n, p in cli.transformer.named_parameters() if ".experts." not in n)
    inputs = model_inputs(cli.transformer)
    assert torch.equal(_output(cli.transformer, inputs), _output(api.transformer, inputs))


def _untouched(model: nn.Module) -> bool:
    return getattr(model, "_expert_offload_tier", "none") == "none" and all(
        linear.weight.numel() > 0 and not linear._forward_pre_hooks and type(linear.weight) is nn.Parameter
        for _, linear in expert_linears(model)
    )


def test_bad_input_is_refused_before_anything_changes(tmp_path, monkeypatch):
    model = tiny_model("dit-moe")
    plan = enable_expert_offload(tiny_model("dit-moe"), "int8")
    cases = [
        (dict(tier="gpu"), ", ".join(EXPERT_OFFLOAD_TIERS)),
        (dict(tier="int8", offload_dir=str(tmp_path)), "'disk' tier"),
        (dict(tier="disk", memory_budget=plan.resident_bytes - 1), "non-expert weights alone"),
        (dict(tier="int8", memory_budget=plan.peak_bytes - 1), f"{plan.peak_bytes / 2**30:.2f} GiB"),
        (dict(tier="disk", memory_budget=0), "positive number of bytes"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(tier="cpu"), "no CUDA device"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            enable_expert_offload(model, **kwargs)
        assert _untouched(model), kwargs
    monkeypatch.setattr(tiers_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(ValueError, match=r"has 0.00 GiB free but the experts need"):
        enable_expert_offload(model, "disk", str(tmp_path))
    assert _untouched(model) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["read-only", "/sys"])
def test_unwritable_offload_folder_is_refused(tmp_path, kind):
    model = tiny_model("dit-moe")
    with pytest.raises(ValueError, match="does not accept new files"):
        enable_expert_offload(model, "disk", unwritable_folder(tmp_path, kind))
    assert _untouched(model)


def test_enabling_twice_is_refused(tmp_path):
    model = tiny_model("dit-moe")
    enable_expert_offload(model, "fp8")
    with pytest.raises(ValueError, match="already enabled"):
        enable_expert_offload(model, "disk", str(tmp_path))


def test_cli_expert_offload_options(tmp_path, capsys):
    """One grid with the experts on disk (the same pixels as resident, up to one level of rounding to 8 bits);
    options that cannot work exit with status 2 before loading."""
    resident, offloaded = tmp_path / "resident.png", tmp_path / "disk.png"
    common = ["generate", "--steps", "1", "--per-class", "1", "--classes", "0", "1"]
    assert main([*common, "--output", str(resident)]) == 0
    experts = tmp_path / "experts"
    assert main([*common, "--expert-offload", "disk", "--offload-dir", str(experts), "--output", str(offloaded)]) == 0
    assert list(experts.glob("*.safetensors"))
    pixels = [np.asarray(Image.open(path)).astype(int) for path in (resident, offloaded)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    refused = [
        (["--expert-offload", "int8", "--offload-dir", str(experts)], "--offload-dir is the folder of"),
        (["--expert-offload", "disk", "--memory-budget", "0.000001"], "cannot be met"),
    ]
    if not torch.cuda.is_available():
        refused.append((["--expert-offload", "cpu"], "no CUDA device"))
    for options, message in refused:
        assert main([*common, *options, "--output", str(tmp_path / "refused.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused.png").exists()
    if not torch.cuda.is_available():  # diffmoe sample and evaluate-digits check the same options before loading
        model = default_models()["digits-jitmoe"]
        sample = ["sample", "--model", model, "--num-samples", "1", "--output", str(tmp_path / "s.npz")]
        for command in (sample, ["evaluate-digits", "--model", model]):
            assert main([*command, "--expert-offload", "cpu"]) == 2
            assert "no CUDA device" in capsys.readouterr().err


def test_experts_far_larger_than_the_memory_limit_sample_under_it(tmp_path):
    """Measured in a fresh process (`expert_offload_memory_worker`): 96 MiB of experts in the disk tier, built bank
    after bank and sampled, with the peak anonymous memory (RssAnon, sampled from /proc) above the process's start
    of each stretch. glibc's allocator is told to return large blocks to the system at once
    (MALLOC_MMAP_THRESHOLD_), so the numbers count what the process holds, not what the allocator caches."""
    record = run_memory_worker("tests.expert_offload_memory_worker", tmp_path)
    assert record["finite"] and record["expert_bytes"] >= 6 * SAMPLING_LIMIT
    assert record["sampling_anon_increase"] <= SAMPLING_LIMIT, record
    assert record["building_anon_increase"] <= record["bank_bytes"] + SAMPLING_LIMIT, record
