"""Input checks shared by the transformers' `forward` (cheap shape checks only: nothing that syncs with the device)."""

import torch


def check_model_inputs(
    config, hidden_states: torch.Tensor, timestep, class_labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Validates a transformer call and broadcasts its conditioning to the batch.

    Args:
        config: the model config (`in_channels`, `patch_size`).
        hidden_states: (B, C, H, W).
        timestep: scalar, (1,) or (B,) model time.
        class_labels: (B,) integer class ids.

    Returns:
        `(timestep, class_labels)` as (B,) tensors on the input's device.
    """
    if hidden_states.ndim != 4:
        raise ValueError(
            f"hidden_states must be (batch, channels, height, width), got shape {tuple(hidden_states.shape)}."
        )
    batch_size, channels, height, width = hidden_states.shape
    if channels != config.in_channels:
        raise ValueError(
            f"hidden_states has {channels} channels but the model takes in_channels={config.in_channels}."
        )
    patch = config.patch_size
    if height % patch or width % patch:
        raise ValueError(f"Height and width ({height}x{width}) must be multiples of the patch size {patch}.")
    timestep = torch.as_tensor(timestep, device=hidden_states.device)
    if timestep.ndim > 1 or timestep.numel() not in (1, batch_size):
        raise ValueError(f"timestep must be a scalar or have shape ({batch_size},), got {tuple(timestep.shape)}.")
    timestep = timestep.reshape(-1).expand(batch_size)
    class_labels = torch.as_tensor(class_labels, device=hidden_states.device)
    if class_labels.shape != (batch_size,) or class_labels.is_floating_point():
        raise ValueError(
            f"class_labels must be {batch_size} integer class ids (shape ({batch_size},)), got a "
            f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}."
        )
    return timestep, class_labels
