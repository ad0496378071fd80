"""The Gradio demo (`space/`, installed as `diffmoe_hf.space`): handlers called directly, the app served on 127.0.0.1
and driven with gradio_client, and a real browser (Debian chromium through Playwright, marker `browser`)."""

import json
import os
import shutil
import subprocess
import sys

import gradio as gr
import numpy as np
import pytest
import torch
from huggingface_hub import SpaceCardData
from huggingface_hub.repocard import RepoCard
from PIL import Image

from diffmoe_hf import (
    ClassConditionalMoEPipeline,
    default_models,
    get_formulation,
)
from diffmoe_hf.conversion import convert_checkpoint
from diffmoe_hf.families import get_family
from diffmoe_hf.formulations import FORMULATIONS
from diffmoe_hf.space import app as space_app
from diffmoe_hf.space.routing_view import RoutingView, render_expert_map, render_load

from .conftest import REPO_ROOT, parity_root
from .helpers import tiny_dsmoe, tiny_model, tiny_vae


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
JIT_CASE = "jitmoe-p4-e4"


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A converted JiTMoE fixture (pixel space, 16 px, 4x4 patches, in-context tokens), and tiny latent models with a
    VAE: DSMoE (rectified flow), Diff-MoE by Cheng et al. (DDPM, learned sigma) and DiffMoE by Shi et al. (expert
    choice); all with digit names."""
    root = tmp_path_factory.mktemp("space-models")
    names = root / "digits.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(DIGITS)}))
    case = os.path.join(parity_root(), JIT_CASE)
    folders = {"jitmoe": str(root / "jitmoe")}
    convert_checkpoint(
        "jit",
        os.path.join(case, "checkpoint.pt"),
        folders["jitmoe"],
        config_path=os.path.join(case, "config.yaml"),
        id2label_path=str(names),
    )
    id2label = {str(i): name for i, name in enumerate(DIGITS)}
    torch.manual_seed(0)
    dynamic = tiny_model("dynamic-token-moe", "no-shared-expert", out_channels=4, moe_layers=[0, 1])
    spatial_temporal = tiny_model("spatial-temporal-moe")
    for name, transformer in (("dsmoe", tiny_dsmoe()), ("dynamic", dynamic), ("diff-moe", spatial_temporal)):
        scheduler = get_formulation(transformer.config.formulation).default_scheduler()
        pipe = ClassConditionalMoEPipeline(
            transformer=transformer, scheduler=scheduler, vae=tiny_vae(), id2label=id2label
        )
        folders[name] = str(root / name)
        pipe.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def demo_app(model_folders):
    return space_app.DemoApp(space_app.load_models(model_folders, device="cpu"))


def _generate(
    demo_app, model="jitmoe", classes=(3,), guidance=2.9, steps=3, scheduler=None, seed=7, randomize=False, per_class=1
):
    scheduler = scheduler or next(iter(demo_app.models[model].schedulers))
    return demo_app.generate(model, list(classes), guidance, steps, scheduler, seed, randomize, per_class)


# ---- configuration and loading ------------------------------------------------------------------------------------


def test_models_come_from_the_command_line_then_the_environment_then_the_package(monkeypatch, model_folders):
    monkeypatch.setattr(space_app, "default_models", lambda: {"embedded": "/pkg/embedded"})
    monkeypatch.setenv(space_app.MODELS_ENV, f"{model_folders['dsmoe']}, org/repo")
    assert space_app.configured_sources([model_folders["jitmoe"]]) == {"jitmoe": model_folders["jitmoe"]}
    assert space_app.configured_sources() == {"dsmoe": model_folders["dsmoe"], "org/repo": "org/repo"}
    monkeypatch.delenv(space_app.MODELS_ENV)
    assert space_app.configured_sources() == {"embedded": "/pkg/embedded"}
    twice = space_app.configured_sources([model_folders["jitmoe"], model_folders["jitmoe"] + os.sep])
    assert list(twice) == ["jitmoe", "jitmoe (2)"]


def test_default_models_lists_the_embedded_model_folders(monkeypatch, tmp_path, model_folders):
    from diffmoe_hf import embedded_models

    monkeypatch.setattr(embedded_models, "embedded_models_root", lambda: str(tmp_path / "models"))
    assert embedded_models.default_models() == {}
    shutil.copytree(model_folders["jitmoe"], tmp_path / "models" / "digits-jitmoe")
    (tmp_path / "models" / "unfinished").mkdir()
    expected = {"digits-jitmoe": str(tmp_path / "models" / "digits-jitmoe")}
    assert embedded_models.default_models() == expected
    monkeypatch.delenv(space_app.MODELS_ENV, raising=False)
    assert space_app.configured_sources() == expected  # the app serves them when nothing else is configured


def test_without_any_model_the_app_says_to_pass_model(monkeypatch):
    monkeypatch.setattr(space_app, "default_models", lambda: {})
    monkeypatch.delenv(space_app.MODELS_ENV, raising=False)
    with pytest.raises(ValueError, match="--model"):
        space_app.configured_sources()
    with pytest.raises(SystemExit, match="--model"):
        space_app.main([])


def test_only_converted_folders_with_safetensors_or_repo_ids_are_loaded(tmp_path, model_folders):
    pickled = tmp_path / "pickled"
    shutil.copytree(model_folders["jitmoe"], pickled)
    weights = pickled / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="safetensors"):
        space_app.load_pipeline(str(pickled))
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        space_app.load_pipeline(str(tmp_path / "missing" / "folder"))


def test_every_model_is_shown_with_its_family(demo_app):
    assert demo_app.models["diff-moe"].family == get_family("spatial-temporal-moe").label
    assert demo_app.models["dynamic"].family == get_family("dynamic-token-moe").label


def test_scheduler_choices_follow_the_formulation(demo_app):
    for formulation in FORMULATIONS.values():
        assert isinstance(formulation.default_scheduler(), formulation.compatible_schedulers[0])
    assert list(demo_app.models["jitmoe"].schedulers) == [
        "FlowMatchHeunDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ]
    assert list(demo_app.models["dsmoe"].schedulers) == ["FlowMatchEulerDiscreteScheduler"]


def test_space_readme_front_matter_and_requirements():
    space_dir = os.path.join(REPO_ROOT, "space")
    card = RepoCard.load(os.path.join(space_dir, "README.md"))
    data = SpaceCardData(**card.data.to_dict())
    assert data.sdk == "gradio" and data.sdk_version == gr.__version__
    assert os.path.isfile(os.path.join(space_dir, data.app_file))
    assert data.colorFrom in ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
    assert len(data.short_description) <= 60
    with open(os.path.join(space_dir, "requirements.txt"), encoding="utf-8") as f:
        requirements = f.read()
    assert "diffmoe-hf" in requirements and f"gradio=={gr.__version__}" in requirements


# ---- handlers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["FlowMatchHeunDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_generate_returns_captioned_images_and_the_routing_view(demo_app, scheduler):
    gallery, seed, state, layer, step, picture, load_chart, table, caption = _generate(
        demo_app, classes=(3, 5), scheduler=scheduler, per_class=2, steps=3
    )
    assert seed == 7 and len(gallery) == 4
    captions = [caption for _, caption in gallery]
    assert captions == ["three - seed 7", "three - seed 8", "five - seed 9", "five - seed 10"]
    assert all(isinstance(image, Image.Image) and image.size == (16, 16) for image, _ in gallery)
    view = state["view"]
    assert view.layers == ["transformer_blocks.1.ff", "transformer_blocks.3.ff"] and view.num_experts == [4, 4]
    evaluations = 5 if scheduler.startswith("FlowMatchHeun") else 3  # Heun: 2 per interval, Euler on the last
    assert view.num_evaluations == evaluations and step["maximum"] == evaluations and step["value"] == evaluations
    # labelled by sampling step (3 asked for), not by evaluation
    per_step = ["evaluation 1 of 2", "evaluation 2 of 2"] if evaluations == 5 else [None]
    expected = [f"step {s} of 3" + (f", {e}" if e else "") for s in (1, 2) for e in per_step] + ["step 3 of 3"]
    assert [label.split(" (")[0] for label in view.step_labels] == expected
    assert layer["value"] == view.layers[0] and [v for _, v in layer["choices"]] == view.layers
    for maps, loads in zip(view.expert_maps, view.loads):
        assert all(m.shape == (4, 4) and m.min() >= 0 and m.max() < 4 for m in maps)
        assert loads.shape == (2, 4) and (loads.sum(1) % 2 == 0).all()  # top-2: two assignments per token
    assert isinstance(picture, Image.Image) and isinstance(load_chart, Image.Image)
    assert table["headers"] == ["layer", "E0 %", "E1 %", "E2 %", "E3 %"] and len(table["data"]) == 2
    assert "block 1" in caption


def test_routing_map_is_the_first_images_top_expert_per_patch(demo_app):
    """Two Euler steps of 2 images; in block 3 each sample has 4 in-context tokens before its 16 patches."""
    transformer = demo_app.models["jitmoe"].pipe.transformer
    seen = []
    handle = transformer.transformer_blocks[3].ff.router.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    try:
        _, _, state, *_ = _generate(demo_app, classes=(1, 2), steps=2, scheduler="FlowMatchEulerDiscreteScheduler")
    finally:
        handle.remove()
    view = state["view"]
    first_call = seen[0].reshape(2, 20, 2)  # step 1 (t = 0) is outside the guidance interval: one pass
    np.testing.assert_array_equal(view.expert_maps[0][1], first_call[0, 4:, 0].reshape(4, 4).numpy())
    second_call = seen[1].reshape(4, 20, 2)  # step 2 (t = 0.5) is guided: cond and uncond batched, prefix first
    np.testing.assert_array_equal(view.expert_maps[1][1], second_call[0, 4:, 0].reshape(4, 4).numpy())
    assert view.loads[1][1].tolist() == torch.bincount(seen[1].reshape(-1), minlength=4).tolist()


def test_same_seed_same_images_and_randomize_draws_a_seed(demo_app):
    first = _generate(demo_app, seed=11)[0][0][0]
    again = _generate(demo_app, seed=11)[0][0][0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    _, seed, *_ = _generate(demo_app, seed=11, randomize=True)
    assert 0 <= seed <= space_app.MAX_SEED


def test_latent_and_expert_choice_models(demo_app):
    gallery, _, state, *_, picture, _, _, _ = _generate(demo_app, model="dsmoe", guidance=1.5, steps=2)
    assert gallery[0][0].size == (8, 8) and state["view"].expert_maps[0][0].shape == (4, 4)
    layer = demo_app.models["dynamic"].pipe.transformer.transformer_blocks[1].ff
    selections = []
    handle = layer.router.register_forward_hook(lambda module, i, selection: selections.append(selection))
    try:
        gallery, _, state, *_ = _generate(demo_app, model="dynamic", guidance=1.5, steps=2)
    finally:
        handle.remove()
    view = state["view"]
    assert view.layers == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"] and view.expert_choice == [True, True]
    assert view.loads[0].shape == (2, 4)
    # DiffMoE runs cond and uncond as separate calls; the map is the first call's first image, 16 patches
    first = selections[0]
    for patch, expert in enumerate(view.expert_maps[0][1].reshape(-1)):
        took = first.expert_index[first.token_index == patch]
        if expert == -1:
            assert len(took) == 0
        else:
            weights = first.weights[first.token_index == patch]
            assert expert == int(took[weights.argmax()])
    assert (
        view.loads[0][1].tolist()
        == torch.bincount(torch.cat([s.expert_index for s in selections[:2]]), minlength=4).tolist()
    )
    picture, chart, _, caption = demo_app.show_routing(state, view.layers[1], 1)
    assert isinstance(picture, Image.Image) and isinstance(chart, Image.Image) and "block 1, step 1" in caption
    assert "experts choose tokens" in caption


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_ddpm_model_runs_every_offered_scheduler(demo_app, scheduler):
    assert list(demo_app.models["diff-moe"].schedulers) == [
        "DDPMScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
    ]
    gallery, _, state, *_ = _generate(demo_app, model="diff-moe", guidance=1.5, steps=3, scheduler=scheduler)
    image = np.asarray(gallery[0][0])
    assert image.shape == (8, 8, 3) and state["view"].num_evaluations == 3
    assert len(state["view"].layers) == 2 and state["view"].expert_maps[2][0].shape == (4, 4)


def test_show_routing_picks_layer_and_step(demo_app):
    _, _, state, *_ = _generate(demo_app, steps=2, scheduler="FlowMatchEulerDiscreteScheduler")
    picture, _, _, caption = demo_app.show_routing(state, "transformer_blocks.3.ff", 1)
    assert "block 3, step 1 of 2 (timestep 1000)" in caption and isinstance(picture, Image.Image)
    assert demo_app.show_routing(state, "not a layer", 99)[3].startswith("**block 1, step 2")
    assert demo_app.show_routing(None, None, None)[0] is None
    dense = RoutingView([], [], [], ["step 1"], [[]], [np.zeros((0, 0), dtype=np.int64)])
    assert demo_app.show_routing({"view": dense, "image": None}, None, 1)[3].startswith("This model has no MoE layer")


def test_select_model_resets_classes_schedulers_and_guidance(demo_app):
    classes, scheduler, guidance = demo_app.select_model("dsmoe")
    assert classes["choices"][3] == ("3: three", "3") and classes["value"] == ["0"]
    assert scheduler["choices"] == ["FlowMatchEulerDiscreteScheduler"]
    assert guidance["value"] == get_formulation("rf-noise-at-0").default_guidance_scale


def test_guidance_control_starts_at_the_folders_own_default():
    """The shipped digits models set `default_guidance_scale` in `model_index.json` (the scale their model cards were
    measured with), which the app offers instead of the formulation's ImageNet default (2.9 for JiT)."""
    shipped = {name: default_models()[name] for name in ("digits-jitmoe", "digits-dsmoe")}
    app = space_app.DemoApp(space_app.load_models(shipped, device="cpu"))
    for name, model in app.models.items():
        assert app.select_model(name)[2]["value"] == model.pipe.config.default_guidance_scale
    assert app.select_model("digits-jitmoe")[2]["value"] == 1.5 != get_formulation("jit-xpred").default_guidance_scale


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(classes=()), "Pick at least one class"),
        (dict(classes=(10,)), "classes 0 to 9"),
        (dict(classes=("../../etc/passwd",)), "Unknown class"),
        (dict(steps=101), "between 1 and 100"),
        (dict(steps=2.5), "whole number"),
        (dict(steps="many"), "Steps must be a whole number"),
        (dict(guidance=float("nan")), "Guidance scale"),
        (dict(guidance=-1), "Guidance scale"),
        (dict(scheduler="DDPMScheduler"), "not available for this model"),
        (dict(seed=-3), "Seed"),
        (dict(classes=(1, 2, 3), per_class=3), "at most 8"),
        (dict(model="/tmp/some/folder", scheduler="FlowMatchEulerDiscreteScheduler"), "Unknown model"),
    ],
)
def test_bad_inputs_get_clear_messages(demo_app, overrides, message):
    with pytest.raises(gr.Error, match=message):
        _generate(demo_app, **overrides)


