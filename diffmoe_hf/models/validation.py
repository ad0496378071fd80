"""Checks shared by the transformers: of their config (`check_model_config`, in every constructor) and of a `forward`
call's inputs (`check_model_inputs`: cheap shape checks only, nothing that syncs with the device)."""

import math
import numbers
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ConfigRule:
    """What a config field of the transformers takes: a whole (`whole`) or real number from `low` to `high` (`None`:
    unbounded; `low_open` / `high_open` exclude the bound itself), or also None where `optional`."""

    whole: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def problem(self, value) -> str | None:
        """Why `value` does not fit the rule (e.g. "must be a whole number >= 1"), or None."""
        if value is None and self.optional:
            return None
        expected = f"must be {'a whole' if self.whole else 'a finite'} number{self._range()}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return expected
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return expected if not math.isfinite(value) or below or above else None

    def _range(self) -> str:
        if self.high is not None:
            text = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f" {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = ""
        return text + (" (or None)" if self.optional else "")


_SIZE, _COUNT = ConfigRule(whole=True, low=1), ConfigRule(whole=True, low=0)
_POSITIVE, _WEIGHT = ConfigRule(whole=False, low=0, low_open=True), ConfigRule(whole=False, low=0)

# every numeric config field of the five families and what it takes; a family checks the fields it has
CONFIG_RULES = {
    "sample_size": _SIZE,
    "patch_size": _SIZE,
    "in_channels": _SIZE,
    "out_channels": ConfigRule(whole=True, low=1, optional=True),
    "num_layers": _SIZE,
    "num_attention_heads": _SIZE,
    "attention_head_dim": _SIZE,
    "mlp_ratio": _POSITIVE,
    "num_classes": _SIZE,
    "class_dropout_prob": ConfigRule(whole=False, low=0, high=1),
    "num_experts": _SIZE,
    "num_experts_per_tok": _SIZE,
    "moe_intermediate_size": _SIZE,
    "shared_expert_intermediate_size": _COUNT,
    "n_group": _SIZE,
    "topk_group": _SIZE,
    "routed_scaling_factor": _POSITIVE,
    "capacity": _POSITIVE,
    "capacity_loss_weight": _WEIGHT,
    "aux_loss_alpha": _WEIGHT,
    "modulation_rank": _SIZE,
    "bottleneck_dim": _SIZE,
    "in_context_len": _COUNT,
    "in_context_start": _COUNT,
    "noise_scale": _POSITIVE,
    "t_eps": ConfigRule(whole=False, low=0, high=1, high_open=True),
}


def check_model_config(config) -> None:
    """
    Refuses a transformer config (a constructor's arguments, `self.config`) with a field outside what it takes
    (`CONFIG_RULES`: e.g. `in_channels=0`, `capacity=nan`, `class_dropout_prob=2.0`, a size of 2.5), or
    `num_experts_per_tok` above `num_experts`, or `sample_size` not a multiple of `patch_size`, before any module is
    built. Every constructor calls it first; valid configs pass unchanged.

    Raises:
        ValueError: naming the field, its value and the valid range.
    """
    for field, rule in CONFIG_RULES.items():
        if field in config:
            problem = rule.problem(config[field])
            if problem:
                raise ValueError(f"{field}={config[field]!r} {problem}.")
    if "num_experts_per_tok" in config and config["num_experts_per_tok"] > config["num_experts"]:
        raise ValueError(
            f"num_experts_per_tok={config['num_experts_per_tok']} must be at most num_experts={config['num_experts']}."
        )
    if config["sample_size"] % config["patch_size"]:
        raise ValueError(
            f"sample_size={config['sample_size']} must be a multiple of patch_size={config['patch_size']}."
        )
