"""The demo's routing view: which expert each image patch went to, per MoE layer and sampling step, and the expert load.

`RoutingCollector` wraps `diffmoe_hf.routing.record_routing` for one pipeline call and splits what it records into
sampling steps (through the pipeline's `callback_on_step_end`). The result, a `RoutingView`, holds plain numpy arrays
(so Gradio can keep it in a `gr.State`); `render_expert_map` and `render_load` draw it with PIL.
"""

import colorsys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffmoe_hf.models.dynamic_token_moe_layer import DynamicTokenMoE
from diffmoe_hf.routing import LayerRouting, record_routing


# tab10 then tab20's light tones: distinct colours for up to 20 experts; more experts get evenly spaced hues
_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
]
_UNROUTED = (40, 40, 40)  # patches no expert took (possible with expert-choice routing)


def expert_colors(num_experts: int) -> list[tuple[int, int, int]]:
    """One RGB colour per expert."""
    if num_experts <= len(_PALETTE):
        return [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in _PALETTE[:num_experts]]
    hues = [(i * 0.618034) % 1.0 for i in range(num_experts)]
    return [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(h, 0.65, 0.9)) for h in hues]


def layer_label(name: str) -> str:
    """`"transformer_blocks.3.ff"` -> `"block 3"` (other names are kept)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "transformer_blocks" and parts[1].isdigit():
        return f"block {parts[1]}"
    return name


@dataclass
class RoutingView:
    """
    Routing of one generation, for display.

    Attributes:
        layers: MoE layer names in model order.
        num_experts: Routed experts per layer (E).
        expert_choice: Per layer, whether its experts choose their tokens (DiffMoE by Shi et al.: a token may be
            taken by several experts or by none) instead of tokens choosing their top-k experts.
        step_labels: One label per transformer evaluation round of the pipeline loop, named by its sampling step
            (Heun evaluates twice per step but the last: `step 3 of 50, evaluation 2 of 2`).
        expert_maps: `expert_maps[step][layer]` is a (grid, grid) int array with the top expert of each patch of the
            first image (conditional pass): the highest-scoring of the experts that took it, -1 where none did; `None`
            when the layer was not called in that step.
        loads: `loads[step]` is a (layers, E) int array of (token, expert) assignments in that step, over all images
            and guidance passes.
    """

    layers: list[str]
    num_experts: list[int]
    expert_choice: list[bool]
    step_labels: list[str] = field(default_factory=list)
    expert_maps: list[list[np.ndarray | None]] = field(default_factory=list)
    loads: list[np.ndarray] = field(default_factory=list)

    @property
    def num_evaluations(self) -> int:
        return len(self.step_labels)


class RoutingCollector:
    """
    Records the routing of one pipeline call. Use as a context manager around the call and pass `self.on_step_end`
    as the pipeline's `callback_on_step_end`:

        collector = RoutingCollector(pipe.transformer)
        with collector:
            pipe(..., callback_on_step_end=collector.on_step_end)
        view = collector.view

    The first image's map comes from the first transformer call of each step (the conditional pass: the pipeline
    puts the conditional batch first, or runs it first when cond and uncond are separate calls), and from its last
    `grid * grid` tokens (models with in-context prefix tokens, such as JiT, put them before the image tokens).
    Both kinds of layers give their routing through `record_routing`: token-choice layers their expert ids,
    expert-choice layers (`DynamicTokenMoE`) the selection their router returned.
    """

    def __init__(self, transformer: torch.nn.Module):
        config = transformer.config
        self.transformer = transformer
        self.grid = config.sample_size // config.patch_size
        self._context = None
        self._record = None
        self._call_batches: list[int] = []  # batch size of every transformer call
        self._step_start = 0  # index of the first transformer call of the current step
        self._last_counts: list[torch.Tensor] = []
        self._hooks = []
        self.view: RoutingView | None = None

    def __enter__(self) -> "RoutingCollector":
        self._context = record_routing(self.transformer)
        self._record = self._context.__enter__()
        self._hooks = [self.transformer.register_forward_pre_hook(self._count_call, with_kwargs=True)]
        layers = list(self._record)
        num_experts = [self._record[name].num_experts for name in layers]
        expert_choice = [isinstance(self.transformer.get_submodule(name), DynamicTokenMoE) for name in layers]
        self.view = RoutingView(layers, num_experts, expert_choice=expert_choice)
        self._last_counts = [self._record[name].counts.clone() for name in layers]
        return self

    def __exit__(self, *exc_info):
        for hook in self._hooks:
            hook.remove()
        return self._context.__exit__(*exc_info)

    def _count_call(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self._call_batches.append(hidden_states.shape[0])

    def on_step_end(self, pipeline, step: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        """`callback_on_step_end` of the pipeline: closes one sampling step."""
        maps, loads = [], []
        for index, name in enumerate(self.view.layers):
            layer = self._record[name]
            counts = layer.counts.detach().cpu().clone()
            loads.append((counts - self._last_counts[index].cpu()).numpy())
            self._last_counts[index] = counts
            maps.append(self._first_image_map(layer))
            layer.expert_ids.clear()  # only the first image's map of each step is kept
            layer.selections.clear()
        self._step_start = len(self._call_batches)
        self.view.step_labels.append(_evaluation_label(pipeline.sampling_plan, step, timestep))
        self.view.expert_maps.append(maps)
        self.view.loads.append(np.stack(loads) if loads else np.zeros((0, 0), dtype=np.int64))
        return {}

    def _first_image_map(self, layer: LayerRouting) -> np.ndarray | None:
        if not (layer.expert_ids or layer.selections) or self._step_start >= len(self._call_batches):
            return None  # a step without a transformer call
        ids = layer.top_experts(0)  # the first call of this step: calls were cleared at the end of the previous step
        batch = self._call_batches[self._step_start]
        tokens, image_tokens = ids.shape[0] // batch, self.grid * self.grid
        if tokens < image_tokens:
            raise ValueError(f"A MoE layer routed {tokens} tokens per sample, fewer than the {image_tokens} patches.")
        top_expert = ids.reshape(batch, tokens)[0, tokens - image_tokens :]
        return top_expert.reshape(self.grid, self.grid).cpu().numpy().astype(np.int64)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_expert_map(
    expert_map: np.ndarray | None, num_experts: int, image: Image.Image | None = None, size: int = 320
) -> Image.Image:
    """
    The patch grid of one image coloured by top expert, next to the image itself, with a legend below.

    Args:
        expert_map: (grid, grid) int expert ids (-1: no expert), or `None` for a layer without per-token routing.
        num_experts: E, for the colours and the legend.
        image: The generated image, shown on the left with the patch grid drawn over it.
        size: Side in pixels of each panel.
    """
    colors = expert_colors(num_experts)
    font = _font(14)
    legend_rows = (num_experts + 7) // 8
    panels = 2 if image is not None else 1
    canvas = Image.new("RGB", (panels * size + (panels - 1) * 12, size + 8 + 22 * legend_rows), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = 0
    if image is not None:
        canvas.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (0, 0))
        x0 = size + 12
    if expert_map is None:
        draw.rectangle([x0, 0, x0 + size - 1, size - 1], fill=(235, 235, 235))
        message = "this layer does not\nexpose its routing\nper token;\nsee the load below"
        draw.multiline_text((x0 + 12, size // 2 - 40), message, fill="black", font=font, spacing=6)
    else:
        grid = expert_map.shape[0]
        cell = size / grid
        for row in range(grid):
            for col in range(grid):
                expert = int(expert_map[row, col])
                fill = colors[expert] if 0 <= expert < num_experts else _UNROUTED
                box = [x0 + col * cell, row * cell, x0 + (col + 1) * cell - 1, (row + 1) * cell - 1]
                draw.rectangle(box, fill=fill)
                if cell >= 18:
                    draw.text(
                        (box[0] + cell / 2, box[1] + cell / 2), str(expert), fill="white", font=font, anchor="mm"
                    )
        if image is not None:
            for i in range(1, grid):
                offset = round(i * cell)
                draw.line([(offset, 0), (offset, size - 1)], fill=(255, 255, 255), width=1)
                draw.line([(0, offset), (size - 1, offset)], fill=(255, 255, 255), width=1)
    for expert in range(num_experts):
        x, y = (expert % 8) * 60, size + 8 + 22 * (expert // 8)
        draw.rectangle([x, y, x + 16, y + 16], fill=colors[expert])
        draw.text((x + 20, y), f"E{expert}", fill="black", font=font)
    return canvas


def render_load(loads: np.ndarray, layers: list[str], num_experts: list[int]) -> Image.Image:
    """
    Bar chart of the expert load: one row per MoE layer, one bar per expert with its share of that layer's
    (token, expert) assignments.

    Args:
        loads: (layers, E) assignment counts.
        layers: Layer names, one per row.
        num_experts: E per layer.
    """
    font = _font(13)
    max_experts = max(num_experts, default=1)
    bar, gap, row_height, label_width = 26, 6, 96, 70
    width = label_width + max_experts * (bar + gap) + 10
    canvas = Image.new("RGB", (width, max(1, len(layers)) * row_height + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, counts) in enumerate(zip(layers, loads)):
        colors = expert_colors(len(counts))
        total = max(int(counts.sum()), 1)
        top = row * row_height + 8
        base = top + row_height - 26
        draw.text((4, top + 30), layer_label(name), fill="black", font=font)
        draw.line([(label_width - 4, base), (width - 6, base)], fill="gray")
        for expert, count in enumerate(counts):
            share = float(count) / total
            x = label_width + expert * (bar + gap)
            height = round(share * (row_height - 40))
            draw.rectangle([x, base - height, x + bar, base], fill=colors[expert])
            draw.text((x + bar / 2, base - height - 2), f"{100 * share:.0f}", fill="black", font=font, anchor="mb")
            draw.text((x + bar / 2, base + 3), f"E{expert}", fill="black", font=font, anchor="ma")
    return canvas


def load_table(loads: np.ndarray, layers: list[str]) -> list[list]:
    """Rows `[layer, share of E0 in %, ...]` (rounded to 0.1) for a `gr.Dataframe`."""
    rows = []
    for name, counts in zip(layers, loads):
        total = max(int(counts.sum()), 1)
        rows.append([layer_label(name), *[round(100.0 * float(c) / total, 1) for c in counts]])
    return rows


def _evaluation_label(plan, evaluation: int, timestep: torch.Tensor) -> str:
    """`"step 3 of 50 (timestep 0.94)"`; with k evaluations per step `"step 3 of 50, evaluation 2 of 2 (...)"`."""
    step, per_step = plan.step_of(evaluation), plan.evaluations_per_step
    in_this_step = min(per_step, len(plan) - step * per_step)  # Heun's last step evaluates once
    label = f"step {step + 1} of {plan.num_steps}"
    if in_this_step > 1:
        label += f", evaluation {evaluation - step * per_step + 1} of {in_this_step}"
    return f"{label} (timestep {float(timestep):.4g})"
