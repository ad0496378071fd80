"""Class-conditional image generation with any diffmoe_hf transformer, on standard diffusers schedulers."""

import difflib
import inspect
import numbers
from collections.abc import Callable

import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from diffmoe_hf.devices import check_device_available
from diffmoe_hf.formulations import SamplingPlan, check_scheduler, get_formulation, max_inference_steps

from .call_arguments import (
    LATENT_LIMIT,
    check_attention_kwargs,
    check_callback,
    check_callback_output,
    check_generator,
    check_guidance_channels,
    check_label_names,
    check_latents,
    check_real_number,
    diverged_step,
    flatten_class_labels,
)
from .lora_loading import TransformerLoraLoaderMixin


OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> import diffmoe_hf  # registers the pipeline and its models with diffusers

        >>> pipe = DiffusionPipeline.from_pretrained(diffmoe_hf.default_models()["digits-jitmoe"])
        >>> class_ids = pipe.get_label_ids(["three", "seven"])
        >>> images = pipe(class_labels=class_ids, generator=torch.manual_seed(0)).images
        >>> images[0].save("three.png")
        ```
"""


class ClassConditionalMoEPipeline(DiffusionPipeline, TransformerLoraLoaderMixin):
    r"""
    Class-conditional generation with a diffusion MoE transformer (DSMoE and the other diffmoe_hf families).

    The transformer's `config.formulation` says what its timestep input and output mean (flow time with noise at 0
    or 1, DDPM index, ...); the pipeline converts between that and the scheduler through `diffmoe_hf.formulations`,
    so any compatible diffusers scheduler can be swapped in with `pipe.scheduler = X.from_config(...)`.

    Args:
        transformer: A diffmoe_hf transformer (e.g. `DSMoETransformer2DModel`).
        scheduler: A diffusers scheduler matching the formulation (the converted folder ships one that reproduces the
            original sampler).
        vae (`AutoencoderKL`, *optional*): Decodes latents to images. Without it the transformer works in pixel space
            (1 or 3 channels in [-1, 1]) or only `output_type="latent"` is available.
        id2label (`dict[str, str]`, *optional*): Class names (comma-separated synonyms), stored in `model_index.json`.
        default_guidance_scale (`float`, *optional*): The guidance scale used when a call gives none, stored in
            `model_index.json` (e.g. for a model trained with a recipe that measured its quality at that scale);
            `None` uses the formulation's default.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]
    _guidance_scale = None
    _sampling_plan = None
    _current_timestep = None
    _interrupt = False

    def __init__(
        self,
        transformer,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[str, str] | None = None,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(id2label=id2label)
        if default_guidance_scale is not None:
            self.register_to_config(default_guidance_scale=default_guidance_scale)
        self.labels = {}
        for class_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels.setdefault(name.strip(), int(class_id))
        self.labels = dict(sorted(self.labels.items()))

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """
        Fetches a Hub repo written by `save_pretrained` (or the converter) with `huggingface_hub.snapshot_download`.
        diffusers' own `download` only accepts pipelines whose classes live in diffusers.
        """
        from huggingface_hub import snapshot_download

        variant = kwargs.get("variant")
        patterns = ["*.json", "*.txt", "*.md", "*.safetensors", "*.py"]
        if variant:
            patterns.append(f"*.{variant}.safetensors")
        return snapshot_download(
            pretrained_model_name,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
            allow_patterns=patterns,
        )

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the running (or last) call; a `callback_on_step_end` may change it for the next
        steps (`pipe.guidance_scale = 1.0` turns guidance off), as diffusers callbacks change `pipe._guidance_scale`."""
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._guidance_scale = check_real_number("guidance_scale", value, minimum=0.0)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether classifier-free guidance is on (guidance scale > 1); with a guidance interval (JiT) it applies only to
        the steps inside it."""
        return self._guidance_scale is not None and self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int | None:
        """The number of timesteps of the running (or last) call, one per transformer evaluation as in diffusers'
        pipelines (Heun: two per sampling step but the last); `sampling_plan.num_steps` counts sampling steps."""
        return None if self._sampling_plan is None else len(self._sampling_plan)

    @property
    def sampling_plan(self) -> SamplingPlan | None:
        """The `SamplingPlan` of the running (or last) call: its timesteps, model times, guided steps and which
        sampling step each transformer evaluation belongs to (what a `callback_on_step_end` step index means)."""
        return self._sampling_plan

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The scheduler timestep being denoised (`None` outside a call)."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to skip the remaining steps (the current latents are decoded)."""
        return self._interrupt

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """
        Maps class names to class ids.

        Args:
            label: One name or a list of names (any synonym of `id2label`, e.g. "golden retriever").

        Returns:
            The class ids, one per name.
        """
        names = check_label_names(label)
        if not self.labels:
            raise ValueError("This pipeline has no class names (id2label is empty); pass integer class ids instead.")
        ids = []
        for name in names:
            if name not in self.labels:
                close = difflib.get_close_matches(str(name), self.labels.keys(), n=5, cutoff=0.6)
                hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"Unknown class name {name!r}.{hint} `pipe.labels` lists all names.")
            ids.append(self.labels[name])
        return ids

    def _class_ids(self, class_labels, device) -> torch.Tensor:
        labels = flatten_class_labels(class_labels)
        if not labels:
            raise ValueError("class_labels is empty: give at least one class id or name.")
        ids = [self.get_label_ids(c)[0] if isinstance(c, str) else c for c in labels]
        for class_id in ids:
            if not 0 <= class_id <= self.num_classes:
                raise ValueError(
                    f"Class id {class_id!r} is out of range: this model has classes 0..{self.num_classes - 1} "
                    f"(and the null class {self.num_classes} for unconditional samples)."
                )
        return torch.tensor(ids, device=device, dtype=torch.long)

    def _formulation(self):
        """The transformer's formulation with the parameters its config records."""
        return get_formulation(self.transformer.config.formulation).for_model(self.transformer.config)

    def default_guidance(self) -> tuple[float, tuple[float, float] | None]:
        """
        The guidance scale and interval a call uses when it gives none: the folder's `default_guidance_scale`
        (`model_index.json`) if set, else the formulation's, and the formulation's interval (in model time units).
        """
        formulation = self._formulation()
        scale = self.config.get("default_guidance_scale") or formulation.default_guidance_scale
        return scale, formulation.default_guidance_interval

    def check_inputs(
        self,
        num_inference_steps,
        guidance_scale,
        output_type,
        callback_on_step_end_tensor_inputs,
        guidance_interval=None,
        latents=None,
        guidance_channels=None,
        attention_kwargs=None,
        generator=None,
        callback_on_step_end=None,
    ) -> None:
        """Refuses a call that cannot run or would return garbage, before any work is done (errors say what to do)."""
        check_scheduler(self.transformer.config.formulation, self.scheduler, "pipe.scheduler")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise TypeError(
                f"num_inference_steps must be an integer, got {num_inference_steps!r} of type "
                f"{type(num_inference_steps).__name__}."
            )
        max_steps = max_inference_steps(self.scheduler)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}.")
        if num_inference_steps > max_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is more than {type(self.scheduler).__name__} can take: "
                f"at most its num_train_timesteps={max_steps} steps. Choose a value between 1 and {max_steps} (the "
                "model cards quote their quality at 50 or fewer)."
            )
        check_real_number("guidance_scale", guidance_scale, minimum=0.0)
        interval = guidance_interval
        if interval is not None:
            if not isinstance(interval, (list, tuple)) or len(interval) != 2:
                raise ValueError(f"guidance_interval must be (low, high) with low <= high, got {interval!r}.")
            low, high = (check_real_number("guidance_interval", v, allow_inf=True) for v in interval)
            if low > high:
                raise ValueError(f"guidance_interval must be (low, high) with low <= high, got {interval!r}.")
        check_guidance_channels(guidance_channels, self.transformer.config.in_channels)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type != "latent" and self.vae is None and self.transformer.config.in_channels not in (1, 3):
            raise ValueError(
                f"This pipeline has no VAE, so it cannot decode {self.transformer.config.in_channels}-channel "
                "latents. Load one (`ClassConditionalMoEPipeline.from_pretrained(..., "
                "vae=AutoencoderKL.from_pretrained(...))`) or use output_type='latent'."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}.")
        check_latents(latents)
        check_attention_kwargs(attention_kwargs)
        check_generator(generator)
        check_callback(callback_on_step_end)

    def prepare_latents(self, batch_size, generator, latents, device, dtype, formulation=None) -> torch.Tensor:
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but {batch_size} class labels were given: pass "
                "one generator per image, or a single generator."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if formulation is not None:
                latents = formulation.initial_noise(latents)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but {batch_size} class labels and this transformer need "
                f"{shape} (batch, in_channels, sample_size, sample_size)."
            )
        latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _predict(
        self, latents, model_time, class_ids, guidance_scale, attention_kwargs, guidance_channels=None
    ) -> torch.Tensor:
        """Transformer output with classifier-free guidance on the first `guidance_channels` (default: all latent)
        channels; the other channels are the conditional output."""
        timestep = model_time.to(latents.device).expand(latents.shape[0])
        if guidance_scale <= 1.0:
            with self.transformer.cache_context("cond"):
                return self.transformer(latents, timestep, class_ids, attention_kwargs=attention_kwargs).sample
        null_ids = torch.full_like(class_ids, self.num_classes)
        if self.transformer.routing_depends_on_batch:
            # batch-level routing: cond and uncond must be separate calls, exactly as the original sampler makes them
            with self.transformer.cache_context("cond"):
                cond = self.transformer(latents, timestep, class_ids, attention_kwargs=attention_kwargs).sample
            with self.transformer.cache_context("uncond"):
                uncond = self.transformer(latents, timestep, null_ids, attention_kwargs=attention_kwargs).sample
        else:
            with self.transformer.cache_context("cond_uncond"):
                both = self.transformer(
                    torch.cat([latents, latents]),
                    torch.cat([timestep, timestep]),
                    torch.cat([class_ids, null_ids]),
                    attention_kwargs=attention_kwargs,
                ).sample
            cond, uncond = both.chunk(2)
        channels = guidance_channels or latents.shape[1]
        guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1)

    @staticmethod
    def _step_kwargs(scheduler, generator) -> dict:
        accepted = inspect.signature(scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    def to(self, *args, **kwargs):
        """
        diffusers' `DiffusionPipeline.to`, after checking that this machine has the device it names: `pipe.to("cuda")`
        on a CPU build, or a typo, is a `ValueError` naming the devices there are (torch itself fails with an
        `AssertionError` or a long list of device types). `meta` and dtypes pass through unchecked.
        """
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if device is not None and str(device) != "meta":
            check_device_available(device, "pipe.to(device):", hint="Leave the pipeline on the CPU.")
        return super().to(*args, **kwargs)

    def enable_expert_offload(self, tier: str, offload_dir: str | None = None, memory_budget: int | None = None):
        """
        Puts the transformer's routed experts into a memory tier, keeping every other weight resident:

        - `"none"`: as loaded;
        - `"cpu"`: host RAM, streamed to the CUDA device per projection (diffusers group offloading; needs CUDA;
          the other weights and the VAE are moved to the CUDA device);
        - `"disk"`: one safetensors file per expert bank in `offload_dir` (default: a temporary folder),
          memory-mapped while a projection runs: host RAM holds one projection of experts at a time;
        - `"int8"`: torchao int8 weight-only; `"fp8"`: stored as float8_e4m3fn, upcast per call.

        `cpu` and `disk` give the same images as the resident model; `int8` and `fp8` round the expert weights.
        `memory_budget` (bytes of weights on the compute device) is checked against the tier's plan. Every check
        runs before anything changes. Returns the `ExpertMemoryPlan`.
        """
        plan = self.transformer.enable_expert_offload(tier, offload_dir, memory_budget)
        if tier == "cpu" and self.vae is not None:
            self.vae.to(next(self.transformer.embedding.parameters()).device)
        return plan

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) final latents -> (B, 3 or 1, H, W) images in [0, 1]."""
        if self.vae is not None:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None) is not None:
                latents = latents + self.vae.config.shift_factor
            images = self.vae.decode(latents).sample
        else:
            images = latents  # pixel-space model: its samples are images in [-1, 1]
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_channels: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates one image per class label.

        Args:
            class_labels: Class ids (0..num_classes-1) and/or class names (see `pipe.labels`), one per image; the
                null class id `num_classes` gives an unconditional sample (as the original samplers allow). Nested
                lists (`[[1], [7]]`) and integer tensors of any shape are flattened in order.
            num_inference_steps: Number of denoising steps, at most the scheduler's `num_train_timesteps`.
            guidance_scale: Classifier-free guidance scale; values <= 1 disable guidance (one pass per step).
                Defaults to the pipeline's `default_guidance_scale` if set, else the formulation's (the original
                sampling scripts': 1.5 for DSMoE, 2.9 for JiT). `pipe.guidance_scale` holds it during the call, and a
                callback may change it for the following steps.
            guidance_interval: `(low, high)` in model time: guidance only where `low < t < high` (`t < high` when
                low is 0), one conditional pass elsewhere. Defaults to the formulation's ((0.1, 1.0) for JiT, none
                for the other families); `(0, float("inf"))` guides at every step.
            generator: `torch.Generator`(s) for reproducible noise (a list: one per image).
            latents: (B, C, sample_size, sample_size) initial unit Gaussian noise (finite, within +-1e4); drawn
                from `generator` when omitted (and then scaled as the formulation starts, e.g. by JiT's `noise_scale`;
                given latents are used as they are).
            output_type: `"pil"`, `"np"` (B, H, W, C) in [0, 1], `"pt"` (B, C, H, W) in [0, 1], or `"latent"`.
            return_dict: Return an `ImagePipelineOutput` instead of a tuple.
            attention_kwargs: Forwarded to the transformer; only `{"scale": s}` (scales LoRA) is accepted.
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` called after every step; the
                returned `"latents"` replaces the current latents. It may read `pipe.num_timesteps`,
                `pipe.guidance_scale`, `pipe.do_classifier_free_guidance`, change `pipe.guidance_scale` (or
                `pipe._guidance_scale`), and set `pipe._interrupt = True` to stop early.
            callback_on_step_end_tensor_inputs: Tensors passed in `callback_kwargs` (only `"latents"`).
            guidance_channels: Parity option: guide only the first `guidance_channels` output channels and keep the
                conditional output in the others. `None` (default) guides all latent channels. The original DiT /
                DiT-MoE / Diff-MoE (Cheng et al.) DDPM samplers (`forward_with_cfg`) guide only channels 0..2 of
                4-channel latents: pass 3 to reproduce them exactly.

        Examples:

        Returns:
            `ImagePipelineOutput` with `images`, or `(images,)`.

        Raises:
            TypeError: an argument of the wrong type (a float class id, a string guidance scale, ...).
            ValueError: an argument out of range or non-finite, or a `pipe.scheduler` the formulation cannot use
                (before any denoising), or latents that diverged during sampling (NaN, infinite or beyond
                `LATENT_LIMIT`, e.g. a float16 overflow), which would otherwise decode to blank or saturated images.
        """
        # 1. Check inputs
        formulation = self._formulation()
        default_scale, default_interval = self.default_guidance()
        guidance_scale = default_scale if guidance_scale is None else guidance_scale
        guidance_interval = default_interval if guidance_interval is None else guidance_interval
        self.check_inputs(
            num_inference_steps,
            guidance_scale,
            output_type,
            callback_on_step_end_tensor_inputs,
            guidance_interval,
            latents,
            guidance_channels,
            attention_kwargs,
            generator,
            callback_on_step_end,
        )
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device

        # 2. Prepare class labels
        class_ids = self._class_ids(class_labels, device)

        # 3. Prepare latents
        latents = self.prepare_latents(len(class_ids), generator, latents, device, self.transformer.dtype, formulation)

        # 4. Sampling plan: the scheduler that steps, its timesteps, the model time and guidance of every step
        plan = formulation.sampling_plan(self.scheduler, int(num_inference_steps), device, guidance_interval)
        scheduler = plan.scheduler
        self._sampling_plan = plan
        step_kwargs = self._step_kwargs(scheduler, generator)

        # 5. Denoising loop. The loop itself reads nothing back from the device; what does is out of its hands:
        # diffusers' `step` looks the timestep up (FlowMatch and DPM-Solver their step index at the first step, DDPM
        # and DDIM their previous timestep or alpha-bar at every step) and, on CPU, the MoE layers read their
        # per-expert token counts to size the expert GEMMs.
        if self.transformer.is_cache_enabled:
            self.transformer._reset_stateful_cache()  # a call that raised earlier leaves no stale cache behind
        # the first step (0-based) after which the latents diverged, on the device: read once after the loop
        first_diverged = torch.tensor(-1, device=latents.device)
        with self.progress_bar(total=plan.num_steps) as progress_bar:  # sampling steps, not evaluations (Heun)
            for i, t in enumerate(plan.timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model_time = plan.model_times[i]
                # a callback may have changed the scale; the plan says whether it applies at this step
                scale = check_real_number("guidance_scale", self._guidance_scale, minimum=0.0)
                scale = scale if plan.guided[i] else 1.0
                model_input = latents
                if hasattr(scheduler, "scale_model_input"):
                    model_input = scheduler.scale_model_input(latents, t)
                prediction = self._predict(
                    model_input, model_time, class_ids, scale, attention_kwargs, guidance_channels
                )
                step_input = formulation.scheduler_output(prediction, latents, model_time, scheduler)
                latents = scheduler.step(step_input, t, latents, **step_kwargs, return_dict=False)[0]
                latents = latents.to(self.transformer.dtype)

                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents}
                    callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs or []}
                    callback_outputs = check_callback_output(callback_on_step_end(self, i, t, callback_kwargs))
                    latents = callback_outputs.pop("latents", latents)
                first_diverged = diverged_step(first_diverged, i, latents)
                if plan.completes_step(i):
                    progress_bar.update()
        self._current_timestep = None

        # 6. Decode (one host sync: diverged latents would decode to blank or saturated images)
        step = int(first_diverged)
        if step >= 0:
            self.maybe_free_model_hooks()
            raise ValueError(
                f"Sampling diverged at sampling step {plan.step_of(step) + 1} of {plan.num_steps}: the latents became NaN, infinite or "
                f"larger than {LATENT_LIMIT:g}, which would decode to blank or saturated images. Likely causes: guidance_scale="
                f"{self._guidance_scale:g} far too large (these models sample at about 1 to 10), a float16 overflow "
                "(load the model in float32 or bfloat16), a callback that returned such latents, or broken weights."
            )
        if output_type == "latent":
            images = latents
        else:
            images = self.decode(latents)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
