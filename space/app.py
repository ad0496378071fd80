"""Gradio demo of diffmoe_hf: class-conditional sampling with a diffusion MoE model, and where its experts work.

Run it locally with `python space/app.py [--model FOLDER_OR_HUB_REPO ...]` (or `python -m diffmoe_hf.space.app`), or
push the `space/` folder as a Hugging Face Space. Models come from, in this order: `--model` arguments, the
`DIFFMOE_SPACE_MODELS` environment variable (comma-separated), the models embedded in the package
(`diffmoe_hf.default_models()`). Only the configured models can be chosen in the browser, and only their safetensors
weights are loaded.
"""

import argparse
import os
import random
import re
import sys
from dataclasses import dataclass

import gradio as gr
import torch

from diffmoe_hf import ClassConditionalMoEPipeline, default_models
from diffmoe_hf.families import family_of_model
from diffmoe_hf.formulations import available_schedulers
from diffmoe_hf.space.routing_view import RoutingCollector, layer_label, load_table, render_expert_map, render_load


MODELS_ENV = "DIFFMOE_SPACE_MODELS"
MAX_STEPS = 100
MAX_IMAGES = 8  # per request, over all classes
MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1
QUEUE_SIZE = 16
DEFAULT_STEPS = 20
CSS = "#gallery img, #routing_map img { image-rendering: pixelated; }"  # small samples stay sharp when enlarged
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class DemoModel:
    """A loaded pipeline and what the UI offers for it."""

    name: str
    pipe: ClassConditionalMoEPipeline
    schedulers: dict  # scheduler class name -> scheduler instance (the folder's own first)

    @property
    def family(self) -> str:
        """The label of the model's family (`diffmoe_hf.families`), e.g. `"JiT / JiTMoE (Li & He 2025; Liu et al. 2025)"`."""
        return family_of_model(self.pipe.transformer).label

    @property
    def num_classes(self) -> int:
        return self.pipe.transformer.config.num_classes

    def class_name(self, class_id: int) -> str:
        id2label = self.pipe.config.id2label or {}
        return id2label.get(str(class_id), f"class {class_id}")

    def class_choices(self) -> list[tuple[str, str]]:
        """(label, value) of every class; the values are the class ids as strings, which is what the API
        documentation (`view_api()`) shows for a dropdown (integer ids are accepted too)."""
        return [(f"{i}: {self.class_name(i)}", str(i)) for i in range(self.num_classes)]


def configured_sources(cli_models: list[str] | None = None) -> dict[str, str]:
    """
    `{display name: folder or Hub repo id}` of the models to serve: `cli_models`, else `$DIFFMOE_SPACE_MODELS`
    (comma-separated), else the package's embedded models. Raises `ValueError` when none is configured.
    """
    sources = list(cli_models or [])
    if not sources:
        sources = [s.strip() for s in os.environ.get(MODELS_ENV, "").split(",") if s.strip()]
    if not sources:
        embedded = default_models()
        if embedded:
            return embedded
        raise ValueError(
            "No model to serve: this installation embeds no default model. Pass a converted folder or Hub repo with "
            f"`python space/app.py --model PATH_OR_REPO` (repeatable) or set {MODELS_ENV}=PATH_OR_REPO[,...]."
        )
    named = {}
    for source in sources:
        base = os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source
        name, copy = base, 1
        while name in named:  # two folders with the same name
            copy += 1
            name = f"{base} ({copy})"
        named[name] = source
    return named


def load_pipeline(source: str, device: str | None = None) -> ClassConditionalMoEPipeline:
    """Loads a converted folder or Hub repo, safetensors weights only."""
    if os.path.isdir(source):
        has_weights = any(f.endswith(".safetensors") for _, _, files in os.walk(source) for f in files)
        if not os.path.isfile(os.path.join(source, "model_index.json")) or not has_weights:
            raise ValueError(
                f"{source} is not a converted model folder: it needs a model_index.json and safetensors weights "
                "(write one with `diffmoe convert`)."
            )
    elif not _REPO_ID.match(source):
        raise ValueError(f"{source!r} is neither an existing folder nor a Hub repo id (org/name).")
    pipe = ClassConditionalMoEPipeline.from_pretrained(source, use_safetensors=True)
    pipe.set_progress_bar_config(desc="sampling")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def prepare_model(name: str, pipe: ClassConditionalMoEPipeline) -> DemoModel:
    """The model with the schedulers its formulation can drive (the folder's own scheduler first)."""
    schedulers = available_schedulers(pipe.transformer.config.formulation, pipe.scheduler)
    return DemoModel(name=name, pipe=pipe, schedulers=schedulers)


