"""Forward pieces every DiT-style family shares; each family's `forward` composes them around its own blocks."""

import functools
import os
from dataclasses import dataclass

import torch
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from .blocks import unpatchify
from .folder_checks import check_folder_matches_config, check_no_tensor_left_on_meta
from .moe import (
    MoECollector,
    OtherRanksExpertsUnused,
    expert_banks,
    expert_placement,
    expert_rank_seed,
    set_expert_backend,
)
from .validation import check_model_inputs


@dataclass
class MoETransformer2DModelOutput(Transformer2DModelOutput):
    """
    The output of a diffmoe_hf transformer.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): The model's prediction.
        aux_loss (`torch.Tensor`, *optional*): Scalar sum of the MoE layers' auxiliary losses of this call, with its
            graph (the routers' load-balancing losses, the capacity-predictor losses of DiffMoE of Shi et al.): add it to the training
            objective. `None` in eval mode and when no layer computes one.
        moe_statistics (`dict[str, dict[str, torch.Tensor]]`, *optional*): In training mode, `{MoE layer path:
            {name: tensor}}` for every MoE layer of the call (see `diffmoe_hf.models.moe.MoECollector`), e.g.
            `moe_statistics["transformer_blocks.1.ff"]["tokens_per_expert"]`. `None` in eval mode (hook the routers
            to see the routing of any call: `diffmoe_hf.routing.record_routing`).

    With `return_dict=False` the model returns `output.to_tuple()`: `(sample,)` in eval mode, followed by the fields
    that are set in training mode.
    """

    aux_loss: torch.Tensor | None = None
    moe_statistics: dict[str, dict[str, torch.Tensor]] | None = None


def returns_moe_outputs(forward):
    """
    Decorates a `DiTForwardMixin` model's `forward` (which returns `MoETransformer2DModelOutput` or `(sample,)`): in
    training mode the call runs inside a fresh `MoECollector`, the model's `finish_moe_call` applies what the layers
    reported once the blocks have run, and the result carries the collected auxiliary loss and statistics. Nothing is
    kept on the modules. In eval mode the layers report nothing, so the forward runs as it is.
    """

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if not self.training:
            return forward(self, *args, **kwargs)
        with MoECollector() as collector:
            output = forward(self, *args, **kwargs)
        self.finish_moe_call(collector)
        result = MoETransformer2DModelOutput(
            sample=output.sample if isinstance(output, MoETransformer2DModelOutput) else output[0],
            aux_loss=collector.aux_loss(),
            moe_statistics=collector.named_statistics(self) or None,
        )
        return result if isinstance(output, MoETransformer2DModelOutput) else result.to_tuple()

    return wrapper


MOE_LAYER_PATTERNS = ("all", "odd", "none")


def resolve_moe_layers(moe_layers: str | list[int], num_layers: int) -> list[int]:
    """
    The indices of a model's MoE blocks, from its `moe_layers` config field: `"all"`, `"odd"` (blocks 1, 3, 5, ...:
    the released DSMoE, JiTMoE and DiffMoE (Shi et al.) models), `"none"` (a dense model) or a list of block indices.

    Raises:
        ValueError: for anything else (including `None`) or an index outside 0..num_layers-1.
    """
    if isinstance(moe_layers, str) and moe_layers in MOE_LAYER_PATTERNS:
        return {"all": list(range(num_layers)), "odd": list(range(1, num_layers, 2)), "none": []}[moe_layers]
    if moe_layers is None or isinstance(moe_layers, str):
        raise ValueError(
            f"moe_layers={moe_layers!r}: pass one of {', '.join(map(repr, MOE_LAYER_PATTERNS))} or a list of block "
            "indices."
        )
    indices = sorted({int(index) for index in moe_layers})
    if any(not 0 <= index < num_layers for index in indices):
        raise ValueError(f"moe_layers={list(moe_layers)} must index blocks 0..{num_layers - 1}.")
    return indices


