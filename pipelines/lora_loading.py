"""LoRA weights of `ClassConditionalMoEPipeline`: the transformer is its only LoRA-able component.

`TransformerLoraLoaderMixin` adds to diffusers' generic `LoraBaseMixin` (which gives `unload_lora_weights`,
`set_adapters`, `enable_lora`/`disable_lora`, `delete_adapters`, `get_active_adapters`, ...) the five methods that
depend on the components: `lora_state_dict`, `load_lora_weights`, `save_lora_weights`, `fuse_lora` and `unfuse_lora`.
The file format is diffusers' (`pytorch_lora_weights.safetensors`, keys prefixed `transformer.`, the `LoraConfig` in
the safetensors metadata), so files saved by other diffusers transformer-only pipelines load the same way. The
adapter itself is loaded by the transformer (`PeftAdapterMixin.load_lora_adapter`).
"""

import logging
import os

import torch

# from their modules: diffusers.loaders exports the LoRA classes only when transformers (not a core dependency) is
# installed. `_fetch_state_dict` (the file lookup every diffusers LoRA mixin uses) and the default of
# `low_cpu_mem_usage` have the same form from diffusers 0.37 (core floor) to 0.42.
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA


logger = logging.getLogger(__name__)

TRANSFORMER = "transformer"


class TransformerLoraLoaderMixin(LoraBaseMixin):
    """LoRA loading, saving and fusing for a pipeline whose only LoRA-able component is `transformer`."""

    _lora_loadable_modules = [TRANSFORMER]
    transformer_name = TRANSFORMER

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        weight_name: str | None = None,
        use_safetensors: bool | None = None,
        return_lora_metadata: bool = False,
        **hub_kwargs,
    ):
        """
        The LoRA tensors of a local folder, a Hub repo (its `pytorch_lora_weights.safetensors`, or `weight_name`) or
        a state dict, keys as saved (`transformer.`-prefixed). DoRA's `dora_scale` tensors are dropped (diffusers
        cannot load them).

        Args:
            pretrained_model_name_or_path_or_dict: Folder, repo id or `{key: tensor}`.
            weight_name: The file in the folder or repo, when it is not the default name.
            use_safetensors: `True` reads only safetensors; `None` (default) also falls back to a pickled `.bin`.
            return_lora_metadata: Also return the adapter metadata (the `LoraConfig` the file was saved with).
            hub_kwargs: `cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`, `revision`,
                `subfolder`, as for `from_pretrained`.

        Returns:
            The state dict, or `(state dict, metadata or None)` with `return_lora_metadata`.
        """
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=hub_kwargs.pop("local_files_only", None),
            cache_dir=hub_kwargs.pop("cache_dir", None),
            force_download=hub_kwargs.pop("force_download", False),
            proxies=hub_kwargs.pop("proxies", None),
            token=hub_kwargs.pop("token", None),
            revision=hub_kwargs.pop("revision", None),
            subfolder=hub_kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        if hub_kwargs:
            raise TypeError(f"lora_state_dict() got unexpected keyword arguments {sorted(hub_kwargs)}.")
        if any("dora_scale" in key for key in state_dict):
            logger.warning("Dropping the `dora_scale` tensors of this LoRA file: diffusers cannot load DoRA weights.")
            state_dict = {key: value for key, value in state_dict.items() if "dora_scale" not in key}
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT_LORA,
        **kwargs,
    ) -> None:
        """
        Loads LoRA weights (see `lora_state_dict` for where from and `kwargs`) into the transformer as adapter
        `adapter_name` (default: the next free `default_<n>`), or in place of an existing one with `hotswap`.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):  # the caller's dict stays as it is
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key for key in state_dict):
            raise ValueError("Not a LoRA file: every tensor name of a LoRA checkpoint contains 'lora'.")
        getattr(self, self.transformer_name).load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor],
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """
        Writes the transformer's LoRA tensors (`peft.utils.get_peft_model_state_dict(transformer)`) to
        `save_directory` in diffusers' format, with the adapter's `LoraConfig` as metadata
        (`diffusers.training_utils._collate_lora_metadata({"transformer": transformer})` gives that keyword).
        """
        if not transformer_lora_layers:
            raise ValueError("transformer_lora_layers is empty: there are no LoRA weights to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merges the active adapters (or `adapter_names`), scaled by `lora_scale`, into the transformer's weights."""
        super().fuse_lora(
            components=components or [self.transformer_name],
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Takes fused adapters back out of the transformer's weights."""
        super().unfuse_lora(components=components or [self.transformer_name], **kwargs)
