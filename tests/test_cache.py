"""diffusers' cache hooks (`transformer.enable_cache`) on all five families, through the pipeline.

For each cache: a setting that never skips gives exactly the uncached output; a setting that skips follows the cache's
own rule exactly (what a skipped call returns is rebuilt from the calls of the same cache context); the state never
leaks from one call to the next. The cache contexts separate the kinds of transformer calls (DiffMoE's separate
conditional and unconditional passes, the batched guidance pass, the conditional-only pass).
"""

import diffusers.hooks
import pytest
import torch
from packaging import version

from diffmoe_hf.families import get_family

from .helpers import registered_families
from .pipeline_families import family_pipeline


CACHE_CLASSES = ("FirstBlockCacheConfig", "TaylorSeerCacheConfig", "MagCacheConfig")
STEPS = 4


def cache_class(name: str):
    cls = getattr(diffusers.hooks, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return cls


def never_skipping(name: str):
    cls = cache_class(name)
    if name == "FirstBlockCacheConfig":
        return cls(threshold=0.0)
    if name == "TaylorSeerCacheConfig":
        return cls(cache_interval=1, disable_cache_before_step=0, taylor_factors_dtype=torch.float32)
    return cls(mag_ratios=[1.0] * 1000, num_inference_steps=1000, max_skip_steps=0, retention_ratio=0.0)


def skipping(name: str):
    cls = cache_class(name)
    if name == "FirstBlockCacheConfig":
        return cls(threshold=float("inf"))  # every call after the first of its context skips
    if name == "TaylorSeerCacheConfig":
        return cls(cache_interval=2, disable_cache_before_step=1, max_order=1, taylor_factors_dtype=torch.float32)
    return cls(mag_ratios=[1.0] * 1000, num_inference_steps=1000, threshold=1.0, max_skip_steps=2, retention_ratio=0.0)


def same_token_count_needed(name: str) -> bool:
    """Caches that need every block to see the same token count (see `DiTForwardMixin.enable_cache`)."""
    old_mag_cache = version.parse(diffusers.__version__) < version.parse("0.42.0") and name == "MagCacheConfig"
    return name == "FirstBlockCacheConfig" or old_mag_cache


def cached_pipeline(family: str, name: str):
    # a model with in-context class tokens (JiT) then prepends them before block 0 instead of block 1
    has_class_tokens = "in_context_start" in get_family(family).tiny_config()
    in_context = {"in_context_start": 0} if has_class_tokens and same_token_count_needed(name) else {}
    return family_pipeline(family, **in_context)


def run(pipe, **kwargs):
    call = {
        "class_labels": [1, 2],
        "num_inference_steps": STEPS,
        "guidance_scale": 2.0,
        "output_type": "latent",
        "generator": torch.manual_seed(0),
        **kwargs,
    }
    return pipe(**call).images


class CallLog:
    """Per transformer call: its cache context, the first block's arguments and output (what its cache hook returned),
    the last block's output, block 0's attention output, and whether the attention of block 0 / the last block really
    ran."""

    def __init__(self, pipe):
        self.calls = []
        transformer = pipe.transformer
        blocks = transformer.transformer_blocks
        original_context = transformer.cache_context

        def recording_context(name):
            self.calls.append({"context": name, "head_ran": False, "tail_ran": False})
            return original_context(name)

        def record(key):
            return lambda module, args, output: self.calls[-1].__setitem__(key, output)

        def ran(key):
            return lambda module, args, output: self.calls[-1].__setitem__(key, True)

        def remember_arguments(module, args):
            self.calls[-1].update(head_in=args[0], head_args=args)

        transformer.cache_context = recording_context
        self.handles = [
            blocks[0].register_forward_pre_hook(remember_arguments),
            blocks[0].register_forward_hook(record("head_out")),
            blocks[-1].register_forward_hook(record("tail_out")),
            blocks[0].attn.register_forward_hook(record("attn_out")),
            blocks[0].attn.to_q.register_forward_hook(ran("head_ran")),
            blocks[-1].attn.to_q.register_forward_hook(ran("tail_ran")),
        ]

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()

    def by_context(self):
        contexts = {}
        for call in self.calls:
            contexts.setdefault(call["context"], []).append(call)
        return contexts


@pytest.mark.parametrize("name", CACHE_CLASSES)
@pytest.mark.parametrize("family", registered_families())
def test_a_cache_that_never_skips_changes_nothing(family, name):
    pipe = cached_pipeline(family, name)
    reference = run(pipe)
    pipe.transformer.enable_cache(never_skipping(name))
    torch.testing.assert_close(run(pipe), reference, atol=0, rtol=0)


@pytest.mark.parametrize("family", registered_families())
def test_first_block_cache_reuses_the_residual_of_its_own_context(family):
    pipe = cached_pipeline(family, "FirstBlockCacheConfig")
    pipe.transformer.enable_cache(skipping("FirstBlockCacheConfig"))
    log = CallLog(pipe)
    run(pipe)
    log.stop()
    pipe.transformer.disable_cache()
    skipped = 0
    for calls in log.by_context().values():
        first, later = calls[0], calls[1:]
        assert first["tail_ran"]
        for call in later:
            assert not call["tail_ran"]
            with torch.no_grad():  # what the first block computed before its hook added the cached residual
                head_output = pipe.transformer.transformer_blocks[0](*call["head_args"])
            expected = (first["tail_out"] - first["head_out"]) + head_output
            torch.testing.assert_close(call["tail_out"], expected, atol=0, rtol=0)
            skipped += 1
    assert skipped > 0


@pytest.mark.parametrize("family", registered_families())
def test_mag_cache_adds_the_residual_of_the_last_computed_call_of_its_context(family):
    pipe = cached_pipeline(family, "MagCacheConfig")
    pipe.transformer.enable_cache(skipping("MagCacheConfig"))
    log = CallLog(pipe)
    run(pipe)
    skipped = 0
    for calls in log.by_context().values():
        last_computed = None
        for call in calls:
            if call["tail_ran"]:
                last_computed = call
                continue
            tokens = call["head_in"].shape[1]  # JiT prepends its class tokens after the first block
            residual = last_computed["tail_out"][:, -tokens:] - last_computed["head_in"]
            torch.testing.assert_close(call["tail_out"][:, -tokens:], call["head_in"] + residual, atol=0, rtol=0)
            skipped += 1
    assert skipped > 0


@pytest.mark.parametrize("family", registered_families())
def test_taylorseer_extrapolates_the_attention_of_its_own_context(family):
    pipe = cached_pipeline(family, "TaylorSeerCacheConfig")
    pipe.transformer.enable_cache(skipping("TaylorSeerCacheConfig"))
    log = CallLog(pipe)
    run(pipe)
    predicted = 0
    for calls in log.by_context().values():
        computed = []  # (step of the context, attention output)
        for step, call in enumerate(calls):
            if call["head_ran"]:
                computed.append((step, call["attn_out"]))
                continue
            (s1, o1), previous = computed[-1], computed[-2:-1]
            expected = o1
            if previous:
                s0, o0 = previous[0]
                expected = o1 + ((o1 - o0) / (s1 - s0)) * float(step - s1)
            torch.testing.assert_close(call["attn_out"], expected, atol=0, rtol=0)
            predicted += 1
    assert predicted > 0


@pytest.mark.parametrize("name", CACHE_CLASSES)
@pytest.mark.parametrize("family", registered_families())
def test_cached_calls_repeat_and_disabling_restores_the_uncached_output(family, name):
    pipe = cached_pipeline(family, name)
    reference = run(pipe)
    pipe.transformer.enable_cache(skipping(name))
    first, second = run(pipe), run(pipe)
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # no state left from the first call
    assert (first - reference).abs().max() > 0  # it skipped something
    pipe.transformer.disable_cache()
    torch.testing.assert_close(run(pipe), reference, atol=0, rtol=0)


@pytest.mark.parametrize(
    "family, guidance_scale, contexts",
    [
        ("dsmoe", 2.0, ["cond_uncond"] * STEPS),
        ("dsmoe", 1.0, ["cond"] * STEPS),
        ("diffmoe-dts", 2.0, ["cond", "uncond"] * STEPS),
        ("diffmoe-dts", 1.0, ["cond"] * STEPS),
        ("jit", 2.0, ["cond"] + ["cond_uncond"] * (2 * STEPS - 2)),  # Heun; no guidance at t = 0 (interval)
    ],
)
def test_cache_contexts_name_the_kind_of_call(family, guidance_scale, contexts):
    pipe = family_pipeline(family)
    log = CallLog(pipe)
    run(pipe, guidance_scale=guidance_scale)
    assert [call["context"] for call in log.calls] == contexts


@pytest.mark.parametrize("name", CACHE_CLASSES)
def test_caches_that_need_a_constant_token_count_are_refused_where_blocks_change_it(name):
    pipe = family_pipeline("jit")  # class tokens prepended before block 1
    if not same_token_count_needed(name):
        pipe.transformer.enable_cache(skipping(name))
        assert torch.isfinite(run(pipe)).all()
        return
    with pytest.raises(ValueError, match=f"{name} .* cannot run .* Use TaylorSeerCacheConfig"):
        pipe.transformer.enable_cache(skipping(name))
    assert not pipe.transformer.is_cache_enabled