class DiTForwardMixin(CacheMixin):
    """
    The forward, initialisation and diffusers settings of every family's transformer: a model with `pos_embed`
    (patch embedding), `embedding` (`TimestepClassEmbedding`), `transformer_blocks`, `proj_out` (`PatchOutputLayer`),
    `out_channels` and `gradient_checkpointing`.

    A family's class defines `_initialize_family_weights` (its original initialisation) and may override the hooks of
    the shared `forward`: `block_inputs` (what every block takes besides tokens and conditioning, e.g. rotary tables),
    `run_blocks` (the loop over the blocks, e.g. to add tokens of its own) and `finish_moe_call` (state the MoE layers
    calibrate once per training call).

    `CacheMixin` gives `enable_cache(config)` / `disable_cache()` / `cache_context(name)` with diffusers' cache hooks
    (FirstBlockCache, TaylorSeer, MagCache, ...); the blocks are registered for them by `import diffmoe_hf`.

    The `forward` is decorated with `returns_moe_outputs`, so every call collects its MoE layers' auxiliary losses and
    training statistics and returns them in a `MoETransformer2DModelOutput`.

    Attributes:
        routing_depends_on_batch (`bool`): Whether a sample's output depends on the other samples of the call (MoE
            routing over the tokens of the whole batch, as the capacity predictor of DiffMoE, Shi et al., does). `False` for
            per-token routing. When `True`, `ClassConditionalMoEPipeline` runs the conditional and the unconditional
            batch of classifier-free guidance as two separate calls, as the original samplers do, instead of one
            concatenated batch.
    """

    routing_depends_on_batch: bool = False

    # diffusers' model settings, the same for every family (Diff-MoE of Cheng et al. names its own block class)
    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    # one compiled graph per block class: dense and MoE blocks (see `AdaLNZeroMoETransformerBlock`)
    _repeated_blocks = ["AdaLNZeroTransformerBlock", "AdaLNZeroMoETransformerBlock"]
    # routing decisions are computed in float32 whatever the model's dtype; a family extends both lists with its
    # own routing modules
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "embedding", "router"]
    _keep_in_fp32_modules = ["router"]
    # a rank of expert parallelism loads a full checkpoint: the other ranks' experts go unused, unreported
    _keys_to_ignore_on_load_unexpected = OtherRanksExpertsUnused()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        diffusers' `from_pretrained`, after checking a local folder (`folder_checks.check_folder_matches_config`):
        a missing weights file, or a `config.json` that does not fit the weights (a hand-edited `num_layers`, another
        model's config), is refused here, naming the file, field or tensors, instead of loading a model with tensors
        left on the meta device or weights silently dropped. Any other source (a Hub repo id) is checked after
        loading: a tensor the weights gave no value is refused the same way (`check_no_tensor_left_on_meta`). The
        pipeline loaders and `diffusers.AutoModel` load the transformer through this method too.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise ValueError(
                f"{path} is a file; from_pretrained takes the model folder (the one with config.json and the weights), "
                f"e.g. {os.path.dirname(path) or '.'}."
            )
        folder = os.path.normpath(os.path.join(path, kwargs.get("subfolder") or ""))
        if os.path.isfile(os.path.join(folder, cls.config_name)):
            check_folder_matches_config(cls, folder, kwargs.get("variant"))
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if kwargs.get("device_map") is None:  # a device map may offload weights to the meta device on purpose
            check_no_tensor_left_on_meta(model, path)
        return model

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """
        (Re)initialises every parameter as the family's original code initialises a new model (adaLN-Zero: every
        block starts as the identity and the output is exactly 0) by running the class's
        `_initialize_family_weights`. Called at the end of `__init__`; a no-op for a model whose parameters are all on
        the meta device (diffusers' `from_pretrained` builds one before loading its weights).
        """
        if all(parameter.is_meta for parameter in self.parameters()):
            return
        self._initialize_family_weights()
        placement = expert_placement()
        if placement is not None and placement[0] > 0:
            self._draw_experts_for_rank(placement[0])

    def _draw_experts_for_rank(self, expert_rank: int) -> None:
        """
        Expert parallelism: every rank builds its model from the same random state, so the experts of expert rank r > 0
        would be drawn exactly as rank 0's (expert j + r E/K a copy of expert j, a model of K identical groups). The
        family's init runs again on a random stream of this rank's own (from the run's seed and the rank), and only the
        expert banks keep its values; every other tensor stays as drawn, the same on every rank.
        """
        expert_tensors = {
            id(tensor) for _, bank in expert_banks(self) for tensor in bank.state_dict(keep_vars=True).values()
        }
        shared = {
            name: tensor.clone()
            for name, tensor in self.state_dict(keep_vars=True).items()
            if id(tensor) not in expert_tensors
        }
        with torch.random.fork_rng():
            torch.manual_seed(expert_rank_seed(expert_rank))
            self._initialize_family_weights()
        self.load_state_dict(shared, strict=False)

    def _initialize_family_weights(self) -> None:
        """
        Draws every parameter as the family's original code does, from the pieces in
        `diffmoe_hf.models.initialization` (`initialize_dit`, the router inits) and the family's own. Each transformer
        class defines it: the DiT init alone is the original init of no family (each adds its routers, convolutions
        or embeddings), so there is no default.

        Raises:
            NotImplementedError: in a class that does not define it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no `_initialize_family_weights`: write its original initialisation there "
            "(see diffmoe_hf.models.initialization, e.g. `initialize_dit(self)` followed by its routers' init)."
        )

    def embed_inputs(
        self, hidden_states: torch.Tensor, timestep, class_labels
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Validates a call and embeds it.

        Returns:
            `(tokens (B, N, D), conditioning (B, D), label_embedding (B, D))`, the last being the class part of the
            conditioning (after label dropout in training mode).
        """
        timestep, class_labels = check_model_inputs(self.config, hidden_states, timestep, class_labels)
        tokens = self.pos_embed(hidden_states)
        conditioning, label_embedding = self.embedding(timestep, class_labels)
        return tokens, conditioning.to(tokens.dtype), label_embedding.to(tokens.dtype)

    def finish_moe_call(self, collector: MoECollector) -> None:
        """
        Called once per forward by `returns_moe_outputs`, after the blocks ran and the call's collector closed, with
        what the MoE layers reported. Families whose layers calibrate state in training override it (DiffMoE of Shi et al. updates
        its capacity thresholds here, so that recomputed blocks cannot apply an update twice); the default does
        nothing.
        """

    @apply_lora_scale("attention_kwargs")
    @returns_moe_outputs
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.LongTensor,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> MoETransformer2DModelOutput | tuple[torch.Tensor, ...]:
        """
        The DiT forward of every family: patch embedding, the blocks (`run_blocks`, each block given the family's
        `block_inputs`), the adaLN output layer and unpatchify.

        Args:
            hidden_states: (B, C, H, W) noisy latents (or pixels), H and W multiples of the patch size.
            timestep: (B,) or scalar model time, unscaled, in the units of the model's `config.formulation`
                (`diffmoe_hf.formulations`): the flow time in [0, 1] (`rf-noise-at-0`, `jit-xpred`: 0 = noise;
                `rf-noise-at-1`: 1 = noise) or the DDPM index 0..999 (`ddpm-learned-sigma`).
            class_labels: (B,) int64 class ids; `num_classes` is the null class.
            attention_kwargs: `{"scale": s}` scales LoRA layers.
            return_dict: Whether to return a `MoETransformer2DModelOutput`.

        Returns:
            `sample`: (B, out_channels, H, W), the formulation's prediction in the first C channels (the velocity
            `data - noise` for `rf-noise-at-0`, `noise - data` for `rf-noise-at-1`, eps for `ddpm-learned-sigma`, the
            clean image for `jit-xpred`) and, for models with 2C outputs, the learned-variance values (DDPM) or an
            untrained half. In training mode also `aux_loss` and `moe_statistics`. The layers of DiffMoE (Shi et al.;
            `routing_depends_on_batch`) route over all B samples together.
        """
        tokens, conditioning, label_embedding = self.embed_inputs(hidden_states, timestep, class_labels)
        height, width = hidden_states.shape[-2:]
        block_inputs = self.block_inputs(tokens, height, width)
        tokens = self.run_blocks(tokens, conditioning, label_embedding, block_inputs)
        output = unpatchify(
            self.proj_out(tokens, conditioning), self.config.patch_size, self.out_channels, height, width
        )
        if not return_dict:
            return (output,)
        return MoETransformer2DModelOutput(sample=output)

    def block_inputs(self, tokens: torch.Tensor, height: int, width: int) -> tuple:
        """
        What every block takes after `(tokens, conditioning)` in a call on (height, width) inputs, computed once per
        call: nothing by default; the rotary tables (and the token grid's shape) in the families that use them.
        """
        return ()

    def run_blocks(
        self, tokens: torch.Tensor, conditioning: torch.Tensor, label_embedding: torch.Tensor, block_inputs: tuple
    ) -> torch.Tensor:
        """
        (B, N, D) image tokens through every block -> (B, N, D) image tokens. A family whose blocks also see tokens
        of their own (JiT's in-context class tokens, built from the (B, D) `label_embedding`) overrides it.
        """
        for block in self.transformer_blocks:
            tokens = self.run_block(block, tokens, conditioning, *block_inputs)
        return tokens

    def run_block(self, block, tokens: torch.Tensor, *block_args) -> torch.Tensor:
        """`block(tokens, *block_args)`, recomputed in backward when gradient checkpointing is on."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, tokens, *block_args)
        return block(tokens, *block_args)

    def set_expert_backend(self, backend: str) -> None:
        """
        How every MoE layer runs its experts: `"auto"` (default: `"grouped_mm"` for bf16 on CUDA, else
        `"segment_linear"`), `"modules"` (each expert module on its tokens), `"segment_linear"`, `"grouped_mm"` or
        any backend added with `register_expert_backend`; an unknown name is a `ValueError`. A fast backend steps
        aside to `"modules"` by itself wherever the experts' weights cannot be read directly (LoRA on experts,
        layerwise casting, leaf-level group offloading, quantized weights); see
        `diffmoe_hf.models.moe.layers.expert_backends`.
        """
        set_expert_backend(self, backend)

    def enable_expert_offload(self, tier: str, offload_dir: str | None = None, memory_budget: int | None = None):
        """
        Puts the routed experts into a memory tier (`"none"`, `"cpu"`, `"disk"`, `"int8"`, `"fp8"`); attention,
        norms, embeddings, routers and shared experts stay resident. Bad input (an unknown tier, one this machine or
        the installed libraries cannot provide, an unwritable or too small `offload_dir`, a `memory_budget` in bytes
        that cannot be met) is an error before anything changes. Returns the `ExpertMemoryPlan`; see
        `diffmoe_hf.models.moe.offload.tiers.enable_expert_offload`.
        """
        from .moe.offload import enable_expert_offload

        return enable_expert_offload(self, tier, offload_dir, memory_budget)