def load_models(sources: dict[str, str], device: str | None = None) -> dict[str, DemoModel]:
    """Loads every configured model once."""
    return {name: prepare_model(name, load_pipeline(source, device)) for name, source in sources.items()}


def _shown(value, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: a request's value is never echoed back or logged in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _whole_number(value, label: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a `gr.Error` that says what is expected."""
    message = f"{label} must be a whole number between {low} and {high}, got {_shown(value)}."
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise gr.Error(message)
    number = float(value)
    if not number.is_integer() or not low <= number <= high:
        raise gr.Error(message)
    return int(number)


def _class_id(value, num_classes: int) -> int:
    """A class id given as an int or its decimal string (the dropdown's values), in 0..num_classes-1."""
    text = value if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        class_id = value
    elif text is not None and text.strip().isdigit() and len(text) <= 12:
        class_id = int(text)
    else:
        raise gr.Error(
            f"Unknown class {_shown(value)}: give class ids 0 to {num_classes - 1} (as numbers or strings), or "
            "choose classes from the list."
        )
    if not 0 <= class_id < num_classes:
        raise gr.Error(f"Class {class_id} does not exist: this model has classes 0 to {num_classes - 1}.")
    return class_id


def _validate(model: DemoModel, class_ids, guidance_scale, num_inference_steps, scheduler, seed, images_per_class):
    """Checks one request against the model and the limits (the handler receives the request's values unprocessed,
    so every check is here); returns (class ids, guidance, steps, seed, per class)."""
    if isinstance(class_ids, (int, str)):
        class_ids = [class_ids]
    if not isinstance(class_ids, (list, tuple)) or not class_ids:
        raise gr.Error("Pick at least one class.")
    if len(class_ids) > MAX_IMAGES:
        raise gr.Error(f"{len(class_ids)} classes: at most {MAX_IMAGES} per request.")
    ids = [_class_id(class_id, model.num_classes) for class_id in class_ids]
    guidance = (
        guidance_scale if isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool) else None
    )
    if guidance is None or not 0.0 <= guidance <= MAX_GUIDANCE:  # also refuses NaN
        raise gr.Error(f"Guidance scale must be a number between 0 and {MAX_GUIDANCE}, got {_shown(guidance_scale)}.")
    steps = _whole_number(num_inference_steps, "Steps", 1, MAX_STEPS)
    if not isinstance(scheduler, str) or scheduler not in model.schedulers:
        raise gr.Error(
            f"Scheduler {_shown(scheduler)} is not available for this model; choose one of "
            f"{', '.join(model.schedulers)}."
        )
    seed = _whole_number(seed, "Seed", 0, MAX_SEED)
    per_class = _whole_number(images_per_class, "Images per class", 1, MAX_IMAGES)
    if len(ids) * per_class > MAX_IMAGES:
        raise gr.Error(
            f"{len(ids)} classes x {per_class} images = {len(ids) * per_class} images; at most {MAX_IMAGES} per "
            "request."
        )
    return ids, guidance, steps, seed, per_class


