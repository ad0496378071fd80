"""The call contract of current diffusers pipelines (as diffusers' pipeline tester checks it), for every registered family."""

import inspect
import re

import numpy as np
import pytest
import torch

from diffmoe_hf import ClassConditionalMoEPipeline, default_models

from .helpers import float32_tolerance, registered_families
from .pipeline_families import CallRecorder, family_pipeline, per_token_routing_families


def latent_call(**kwargs):
    return {"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt", **kwargs}


def test_call_signature_has_the_canonical_parameters():
    parameters = inspect.signature(ClassConditionalMoEPipeline.__call__).parameters
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert "class_labels" in parameters
    assert {
        "num_inference_steps",
        "generator",
        "latents",
        "output_type",
        "return_dict",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "guidance_scale",
        "attention_kwargs",
    } <= optional


@pytest.mark.parametrize("family", registered_families())
def test_callback_reads_the_properties_and_its_guidance_change_applies(family):
    """diffusers' `test_callback_cfg`: `pipe._guidance_scale` changed in a callback is used by the next steps."""
    pipe = family_pipeline(family)
    recorder = CallRecorder(pipe.transformer)
    pipe.transformer = recorder
    seen = []

    def guidance_off_after_first_step(pipeline, step, timestep, callback_kwargs):
        seen.append((pipeline.num_timesteps, pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
        pipeline._guidance_scale = 1.0
        return callback_kwargs

    pipe(
        **latent_call(
            num_inference_steps=3,
            guidance_scale=3.0,
            guidance_interval=(0, float("inf")),
            callback_on_step_end=guidance_off_after_first_step,
        )
    )
    steps = pipe.num_timesteps  # the scheduler's timesteps: 3, or 5 for Heun (two evaluations per step but the last)
    assert seen == [(steps, 3.0, True)] + [(steps, 1.0, False)] * (steps - 1)
    separate_passes = recorder.inner.routing_depends_on_batch  # DiffMoE
    guided = [[1, 2], [3, 3]] if separate_passes else [[1, 2, 3, 3]]
    assert recorder.calls == guided + [[1, 2]] * (steps - 1)


@pytest.mark.parametrize("family", registered_families())
def test_guidance_scale_increased_in_every_step_ends_at_its_sum(family):
    pipe = family_pipeline(family)

    def increase_guidance(pipeline, step, timestep, callback_kwargs):
        pipeline._guidance_scale += 1.0
        return callback_kwargs

    pipe(
        **latent_call(
            guidance_scale=2.0,
            callback_on_step_end=increase_guidance,
            callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        )
    )
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


@pytest.mark.parametrize("family", registered_families())
def test_a_callback_that_keeps_guidance_changes_nothing(family):
    pipe = family_pipeline(family)

    def same_guidance(pipeline, step, timestep, callback_kwargs):
        pipeline.guidance_scale = 2.5
        return callback_kwargs

    reference = pipe(**latent_call(guidance_scale=2.5, generator=torch.manual_seed(0))).images
    with_callback = pipe(
        **latent_call(guidance_scale=2.5, generator=torch.manual_seed(0), callback_on_step_end=same_guidance)
    ).images
    torch.testing.assert_close(with_callback, reference, atol=0, rtol=0)


@pytest.mark.parametrize("family", registered_families())
def test_interrupt_skips_the_remaining_steps(family):
    pipe = family_pipeline(family)
    recorder = CallRecorder(pipe.transformer)
    pipe.transformer = recorder

    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return callback_kwargs

    images = pipe(**latent_call(num_inference_steps=4, guidance_scale=1.0, callback_on_step_end=stop)).images
    assert pipe.interrupt and pipe.num_timesteps >= 4
    assert len(recorder.calls) == 1  # the callback runs after every scheduler timestep (each Heun evaluation)
    assert torch.isfinite(images).all()
    pipe.transformer = recorder.inner
    pipe(**latent_call(num_inference_steps=1, guidance_scale=1.0))
    assert not pipe.interrupt  # the next call starts afresh


@pytest.mark.parametrize("family", registered_families())
def test_nested_and_tensor_labels_are_flattened(family):
    pipe = family_pipeline(family)
    reference = pipe(**latent_call(generator=torch.manual_seed(0))).images
    for labels in ([[1], [2]], [(1,), [2]], torch.tensor([[1], [2]]), np.array([1, 2]), ["class 1", [2]]):
        images = pipe(**latent_call(class_labels=labels, generator=torch.manual_seed(0))).images
        torch.testing.assert_close(images, reference, atol=0, rtol=0)


@pytest.mark.parametrize("family", per_token_routing_families())
def test_batched_call_matches_single_calls(family):
    """diffusers' `test_inference_batch_single_identical`: batching `[[1], [1]]` with one generator per image."""
    pipe = family_pipeline(family)
    single = pipe(
        class_labels=[1], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)
    ).images
    batch = pipe(
        class_labels=[[1], [1]],
        num_inference_steps=2,
        output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    ).images
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    # per evaluation four stacked width-D matmuls per block (q/k/v, attention output, two MLP layers), two steps
    tolerance = float32_tolerance(single, reduction_size=width, depth=4 * config.num_layers * 2)
    torch.testing.assert_close(batch[:1], single, atol=tolerance, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[1.0]), "type float"),
        (dict(class_labels=[True]), "type bool"),
        (dict(class_labels=torch.tensor([1.0])), "dtype torch.float32"),
        (dict(class_labels=None), "type NoneType"),
        (dict(guidance_scale="2"), "type str"),
        (dict(num_inference_steps=2.0), "type float"),
        (dict(latents=np.zeros((2, 4, 8, 8))), "torch.Tensor"),
    ],
)
def test_wrong_types_get_a_type_error(kwargs, message):
    pipe = family_pipeline("dsmoe")
    with pytest.raises(TypeError, match=re.escape(message)):
        pipe(**latent_call(**kwargs))


