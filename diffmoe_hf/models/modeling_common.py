"""Forward pieces every DiT-style family shares; each family's `forward` composes them around its own blocks."""

import diffusers
import torch
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from packaging import version

from .blocks import unpatchify
from .initialization import initialize_weights
from .moe import set_expert_backend
from .validation import check_model_inputs


def preset_config(family: str, presets: dict[str, dict], name: str, *defaults: dict) -> dict:
    """
    Constructor arguments of preset `name` of `presets`, on top of the family-wide `defaults` (later dicts win).

    Raises:
        ValueError: naming the family and the available presets when `name` is not one of them.
    """
    if name not in presets:
        raise ValueError(f"Unknown {family} preset {name!r}; available: {', '.join(presets)}.")
    merged = {}
    for config in (*defaults, presets[name]):
        merged.update(config)
    return merged


class DiTForwardMixin(CacheMixin):
    """
    For transformers with `pos_embed` (patch embedding), `embedding` (`TimestepClassEmbedding`),
    `transformer_blocks`, `proj_out` (`PatchOutputLayer`) and `gradient_checkpointing`.

    `CacheMixin` gives `enable_cache(config)` / `disable_cache()` / `cache_context(name)` with diffusers' cache hooks
    (FirstBlockCache, TaylorSeer, MagCache, ...); the blocks are registered for them by `import diffmoe_hf`.
    """

    def enable_cache(self, config) -> None:
        """
        Enables a diffusers cache (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`, ...) on this
        transformer; see `diffusers.models.cache_utils.CacheMixin.enable_cache`.

        Raises:
            ValueError: for a cache that cannot handle a model adding tokens after its first block (JiT with in-context
                class tokens, `in_context_start > 0`): FirstBlockCache (it subtracts block outputs of different token
                counts), and MagCache before diffusers 0.42 (which first matched the residual to the image tokens).
        """
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

        if self.config.get("in_context_len", 0) and self.config.get("in_context_start", 0):
            refused = isinstance(config, FirstBlockCacheConfig)
            refused |= isinstance(config, MagCacheConfig) and version.parse(diffusers.__version__) < version.parse(
                "0.42.0"
            )
            if refused:
                raise ValueError(
                    f"{type(config).__name__} (diffusers {diffusers.__version__}) cannot run on this "
                    f"{type(self).__name__}: it prepends {self.config.in_context_len} class tokens before block "
                    f"{self.config.in_context_start}, so its first and last blocks return different token counts. Use "
                    "TaylorSeerCacheConfig (or MagCacheConfig with diffusers >= 0.42) instead."
                )
        super().enable_cache(config)

    def initialize_weights(self) -> None:
        """
        (Re)initialises every parameter as the family's original code initialises a new model (adaLN-Zero: every
        block starts as the identity and the output is exactly 0); see `diffmoe_hf.models.initialization`. Called at
        the end of `__init__`; a no-op while diffusers' `from_pretrained` builds a model whose weights it loads.
        """
        initialize_weights(self)

    def embed_inputs(
        self, hidden_states: torch.Tensor, timestep, class_labels
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Validates a call and embeds it.

        Returns:
            `(tokens (B, N, D), conditioning (B, D), timestep (B,), class_labels (B,))`.
        """
        timestep, class_labels = check_model_inputs(self.config, hidden_states, timestep, class_labels)
        tokens = self.pos_embed(hidden_states)
        return tokens, self.embedding(timestep, class_labels).to(tokens.dtype), timestep, class_labels

    def run_block(self, block, tokens: torch.Tensor, *block_args) -> torch.Tensor:
        """`block(tokens, *block_args)`, recomputed in backward when gradient checkpointing is on."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, tokens, *block_args)
        return block(tokens, *block_args)

    def patch_output(
        self, tokens: torch.Tensor, conditioning: torch.Tensor, height: int, width: int, out_channels: int,
        return_dict: bool,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:  # fmt: skip
        """(B, N, D) image tokens -> (B, out_channels, height, width) through the output layer and unpatchify."""
        output = unpatchify(self.proj_out(tokens, conditioning), self.config.patch_size, out_channels, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def set_expert_backend(self, backend: str) -> None:
        """
        How every MoE layer runs its experts: `"auto"` (default: `"grouped_mm"` for bf16 on CUDA, else
        `"segment_linear"`), `"modules"` (each expert module on its tokens), `"segment_linear"` or `"grouped_mm"`. A
        fast backend steps aside to `"modules"` by itself wherever the experts' weights cannot be read directly
        (LoRA on experts, layerwise casting, leaf-level group offloading, quantized weights); see
        `diffmoe_hf.models.moe.backends`.
        """
        set_expert_backend(self, backend)
