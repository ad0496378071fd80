"""A pipeline call with a wrong argument fails before any transformer call, with an error that names the argument."""

import re

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffmoe_hf.families import FAMILIES
from diffmoe_hf.formulations import FORMULATIONS, get_formulation, scheduler_problem

from .pipeline_families import CallRecorder, family_pipeline


def recorded_pipeline(family: str = "dsmoe"):
    pipe = family_pipeline(family)
    pipe.transformer = CallRecorder(pipe.transformer)
    return pipe


def call(pipe, **kwargs):
    return pipe(**{"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt", **kwargs})


META_LATENTS = torch.empty(2, 4, 8, 8, device="meta")

BAD_ARGUMENTS = [
    ("generator-int", dict(generator=3), TypeError, "generator must be None, a torch.Generator"),
    ("generator-list-of-seeds", dict(generator=[0, 1]), TypeError, "got 0 of type int"),
    (
        "callback-not-callable",
        dict(callback_on_step_end="print"),
        TypeError,
        "callback_on_step_end must be a function",
    ),
    ("attention-unknown-key", dict(attention_kwargs={"scal": 1.0}), ValueError, "unknown keys 'scal'"),
    ("attention-scale-string", dict(attention_kwargs={"scale": "0.5"}), TypeError, "attention_kwargs['scale']"),
    ("attention-scale-nan", dict(attention_kwargs={"scale": float("nan")}), ValueError, "attention_kwargs['scale']"),
    ("attention-not-a-dict", dict(attention_kwargs=[("scale", 1.0)]), TypeError, "attention_kwargs must be None"),
    ("latents-meta", dict(latents=META_LATENTS), ValueError, "latents is a tensor on the meta device"),
    ("latents-huge", dict(latents=torch.full((2, 4, 8, 8), 1e30)), ValueError, "values beyond +-10000"),
    ("labels-meta", dict(class_labels=torch.tensor([1, 2], device="meta")), ValueError, "class_labels is a tensor"),
    ("guidance-channels-0", dict(guidance_channels=0), ValueError, "between 1 and 4, the model's latent channels"),
    ("guidance-channels-5", dict(guidance_channels=5), ValueError, "got 5"),
    ("guidance-channels-float", dict(guidance_channels=1.5), TypeError, "guidance_channels must be None or a whole"),
]


@pytest.mark.parametrize(
    "kwargs, error, message", [case[1:] for case in BAD_ARGUMENTS], ids=[case[0] for case in BAD_ARGUMENTS]
)
def test_a_bad_argument_is_refused_before_any_step(kwargs, error, message):
    pipe = recorded_pipeline()
    with pytest.raises(error, match=re.escape(message)):
        call(pipe, **kwargs)
    assert pipe.transformer.calls == []


def test_the_lora_scale_is_accepted():
    assert call(family_pipeline("dsmoe"), attention_kwargs={"scale": 0.5}).images.shape[0] == 2


@pytest.mark.parametrize("label", [5, None, ["three", 7]])
def test_get_label_ids_takes_only_names(label):
    with pytest.raises(TypeError, match="label must be a class name or a list of class names"):
        family_pipeline("dsmoe").get_label_ids(label)


def test_a_callback_returning_none_is_named():
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict"):
        call(family_pipeline("dsmoe"), callback_on_step_end=lambda pipe, step, timestep, kwargs: None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_scheduler_the_formulation_cannot_use_is_refused_at_call_time(family):
    pipe = recorded_pipeline(family)
    formulation = pipe.transformer.config.formulation
    wrong = FlowMatchEulerDiscreteScheduler if formulation == "ddpm-learned-sigma" else DDPMScheduler
    pipe.scheduler = wrong.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=f"pipe.scheduler: {wrong.__name__} cannot sample this model"):
        call(pipe)
    assert pipe.transformer.calls == []


def test_the_scheduler_rule_accepts_exactly_the_compatible_classes():
    every_class = {cls for formulation in FORMULATIONS.values() for cls in formulation.compatible_schedulers}
    for name, formulation in FORMULATIONS.items():
        for scheduler_class in every_class:
            scheduler = scheduler_class.from_config(get_formulation(name).default_scheduler().config)
            usable = scheduler_problem(name, scheduler) is None
            assert usable == (scheduler_class in formulation.compatible_schedulers), (name, scheduler_class)


def test_a_diverging_guidance_scale_names_the_step():
    pipe = recorded_pipeline()
    with pytest.raises(ValueError, match=r"Sampling diverged at sampling step 1 of 2: .* guidance_scale=1e\+30"):
        call(pipe, guidance_scale=1e30)
    assert len(pipe.transformer.calls) == 2  # the loop ran on: the check costs no host sync per step


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("cuda",), {}, "this torch build or machine has no cuda device; available here: cpu"),
        ((torch.device("cuda", 1),), {}, "cuda:1: this torch build or machine has no cuda device"),
        (("cudax",), {}, "'cudax' is not a torch device"),
        ((), {"device": "cuda"}, "no cuda device"),
    ],
)
def test_moving_the_pipeline_to_a_device_this_machine_lacks_names_it(args, kwargs, fragment):
    pipe = family_pipeline("dsmoe")
    with pytest.raises(ValueError, match=re.escape(fragment)):
        pipe.to(*args, **kwargs)
    assert pipe.device.type == "cpu"
    pipe.to("cpu", torch.float64)  # devices this machine has, and dtypes, pass through
    assert pipe.transformer.dtype == torch.float64
