"""Whether this machine has the device a user names: one check for the CLI's `--device` and the pipeline's `.to()`,
so that `cuda` on a CPU build or a typo is a `ValueError` naming the devices there are, not torch's assertion."""

import torch


ACCELERATORS = ("cuda", "mps", "xpu")


def _has_backend(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    return backend is not None and hasattr(backend, "is_available") and backend.is_available()


def available_devices() -> list[str]:
    """`cpu` and the accelerator kinds this torch build and machine have, for messages."""
    return ["cpu"] + [f"{kind} ({kind}:0 ...)" for kind in ACCELERATORS if _has_backend(kind)]


def check_device_available(device: str | torch.device, label: str, hint: str = "") -> torch.device:
    """
    The `torch.device` `device` names, if this machine has it.

    Args:
        device: a device name (`"cuda:1"`) or `torch.device`.
        label: how the message names the argument, e.g. `"--device"`.
        hint: a sentence appended to the "no such device" message.

    Raises:
        ValueError: for a name that is no torch device, an accelerator kind this build or machine lacks (`cuda` on a
            CPU build, `mps` off a Mac) or an index beyond the machine's devices of that kind.
    """
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{label} {device!r} is not a torch device; available here: {', '.join(available_devices())}."
        ) from None
    if chosen.type == "cpu":
        return chosen
    if not _has_backend(chosen.type):
        raise ValueError(
            f"{label} {device}: this torch build or machine has no {chosen.type} device; available here: "
            f"{', '.join(available_devices())}.{' ' + hint if hint else ''}"
        )
    count = getattr(torch, chosen.type).device_count()
    if chosen.index is not None and chosen.index >= count:
        raise ValueError(f"{label} {device}: this machine has {count} {chosen.type} device(s), {chosen.type}:0 first.")
    return chosen
