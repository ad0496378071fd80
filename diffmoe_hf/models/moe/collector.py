"""How MoE layers hand their auxiliary losses and training statistics to the caller, without keeping them on modules.

A model's forward opens one `MoECollector` for the call (`with MoECollector() as collector:`); while it is open, the
MoE layers called on this thread find it with `active_moe_collector()` and report into it:

    collector = active_moe_collector()
    if collector is not None:
        collector.add_aux_loss(loss)                                    # with its autograd graph
        collector.add_statistics(self, tokens_per_expert=counts)        # detached per-layer tensors

The diffmoe_hf transformers return what was collected in their output (`MoETransformer2DModelOutput.aux_loss` and
`.moe_statistics`). A layer called outside an open collector computes the same output and reports nothing. This is
also what makes gradient checkpointing safe: a checkpointed block is recomputed during the backward pass, after the
model's forward has closed its collector, so the recomputation reports nothing and changes nothing.

Layers only report in training mode, so an eval-mode forward (sampling, `torch.compile`d blocks) never touches the
collector. To see the routing of any call, eval mode included, hook the routers' outputs
(`diffmoe_hf.routing.record_routing`).
"""

import threading

import torch
from torch import nn


_open_collectors = threading.local()


def active_moe_collector() -> "MoECollector | None":
    """The innermost `MoECollector` open on this thread, or `None` outside any model call."""
    stack = getattr(_open_collectors, "stack", None)
    return stack[-1] if stack else None


class MoECollector:
    """
    What the MoE layers of one call report besides their output.

    Attributes:
        aux_losses: Scalar auxiliary losses in report order, each with its autograd graph (the routers' load-balancing
            losses, the capacity-predictor losses of DiffMoE, Shi et al.).
        statistics: `{reporting module: {statistic name: tensor}}` in report order. The statistics are detached:
            `tokens_per_expert` (E,) int64 (token, expert) assignments per expert (every MoE layer in training mode);
            `capacity_quantile` (E,) float32, the probability the thresholds of DiffMoE (Shi et al.) move towards (see
            `DynamicTokenMoE`).
    """

    def __init__(self):
        self.aux_losses: list[torch.Tensor] = []
        self.statistics: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> "MoECollector":
        if not hasattr(_open_collectors, "stack"):
            _open_collectors.stack = []
        _open_collectors.stack.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        stack = _open_collectors.stack
        if not stack or stack[-1] is not self:
            raise RuntimeError("MoECollector contexts must be closed in the reverse order they were opened.")
        stack.pop()

    def add_aux_loss(self, loss: torch.Tensor) -> None:
        """Adds a scalar loss (keep its graph: the caller adds it to the training objective)."""
        self.aux_losses.append(loss)

    def add_statistics(self, module: nn.Module, **statistics: torch.Tensor) -> None:
        """Records `statistics` of `module`'s call (detached). A module called twice in one call raises."""
        entry = self.statistics.setdefault(module, {})
        repeated = entry.keys() & statistics.keys()
        if repeated:
            raise RuntimeError(
                f"{type(module).__name__} reported {sorted(repeated)} twice in one collector: a MoE layer may run once "
                "per model call."
            )
        entry.update({name: value.detach() for name, value in statistics.items()})

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the reported auxiliary losses, or `None` when none was reported (eval mode, losses disabled)."""
        return torch.stack(self.aux_losses).sum() if self.aux_losses else None

    def named_statistics(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """
        `statistics` keyed by the MoE layer's module path in `model` (e.g. `"transformer_blocks.3.ff"`; a router's
        report is filed under its layer, the path without `.router`), in model order.
        """
        named, remaining = {}, len(self.statistics)
        for name, module in model.named_modules():
            if remaining == 0:  # eval-mode calls report nothing: no walk over the model at all
                break
            if module in self.statistics:
                named.setdefault(name.removesuffix(".router"), {}).update(self.statistics[module])
                remaining -= 1
        return named
