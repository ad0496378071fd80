"""`Formulation.sampling_plan`: the upstream timestep grids and model times of every formulation and compatible
scheduler, computed here from the upstream definitions; the pipeline's scheduler changed only by its own
`set_timesteps`; one plan per pipeline call; and the models' documented `routing_depends_on_batch`."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

from diffmoe_hf import DynamicTokenMoETransformer2DModel
from diffmoe_hf.families import FAMILIES
from diffmoe_hf.formulations import FORMULATIONS, Formulation, get_formulation
from diffmoe_hf.models.modeling_common import DiTForwardMixin

from .pipeline_families import family_pipeline


STEPS = (1, 2, 5, 8, 50)
CASES = [(name, cls) for name, f in FORMULATIONS.items() for cls in f.compatible_schedulers]
# a float32 time t in [0, 1] that went through `sigma * 1000 / 1000` (three float32 roundings)
FLOW_TIME_ATOL = 3 * torch.finfo(torch.float32).eps


def scheduler_for(name, scheduler_cls):
    return scheduler_cls.from_config(get_formulation(name).default_scheduler().config)


def state(value):
    """A comparable snapshot of a scheduler (or any value): tensors by dtype, shape and values, objects by vars."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.tolist())
    if isinstance(value, dict):
        return {key: state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [state(item) for item in value]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return (type(value).__name__, state(vars(value)))
    return value


def ddim_upstream_indices(steps):
    """Upstream `"ddimN"`: `range(0, 1000, stride)` for the first stride giving N indices, in sampling order."""
    stride = next(s for s in range(1, 1000) if len(range(0, 1000, s)) == steps)
    return list(range(0, 1000, stride))[::-1]


def ancestral_upstream_indices(steps):
    """Upstream `"N"` respacing: `round(j * 999 / (N - 1))` (accumulated float stride, half to even), descending."""
    stride = 1.0 if steps == 1 else 999 / (steps - 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept[::-1]


def expected_plan(name, scheduler_cls, steps):
    """(timesteps or None when the scheduler's own grid, model times) that the upstream sampler defines."""
    grid = [i / steps for i in range(steps)]
    if name in ("rf-noise-at-0", "jit-xpred") and scheduler_cls is FlowMatchEulerDiscreteScheduler:
        timesteps = torch.tensor([1.0 - t for t in grid], dtype=torch.float32) * 1000  # sigmas 1 - i/N
        if name == "jit-xpred":  # JiT reads t_i from its float32 grid
            return timesteps, torch.linspace(0, 1, steps + 1)[:steps]
        return timesteps, 1 - timesteps / 1000
    if name == "jit-xpred":  # Heun: t_0, then t_1, t_1, t_2, t_2, ... (predictor and corrector of each step)
        return None, torch.linspace(0, 1, steps + 1)[[(k + 1) // 2 for k in range(2 * steps - 1)]]
    if name == "rf-noise-at-1":
        timesteps = torch.tensor([(steps - i) / steps for i in range(steps)], dtype=torch.float32) * 1000
        return timesteps, timesteps / 1000
    if scheduler_cls is DDPMScheduler:
        indices = torch.tensor(ancestral_upstream_indices(steps))
        return indices, indices.float()
    if scheduler_cls is DDIMScheduler:  # the respaced chain's own steps N-1..0, the model gets the DDPM index
        return torch.arange(steps - 1, -1, -1), torch.tensor(ddim_upstream_indices(steps)).float()
    own = DPMSolverMultistepScheduler.from_config(scheduler_for(name, scheduler_cls).config, variance_type=None)
    own.set_timesteps(steps)
    return own.timesteps, own.timesteps.float()


@pytest.mark.parametrize("name, scheduler_cls", CASES)
def test_plan_has_the_upstream_timesteps_and_model_times(name, scheduler_cls):
    for steps in STEPS:
        if scheduler_cls is DDIMScheduler and steps == 1:
            continue  # no "ddim1" respacing exists (an error, tested below)
        plan = get_formulation(name).sampling_plan(scheduler_for(name, scheduler_cls), steps, "cpu")
        timesteps, model_times = expected_plan(name, scheduler_cls, steps)
        if timesteps is not None:
            assert torch.equal(plan.timesteps, timesteps.to(plan.timesteps.dtype)), (name, steps)
        assert plan.model_times.dtype == torch.float32
        assert torch.equal(plan.model_times, model_times), (name, steps)
        assert plan.timesteps is plan.scheduler.timesteps and len(plan) == len(plan.model_times) == len(plan.guided)
        assert plan.guided == (True,) * len(plan)  # no interval: guidance at every step
        if name.startswith("rf") or name == "jit-xpred":  # the flow grid t_i = i/N (noise at 0) or its reverse
            flow = 1 - plan.timesteps / 1000 if name != "rf-noise-at-1" else plan.timesteps / 1000
            torch.testing.assert_close(plan.model_times, flow, rtol=0, atol=FLOW_TIME_ATOL)


def test_plan_without_an_upstream_ddim_respacing_is_an_error():
    with pytest.raises(ValueError, match="no stride"):
        get_formulation("ddpm-learned-sigma").sampling_plan(DDIMScheduler(), 999, "cpu")


@pytest.mark.parametrize("name, scheduler_cls", CASES)
def test_the_schedulers_own_set_timesteps_is_the_only_change(name, scheduler_cls):
    scheduler = scheduler_for(name, scheduler_cls)
    before = copy.deepcopy(scheduler)
    plan = get_formulation(name).sampling_plan(scheduler, 6, "cpu")
    if plan.scheduler is scheduler:  # it steps itself: exactly as if set to the upstream grid by its own method
        if scheduler_cls is FlowMatchEulerDiscreteScheduler:
            sigmas = [1 - i / 6 for i in range(6)] if name != "rf-noise-at-1" else [(6 - i) / 6 for i in range(6)]
            before.set_timesteps(sigmas=sigmas)
        else:
            before.set_timesteps(timesteps=ancestral_upstream_indices(6))
    assert state(scheduler) == state(before)
    derived = scheduler_cls in (DDIMScheduler, FlowMatchHeunDiscreteScheduler, DPMSolverMultistepScheduler)
    assert (plan.scheduler is not scheduler) == derived


def test_guidance_interval_is_evaluated_on_the_model_times():
    plan = get_formulation("rf-noise-at-0").sampling_plan(FlowMatchEulerDiscreteScheduler(), 4, "cpu", (0.2, 0.6))
    # model times 0, 0.25, 0.5, 0.75: only the middle two lie strictly inside (0.2, 0.6)
    assert plan.guided == (False, True, True, False)
    plan = get_formulation("rf-noise-at-0").sampling_plan(FlowMatchEulerDiscreteScheduler(), 4, "cpu", (0, 0.3))
    assert plan.guided == (True, True, False, False)  # low == 0 includes t = 0


def test_a_pipeline_call_plans_once_and_leaves_a_derived_scheduler_untouched(monkeypatch):
    pipe = family_pipeline("jit")  # Heun: the plan steps a derived copy
    before = state(pipe.scheduler)
    plans = []
    original = Formulation.sampling_plan

    def recording_plan(self, *args, **kwargs):
        plans.append(original(self, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(Formulation, "sampling_plan", recording_plan)
    seen = []
    pipe(
        class_labels=[1],
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kwargs: seen.append(t) or kwargs,
    )
    assert len(plans) == 1 and state(pipe.scheduler) == before
    assert torch.equal(torch.stack(seen), plans[0].timesteps) and pipe.num_timesteps == len(plans[0]) == 5


@pytest.mark.parametrize(("family", "steps", "evaluations", "updates"), [("jit", 3, 5, 3), ("dsmoe", 3, 3, 3)])
def test_progress_and_steps_count_sampling_steps_not_evaluations(family, steps, evaluations, updates, monkeypatch):
    """Heun (JiT) evaluates twice per step but the last: its bar and plan count the steps asked for, not the calls."""
    pipe = family_pipeline(family)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.updates = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self):
            self.updates += 1

    monkeypatch.setattr(pipe, "progress_bar", lambda total: Bar(total))
    seen = []
    pipe(
        class_labels=[1],
        num_inference_steps=steps,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kwargs: seen.append(p.sampling_plan.step_of(i)) or kwargs,
    )
    plan = pipe.sampling_plan
    assert pipe.num_timesteps == len(plan) == evaluations and plan.num_steps == steps
    assert [(bar.total, bar.updates) for bar in bars] == [(steps, updates)]
    per_step = plan.evaluations_per_step
    assert seen == [i // per_step for i in range(evaluations)] and seen[-1] == steps - 1
    assert [plan.completes_step(i) for i in range(evaluations)].count(True) == steps


@pytest.mark.parametrize("model_class", [family.model_class for family in FAMILIES.values()], ids=lambda c: c.__name__)
def test_routing_depends_on_batch_is_the_shared_base_default_except_for_dynamic_token_selection(model_class):
    assert issubclass(model_class, DiTForwardMixin) and DiTForwardMixin.routing_depends_on_batch is False
    batch_level = model_class is DynamicTokenMoETransformer2DModel
    assert model_class.routing_depends_on_batch is batch_level
    assert ("routing_depends_on_batch" in vars(model_class)) is batch_level  # set once, on the base, otherwise