def test_renderers_handle_unrouted_patches_and_many_experts():
    expert_map = np.array([[0, -1], [25, 3]])
    assert render_expert_map(expert_map, 30).size[0] == 320
    assert render_expert_map(None, 4, Image.new("RGB", (8, 8))).size[0] > 320
    assert render_load(np.array([[3, 1, 0, 0], [0, 0, 0, 0]]), ["a", "b"], [4, 4]).size[1] > 100


# ---- served app ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(demo_app):
    demo = demo_app.build()
    assert demo._queue.max_size == space_app.QUEUE_SIZE and demo._queue.default_concurrency_limit == 1
    space_app.serve(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_app_served_on_localhost_and_driven_with_gradio_client(served, demo_app):
    from gradio_client import Client

    client = Client(served, verbose=False)
    result = client.predict(
        "jitmoe", [2, 7], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1, api_name="/generate"
    )
    gallery, seed, _, _, picture, chart, _, caption = result
    assert seed == 5 and [item["caption"] for item in gallery] == ["two - seed 5", "seven - seed 6"]
    assert all(os.path.isfile(item["image"]) for item in gallery)
    assert os.path.isfile(picture) and os.path.isfile(chart) and "block 1" in caption
    direct = _generate(demo_app, classes=(2, 7), steps=2, scheduler="FlowMatchEulerDiscreteScheduler", seed=5)
    served_image = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    np.testing.assert_array_equal(served_image, np.asarray(direct[0][0][0]))  # lossless: what the model made
    with pytest.raises(Exception, match="at most 8"):
        client.predict(
            "jitmoe", [1, 2, 3], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 3, api_name="/generate"
        )


def test_the_documented_class_ids_are_what_the_server_takes(served):
    from gradio_client import Client

    client = Client(served, verbose=False)
    parameters = {
        p["parameter_name"]: p
        for p in client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    }
    documented = parameters["class_ids"]["type"]["items"]
    assert documented == {"type": "string", "enum": [str(i) for i in range(10)]}
    gallery = client.predict(
        "jitmoe", documented["enum"][2:4], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1, api_name="/generate"
    )[0]
    assert [item["caption"] for item in gallery] == ["two - seed 5", "three - seed 6"]
    one_step = client.predict(
        "jitmoe", ["1"], 2.9, 1, "FlowMatchEulerDiscreteScheduler", 5, False, 1, api_name="/generate"
    )
    assert one_step[3]["value"] == 1  # the routing view's step picker of a one-step sample


ONE_MEGABYTE = "x" * 1_000_000
# case id, the request's arguments (model, classes, guidance, steps, scheduler, seed, randomize, per class), message
SERVED_BAD_VALUES = [
    ("class-name", ["jitmoe", ["three"], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1], "Unknown class"),
    ("class-99", ["jitmoe", [99], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1], "classes 0 to 9"),
    ("guidance-text", ["jitmoe", [3], "abc", 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1], "Guidance scale"),
    ("steps-text", ["jitmoe", [3], 2.9, "many", "FlowMatchEulerDiscreteScheduler", 5, False, 1], "Steps must be"),
    ("seed-list", ["jitmoe", [3], 2.9, 2, "FlowMatchEulerDiscreteScheduler", [5], False, 1], "Seed must be"),
    ("randomize-text", ["jitmoe", [3], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, "no", 1], "true or false"),
    (
        "class-1mb",
        ["jitmoe", [ONE_MEGABYTE], 2.9, 2, "FlowMatchEulerDiscreteScheduler", 5, False, 1],
        "1000002 characters",
    ),
    ("scheduler-1mb", ["jitmoe", [3], 2.9, 2, ONE_MEGABYTE, 5, False, 1], "not available for this model"),
]


@pytest.mark.parametrize("case, arguments, message", SERVED_BAD_VALUES, ids=[c[0] for c in SERVED_BAD_VALUES])
def test_a_bad_value_gets_a_short_readable_error(served, case, arguments, message):
    from gradio_client import Client

    with pytest.raises(Exception, match=message) as refused:
        Client(served, verbose=False).predict(*arguments, api_name="/generate")
    assert len(str(refused.value)) < 300 and "upstream Gradio app" not in str(refused.value)


@pytest.mark.parametrize("route", ["/gradio_api/call/nonexistent", "/gradio_api/run/nonexistent"])
def test_an_unknown_api_route_is_a_404(served, route):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        served.rstrip("/") + route, data=b'{"data": []}', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 404


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_a_port_outside_1_to_65535_is_refused_by_the_parser(port, capsys):
    with pytest.raises(SystemExit) as stop:
        space_app.main(["--port", port])
    assert stop.value.code == 2 and "must be a TCP port between 1 and 65535" in capsys.readouterr().err


def test_app_runs_as_a_file(model_folders):
    """`python space/app.py --help` works from a checkout (absolute imports only)."""
    script = os.path.join(REPO_ROOT, "space", "app.py")
    result = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and "--model" in result.stdout


# ---- real browser -------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_picks_a_class_generates_and_shows_the_routing(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("The browser test needs Debian's chromium: apt-get install -y chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("The browser test needs Playwright for Python: pip install playwright")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(served)
            classes = page.locator("#classes input[role=combobox]")
            classes.click()
            classes.fill("thr")
            options = page.locator("ul[role=listbox] li")
            expect(options).to_have_count(1)
            expect(options).to_contain_text("3: three")
            page.keyboard.press("Enter")
            expect(page.locator("#classes .token")).to_have_text(["0: zero", "3: three"])
            steps = page.locator("#steps input[type=number]")
            steps.fill("3")
            steps.press("Enter")
            page.locator("#generate").click()
            expect(page.locator("#gallery img")).to_have_count(2, timeout=120_000)
            expect(page.locator("#routing_map img")).to_have_count(1, timeout=60_000)
            expect(page.locator("#load_plot img")).to_have_count(1, timeout=60_000)
            expect(page.locator("#routing_caption")).to_contain_text("block 1, step 3 of 3 (timestep")
            expect(page.locator("#load_table")).to_contain_text("block 3")
            expect(page.get_by_text("Error", exact=True)).to_have_count(0)
            for selector in ("#gallery img", "#routing_map img"):
                width = page.locator(selector).first.evaluate("img => img.naturalWidth")
                assert width > 0, f"{selector} did not load"
            page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
        finally:
            browser.close()
    print(f"browser screenshot: {tmp_path / 'space.png'}")
