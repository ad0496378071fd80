"""ClassConditionalMoEPipeline: what users call."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.conversion import apply_hub_layout

from .helpers import assert_float32_close, model_float32_tolerance, tiny_pipeline
from .pipeline_families import CallRecorder


def test_get_label_ids_accepts_a_string_or_a_list_and_synonyms():
    pipe = tiny_pipeline()
    assert pipe.get_label_ids("goldfish") == [1]
    assert pipe.get_label_ids(["white shark", "tench", "Tinca tinca"]) == [2, 0, 0]


def test_unknown_class_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown class name 'goldfsh'.*'goldfish'"):
        tiny_pipeline().get_label_ids("goldfsh")


@pytest.mark.parametrize("labels", [[11], [-1], [3, 99], [[1], [11]]])
def test_out_of_range_class_ids_are_refused(labels):
    with pytest.raises(ValueError, match="out of range"):
        tiny_pipeline()(class_labels=labels, num_inference_steps=1)


def test_class_names_can_be_passed_directly():
    pipe = tiny_pipeline()
    by_name = pipe(
        class_labels=["goldfish", "hen"], num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent"
    ).images
    by_id = pipe(
        class_labels=[1, 8], num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent"
    ).images
    torch.testing.assert_close(by_name, by_id)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(latents=torch.randn(1, 4, 8, 8)), "latents have shape"),
        (dict(latents=torch.randn(2, 4, 16, 16)), "latents have shape"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
    ],
)
def test_bad_call_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline()(class_labels=[1, 2], **{"num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(output_type):
    images = tiny_pipeline()(class_labels=[1, 2], num_inference_steps=2, output_type=output_type).images
    if output_type == "pil":
        assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "RGB"
    elif output_type == "np":
        assert images.shape == (2, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    else:
        assert images.shape == (2, 4, 8, 8)


def test_return_dict_false_gives_a_tuple():
    output = tiny_pipeline()(class_labels=[1], num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(output, tuple) and output[0].shape == (1, 8, 8, 3)


def test_same_generator_seed_gives_the_same_images():
    pipe = tiny_pipeline()
    first = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.manual_seed(7), output_type="np")
    second = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.manual_seed(7), output_type="np")
    other = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.manual_seed(8), output_type="np")
    np.testing.assert_array_equal(first.images, second.images)
    assert np.abs(first.images - other.images).max() > 1e-3


@pytest.mark.parametrize("guidance_scale, expected_batches", [(1.0, [[1, 2]] * 2), (3.0, [[1, 2, 10, 10]] * 2)])
def test_guidance_scale_one_runs_a_single_conditional_pass(guidance_scale, expected_batches):
    pipe = tiny_pipeline()
    spy = CallRecorder(pipe.transformer)
    pipe.transformer = spy
    pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent")
    assert spy.calls == expected_batches


def test_guidance_matches_the_separate_pass_formula():
    pipe = tiny_pipeline()
    latents = torch.randn(2, 4, 8, 8, generator=torch.manual_seed(0))
    # one Euler step from noise (flow time 0) to data (1): x + v, with v = v_u + s * (v_c - v_u) on the latent channels
    one_step = pipe(
        class_labels=[1, 2], latents=latents, num_inference_steps=1, guidance_scale=2.5, output_type="latent"
    ).images
    with torch.no_grad():
        cond = pipe.transformer(latents, torch.zeros(2), torch.tensor([1, 2])).sample[:, :4]
        uncond = pipe.transformer(latents, torch.zeros(2), torch.tensor([10, 10])).sample[:, :4]
    assert not torch.allclose(cond, uncond)
    # one batch of both passes in the pipeline: summation order only, times up to 1 + 2 * 2.5 through the guidance
    tolerance = 6 * model_float32_tolerance(pipe.transformer, cond)
    assert_float32_close(one_step, latents + (uncond + 2.5 * (cond - uncond)), tolerance)


def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = tiny_pipeline()
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append(step)
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    out = pipe(
        class_labels=[1],
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    assert seen == [0, 1, 2] and torch.count_nonzero(out) == 0


def test_latent_model_without_vae_refuses_decoding_before_sampling():
    pipe = tiny_pipeline(with_vae=False)
    spy = CallRecorder(pipe.transformer)
    pipe.transformer = spy
    with pytest.raises(ValueError, match="no VAE"):
        pipe(class_labels=[1], num_inference_steps=2)
    assert spy.calls == []
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="latent").images.shape == (1, 4, 8, 8)


def test_pixel_space_model_without_vae_returns_grayscale_images():
    pipe = tiny_pipeline(with_vae=False, in_channels=1, out_channels=2)
    images = pipe(class_labels=[1, 2], num_inference_steps=2).images
    assert images[0].mode == "L" and images[0].size == (8, 8)


def test_save_and_reload_keeps_labels_and_outputs(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffmoe_hf.models.transformer_dsmoe", "DSMoETransformer2DModel"]
    assert index["id2label"]["1"] == "goldfish"
    loaded = ClassConditionalMoEPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(
        loaded(generator=torch.manual_seed(0), **kwargs).images,
        pipe(generator=torch.manual_seed(0), **kwargs).images,
        atol=0,
        rtol=0,
    )
    assert loaded.get_label_ids("goldfish") == [1]


def test_remote_code_layout_loads_with_diffusion_pipeline(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    apply_hub_layout(str(tmp_path), "remote_code")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_class_conditional_moe", "ClassConditionalMoEPipeline"]
    assert (tmp_path / "transformer" / "transformer_dsmoe.py").is_file()
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "ClassConditionalMoEPipeline"
    assert type(loaded.transformer).__name__ == "DSMoETransformer2DModel"
    assert loaded.get_label_ids("hen") == [8]