class DemoApp:
    """
    The demo's handlers and UI for a set of loaded models; `build()` returns the `gr.Blocks`. The handlers are plain
    methods, so they can be called without a server.
    """

    def __init__(self, models: dict[str, DemoModel]):
        if not models:
            raise ValueError("DemoApp needs at least one model.")
        self.models = models

    def generate(
        self,
        model_name: str,
        class_ids: list[int],
        guidance_scale: float,
        num_inference_steps: int,
        scheduler: str,
        seed: int,
        randomize_seed: bool,
        images_per_class: int,
        progress=gr.Progress(track_tqdm=True),
    ):
        """
        Samples `images_per_class` images of each class.

        Returns:
            The gallery `[(image, caption)]`, the seed used, the routing state, updates of the layer and step
            pickers, and the routing outputs of `show_routing` for the last step.
        """
        if not isinstance(model_name, str) or model_name not in self.models:
            raise gr.Error(f"Unknown model {_shown(model_name)}; choose one of {', '.join(self.models)}.")
        model = self.models[model_name]
        if not isinstance(randomize_seed, bool):
            raise gr.Error(f"Randomize seed must be true or false, got {_shown(randomize_seed)}.")
        if randomize_seed:
            seed = random.randint(0, MAX_SEED)
        ids, guidance_scale, steps, seed, per_class = _validate(
            model, class_ids, guidance_scale, num_inference_steps, scheduler, seed, images_per_class
        )
        labels = [class_id for class_id in ids for _ in range(per_class)]
        pipe = model.pipe
        pipe.scheduler = model.schedulers[scheduler]  # safe: one request runs at a time (concurrency_limit=1)
        device = pipe._execution_device
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(labels))]
        collector = RoutingCollector(pipe.transformer)
        try:
            with collector:
                images = pipe(
                    class_labels=labels,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    callback_on_step_end=collector.on_step_end,
                ).images
        except ValueError as error:  # the pipeline's refusal (e.g. sampling diverged): its message, not a traceback
            raise gr.Error(str(error)) from None
        captions = [f"{model.class_name(c)} - seed {seed + i}" for i, c in enumerate(labels)]
        view = collector.view
        state = {"view": view, "image": images[0]}
        layer = view.layers[0] if view.layers else None
        last_step = view.num_evaluations
        return (
            list(zip(images, captions)),
            seed,
            state,
            gr.update(choices=[(layer_label(name), name) for name in view.layers], value=layer),
            # Gradio refuses a slider whose minimum (1) is not below its maximum: one step shows on a 1..2 slider
            gr.update(maximum=max(last_step, 2), value=last_step, interactive=last_step > 1),
            *self.show_routing(state, layer, last_step),
        )

    def show_routing(self, state: dict | None, layer: str | None, step: int | None):
        """
        Routing of the first image and expert load at `layer` and `step` (1-based) of the last generation.

        Returns:
            The expert map picture, the load chart, the load table and a caption.
        """
        if not state:
            return None, None, None, "Generate images to see where the experts work."
        view = state["view"]
        if not view.layers:
            return None, None, None, "This model has no MoE layer: every token goes through the same feed-forward."
        layer = layer if layer in view.layers else view.layers[0]
        step = min(max(int(step or view.num_evaluations), 1), view.num_evaluations)
        index = view.layers.index(layer)
        picture = render_expert_map(view.expert_maps[step - 1][index], view.num_experts[index], state["image"])
        loads = view.loads[step - 1]
        headers = ["layer", *[f"E{expert} %" for expert in range(loads.shape[1])]]
        table = {"headers": headers, "data": load_table(loads, view.layers)}
        if view.expert_choice[index]:
            routing = (
                "its experts choose tokens from the whole batch; each patch of the first image (conditional pass) "
                "shows the highest-scoring expert that took it, dark where none did."
            )
        else:
            routing = "the expert with the highest router score for each patch of the first image (conditional pass)."
        caption = (
            f"**{layer_label(layer)}, {view.step_labels[step - 1]}**: {routing} Load: share of the (token, expert) "
            "assignments of each layer in this transformer evaluation, over all images and guidance passes."
        )
        return picture, render_load(loads, view.layers, view.num_experts), table, caption

    def select_model(self, model_name: str):
        """Resets the class, scheduler and guidance controls to the picked model."""
        model = self.models[model_name]
        choices = model.class_choices()
        schedulers = list(model.schedulers)
        return (
            gr.update(choices=choices, value=[choices[0][1]]),
            gr.update(choices=schedulers, value=schedulers[0]),
            gr.update(value=model.pipe.default_guidance()[0]),
        )

    def build(self) -> gr.Blocks:
        """The Gradio app (a model picker appears when several models are served), queued with the demo's limits."""
        first = next(iter(self.models.values()))
        first_scheduler = next(iter(first.schedulers))
        with gr.Blocks(title="Diffusion MoE demo (diffmoe_hf)", analytics_enabled=False) as demo:
            gr.Markdown(
                "# Diffusion Mixture-of-Experts\n"
                "Class-conditional samples from a diffusion MoE transformer ported to diffusers, and the "
                "*space-adaptive* picture of its routing: which expert each image patch is sent to, per layer and "
                "sampling step."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    model_picker = gr.Dropdown(
                        choices=[(f"{name}: {model.family}", name) for name, model in self.models.items()],
                        value=first.name,
                        label="Model",
                        visible=len(self.models) > 1,
                        elem_id="model",
                    )
                    classes = gr.Dropdown(
                        choices=first.class_choices(),
                        value=[first.class_choices()[0][1]],
                        multiselect=True,
                        filterable=True,
                        max_choices=MAX_IMAGES,
                        label="Classes (type to search)",
                        elem_id="classes",
                    )
                    guidance = gr.Slider(
                        0.0,
                        MAX_GUIDANCE,
                        value=first.pipe.default_guidance()[0],
                        step=0.1,
                        label="Guidance scale (<= 1: no guidance)",
                        elem_id="guidance",
                    )
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
                    scheduler = gr.Dropdown(
                        choices=list(first.schedulers), value=first_scheduler, label="Scheduler", elem_id="scheduler"
                    )
                    with gr.Row():
                        seed = gr.Number(
                            value=0, minimum=0, maximum=MAX_SEED, precision=0, label="Seed", elem_id="seed"
                        )
                        randomize = gr.Checkbox(value=True, label="Randomize seed", elem_id="randomize")
                    images_per_class = gr.Slider(
                        1, MAX_IMAGES, value=1, step=1, label="Images per class", elem_id="images_per_class"
                    )
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    # lossless: webp (the default) blurs the colours of small samples
                    gallery = gr.Gallery(label="Samples", columns=4, height="auto", format="png", elem_id="gallery")
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="used_seed")
            gr.Markdown("## Routing")
            with gr.Row():
                layer = gr.Dropdown(choices=[], label="MoE layer", elem_id="layer")
                step = gr.Slider(
                    1, DEFAULT_STEPS, value=DEFAULT_STEPS, step=1, label="Transformer evaluation", elem_id="step"
                )
            caption = gr.Markdown("Generate images to see where the experts work.", elem_id="routing_caption")
            with gr.Row():
                routing_map = gr.Image(
                    label="Experts per patch (first image)", type="pil", format="png", elem_id="routing_map"
                )
                load_plot = gr.Image(label="Expert load per layer (%)", type="pil", format="png", elem_id="load_plot")
            load_numbers = gr.Dataframe(
                value=None, headers=["layer"], label="Expert load (%)", interactive=False, elem_id="load_table"
            )
            state = gr.State()

            inputs = [model_picker, classes, guidance, steps, scheduler, seed, randomize, images_per_class]
            routing_outputs = [routing_map, load_plot, load_numbers, caption]
            run.click(
                self.generate,
                inputs=inputs,
                outputs=[gallery, used_seed, state, layer, step, *routing_outputs],
                api_name="generate",
                concurrency_limit=1,
                preprocess=False,  # `_validate` checks the raw values and answers with a short gr.Error
            )
            # user events only (`input`/`release`): `generate` updates these pickers itself
            layer.input(self.show_routing, [state, layer, step], routing_outputs, api_visibility="private")
            step.release(self.show_routing, [state, layer, step], routing_outputs, api_visibility="private")
            model_picker.input(
                self.select_model, model_picker, [classes, scheduler, guidance], api_visibility="private"
            )
            class_ids = [class_id for _, class_id in first.class_choices()]
            guidance_default = first.pipe.default_guidance()[0]
            gr.Examples(
                examples=[
                    [first.name, class_ids[:1], guidance_default, 10, first_scheduler, 0, False, 2],
                    [first.name, class_ids[1:4], guidance_default, 20, list(first.schedulers)[-1], 42, False, 1],
                ],
                inputs=inputs,
            )
            gr.Markdown(
                f"Limits: up to {MAX_IMAGES} images and {MAX_STEPS} steps per request; one request runs at a time."
            )
        # bounded whoever launches it: one request at a time, at most QUEUE_SIZE waiting
        return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def _unknown_route(request, error):
    """404 for an API call to a route that does not exist (Gradio itself answers 500 and logs a traceback)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": "Not Found: this app's API has the route /generate."}, status_code=404)


def serve(demo: gr.Blocks, **launch_kwargs):
    """`demo.launch(**launch_kwargs)` with the demo's CSS and a 404 for unknown API routes."""
    from gradio.route_utils import FnIndexInferError

    app_kwargs = {"exception_handlers": {FnIndexInferError: _unknown_route}}
    return demo.launch(css=CSS, app_kwargs=app_kwargs, **launch_kwargs)


def _port(text: str) -> int:
    """argparse type of `--port`: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port between 1 and 65535, got {text!r}")
    return port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="converted folder or Hub repo id (repeatable)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--host", default=None, help="server address (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=_port, default=None, help="server port (default 7860, or $GRADIO_SERVER_PORT)")
    args = parser.parse_args(argv)
    try:
        models = load_models(configured_sources(args.model), args.device)
    except (ValueError, OSError) as error:  # nothing configured, not a model folder, Hub repo not reachable
        sys.exit(f"error: {error}")
    serve(DemoApp(models).build(), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
