"""The registry of expert backends: the built-in names, unknown names refused where they are set, and a backend
registered from outside the package (here, in the test only) run by every family's expert banks through the same
interface, under the same rule that sends a backend reading weights to `"modules"` where that would not be valid."""

import pytest
import torch
import torch.nn.functional as F

from diffmoe_hf.models.moe import (
    EXPERT_BACKENDS,
    expert_backend_names,
    expert_parameters,
    register_expert_backend,
    set_expert_backend,
)

from .helpers import expert_banks, model_float32_tolerance, model_inputs, registered_families, tiny_model


BUILT_IN = ("modules", "segment_linear", "grouped_mm", "expert_parallel")


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def test_the_registry_lists_the_built_in_backends():
    assert tuple(EXPERT_BACKENDS) == BUILT_IN
    assert expert_backend_names() == ("auto", *BUILT_IN)
    assert {name: backend.reads_weights for name, backend in EXPERT_BACKENDS.items()} == {
        "modules": False,
        "segment_linear": True,
        "grouped_mm": True,
        "expert_parallel": False,
    }


def test_unknown_backend_names_are_refused_where_they_are_set():
    model = tiny_model("dsmoe")
    with pytest.raises(ValueError, match="Unknown expert backend 'triton'; choose one of auto, modules, segment_"):
        model.set_expert_backend("triton")
    with pytest.raises(ValueError, match="Unknown expert backend 'triton'"):
        expert_banks(model)[0].expert_backend = "triton"  # set on a bank directly: refused there too
    with pytest.raises(ValueError, match="Unknown expert backend 'triton'"):
        set_expert_backend(torch.nn.Linear(2, 2), "triton")  # even where there is no bank to set it on
    assert {bank.expert_backend for bank in expert_banks(model)} == {"auto"}


@pytest.mark.parametrize("name", ["auto", "modules"])
def test_a_taken_name_cannot_be_registered_again(name):
    with pytest.raises(ValueError, match=f"{name!r} is taken"):
        register_expert_backend(name, reads_weights=False)


@pytest.fixture
def float64_reference():
    """
    Registers `"float64_reference"` for one test: a backend that computes every expert projection in float64, one
    `F.linear` per (expert, projection), from the experts' own weights (so it reads weights), and records the banks
    it ran. Returns that record.
    """
    ran = []

    @register_expert_backend("float64_reference", reads_weights=True)
    def run_float64_reference(bank, rows, segments, **expert_inputs):
        ran.append(bank)

        def project(hidden, *paths):
            weights, biases = expert_parameters(bank, "weight", paths), expert_parameters(bank, "bias", paths)

            def linear(chunk, index):  # projection `index` of the expert-major list, in float64
                return F.linear(chunk, weights[index].double(), biases[index].double() if biases else None)

            chunks = hidden.double().split(segments.sizes())
            per_expert = [
                torch.cat([linear(chunk, e * len(paths) + p) for p in range(len(paths))], dim=-1)
                for e, chunk in enumerate(chunks)
            ]
            return torch.cat(per_expert).to(hidden.dtype)

        return bank.forward_projected(rows, segments, project, **expert_inputs)

    yield ran
    del EXPERT_BACKENDS["float64_reference"]


@pytest.mark.parametrize("family", registered_families())
def test_a_registered_backend_runs_every_bank_kind_and_gives_the_modules_result(family, float64_reference):
    model = tiny_model(family)  # the first tiny variant of every family has MoE layers
    inputs = model_inputs(model)
    banks = expert_banks(model)
    assert banks
    model.set_expert_backend("modules")
    want = run(model, inputs)
    model.set_expert_backend("float64_reference")
    got = run(model, inputs)
    assert float64_reference == banks  # each bank once, in order
    # the float64 projections are exact to float32's resolution, the modules' float32 ones within the model's bound
    torch.testing.assert_close(got, want, atol=model_float32_tolerance(model, want), rtol=0)

    float64_reference.clear()
    model.set_expert_backend("modules")
    banks[0].expert_backend = "float64_reference"  # selected on one bank directly, by name
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:  # a global module hook must run: a backend that reads weights steps aside to "modules" by the shared rule
        assert banks[0].backend(torch.zeros(1, 1)) == "modules"
        torch.testing.assert_close(run(model, inputs), want, atol=0, rtol=0)
    finally:
        handle.remove()
    assert float64_reference == []
    run(model, inputs)
    assert float64_reference == [banks[0]]
