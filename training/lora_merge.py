"""What a LoRA run changes besides its adapter: parameters trained in full (a resized class embedding, routers) and
buffers that training moves (the capacity thresholds of DiffMoE of Shi et al.), kept in the run's checkpoints so that
a resumed run continues exactly; and the final model with the adapter merged.

A LoRA adapter alone cannot carry them: the class table of a model with new classes has another shape than the base
model's, so `load_lora_weights` on the base model cannot give the fine-tuned model. Such a run saves the whole pipeline
(adapter merged into the weights) instead, which `DiffusionPipeline.from_pretrained` loads.
"""

import copy
import os

import torch
from safetensors.torch import load_file, save_file


STATE_FILE = "non_lora_state.safetensors"


def fully_trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of a LoRA-adapted `model` trained in full (requiring grad, not of an adapter), by name."""
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and "lora_" not in name
    }


def non_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`fully_trained_parameters(model)` and the persistent buffers of the LoRA-adapted `model`, by name."""
    persistent = model.state_dict(keep_vars=True)
    buffers = {name: buffer for name, buffer in model.named_buffers() if name in persistent}
    return {**fully_trained_parameters(model), **buffers}


def save_non_lora_state(model: torch.nn.Module, folder: str) -> None:
    """Writes `non_lora_state(model)` to `folder/non_lora_state.safetensors` (nothing when it is empty)."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in non_lora_state(model).items()}
    if tensors:
        save_file(tensors, os.path.join(folder, STATE_FILE))


def load_non_lora_state(model: torch.nn.Module, folder: str) -> None:
    """
    Restores what `save_non_lora_state` wrote into `folder` (a checkpoint of the same run).

    Raises:
        `ValueError` when the file is missing or does not hold exactly the tensors of `non_lora_state(model)`.
    """
    expected = non_lora_state(model)
    if not expected:
        return
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {STATE_FILE}: it is no checkpoint of a LoRA run.")
    saved = load_file(path)
    if set(saved) != set(expected) or any(saved[n].shape != p.shape for n, p in expected.items()):
        raise ValueError(
            f"{path} holds other tensors than this run trains in full or keeps as buffers ({', '.join(sorted(expected)[:3])}, ...): "
            "resume with the options the checkpoint was written with."
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(saved[name])


def merged_lora_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """
    A float32 copy of the LoRA-adapted `model` (diffusers `add_adapter`, adapter "default") with the adapter merged
    into its weights and removed: a plain model of its class. `state_dict` (the adapted model's full state, e.g.
    gathered from sharded processes) replaces `model`'s own.
    """
    merged = type(model).from_config(model.config)
    merged.add_adapter(copy.deepcopy(model.peft_config["default"]))
    state = state_dict if state_dict is not None else model.state_dict()
    merged.load_state_dict({name: tensor.cpu() for name, tensor in state.items()})  # cast to the copy's float32
    merged.fuse_lora()
    merged.unload_lora()
    return merged