@pytest.mark.parametrize("family", registered_families())
def test_more_steps_than_the_scheduler_has_fail_fast(family):
    pipe = family_pipeline(family)
    recorder = CallRecorder(pipe.transformer)
    pipe.transformer = recorder
    with pytest.raises(ValueError, match=r"num_inference_steps=1000000000 is more than .* at most .*=1000 steps"):
        pipe(**latent_call(num_inference_steps=10**9))
    assert recorder.calls == []
    assert pipe(**latent_call(num_inference_steps=1)).images.shape[0] == 2


@pytest.mark.parametrize("guidance_scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_non_finite_guidance_scale_is_refused(guidance_scale):
    with pytest.raises(ValueError, match="guidance_scale must be"):
        family_pipeline("dsmoe")(**latent_call(guidance_scale=guidance_scale))


def test_non_finite_guidance_interval_is_refused_but_an_open_end_is_allowed():
    pipe = family_pipeline("jit")
    with pytest.raises(ValueError, match="guidance_interval must be a finite number"):
        pipe(**latent_call(guidance_interval=(float("nan"), 1.0)))
    assert torch.isfinite(pipe(**latent_call(guidance_interval=(0.0, float("inf")))).images).all()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_latents_are_refused(bad_value):
    pipe = family_pipeline("dsmoe")
    latents = torch.randn(2, 4, 8, 8)
    latents[1, 2, 3, 4] = bad_value
    with pytest.raises(ValueError, match="latents contain NaN or infinite values, or values beyond"):
        pipe(**latent_call(latents=latents))


def test_non_finite_latents_from_a_callback_fail_instead_of_a_blank_image():
    pipe = family_pipeline("dsmoe")

    def poison(pipeline, step, timestep, callback_kwargs):
        return {"latents": torch.full_like(callback_kwargs["latents"], float("nan"))}

    with pytest.raises(ValueError, match="Sampling diverged at sampling step 1 of 2: the latents became NaN"):
        pipe(
            **latent_call(
                output_type="pil", callback_on_step_end=poison, callback_on_step_end_tensor_inputs=["latents"]
            )
        )


def test_a_generator_list_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="list of 3 generators but 2 class labels"):
        family_pipeline("dsmoe")(**latent_call(generator=[torch.Generator().manual_seed(i) for i in range(3)]))


def test_the_example_in_the_docstring_runs(tmp_path, monkeypatch):
    if "digits-jitmoe" not in default_models():
        pytest.skip("the shipped digits models are not installed")
    doc = ClassConditionalMoEPipeline.__call__.__doc__
    code = "\n".join(line.strip()[4:] for line in doc.splitlines() if line.strip().startswith((">>> ", "... ")))
    assert "DiffusionPipeline.from_pretrained" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("generator=", "num_inference_steps=4, generator="), "example", "exec"), {})
    assert (tmp_path / "three.png").is_file()


@pytest.mark.parametrize("family", registered_families())
def test_pt_np_and_pil_outputs_agree(family):
    pipe = family_pipeline(family)
    outputs = {
        kind: pipe(**latent_call(output_type=kind, generator=torch.manual_seed(0))).images
        for kind in ("pt", "np", "pil")
    }
    np.testing.assert_array_equal(outputs["pt"].permute(0, 2, 3, 1).numpy(), outputs["np"])
    as_bytes = (outputs["np"] * 255).round().astype("uint8")
    for image, expected in zip(outputs["pil"], as_bytes):
        np.testing.assert_array_equal(np.asarray(image).reshape(expected.shape), expected)


@pytest.mark.parametrize("family", registered_families())
def test_callback_gets_exactly_the_requested_tensors_and_may_replace_the_last_latents(family):
    """diffusers' `test_callback_inputs`."""
    pipe = family_pipeline(family)

    def zero_last_latents(pipeline, step, timestep, callback_kwargs):
        assert set(callback_kwargs) == set(pipeline._callback_tensor_inputs)
        if step == pipeline.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    images = pipe(
        **latent_call(
            output_type="latent",
            callback_on_step_end=zero_last_latents,
            callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        )
    ).images
    assert torch.count_nonzero(images) == 0
