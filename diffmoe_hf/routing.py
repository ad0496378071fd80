"""Recording which experts the MoE layers of a diffmoe_hf transformer use, for any family.

    from diffmoe_hf.routing import record_routing

    with record_routing(pipe.transformer) as routing:
        pipe(class_labels=[207, 360], num_inference_steps=10)
    for name, layer in routing.items():
        print(name, layer.load(), layer.imbalance())   # token share per expert, max share * E
    routing["transformer_blocks.3.ff"].expert_ids[0]    # (S, k) expert ids of each token in the first call

A MoE layer is a module with a `router` sub-module that has `num_experts`; the routing is read from the router's
output by a forward hook, in every mode (training, eval, pipelines), without any state on the modules:

- token-choice routers (DSMoE, JiTMoE, DiT-MoE, Diff-MoE of Cheng et al.) return `(expert_ids (S, k), expert_weights (S, k))`; every
  call's ids are kept (on the model's device) and counted.
- expert-choice routers (DiffMoE by Shi et al.) return the `ExpertSegments` of the experts' choices over the whole
  batch; every call's selection is kept (`selections`) and counted.

Counts are per process; in data-parallel training each rank sees its own batch.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .models.moe import ExpertSegments


@dataclass
class LayerRouting:
    """
    The routing one MoE layer did while recording.

    Attributes:
        name: Module path of the MoE layer in the model (e.g. `"transformer_blocks.3.ff"`).
        num_experts: Routed experts E.
        counts: (E,) int64 (token, expert) assignments per expert, summed over all recorded calls.
        expert_ids: For token-choice layers, the (S, k) int64 expert ids of each call, in call order (S tokens =
            batch * sequence, flattened batch-major); empty for expert-choice layers.
        selections: For expert-choice layers, `(selection, S)` of each call in call order: the `ExpertSegments` the
            router returned (`token_index` into the S flattened tokens, `expert_index`, detached `weights`: the
            router scores) and the number of tokens S of the call; empty for token-choice layers.
        calls: Number of recorded forward calls.
    """

    name: str
    num_experts: int
    counts: torch.Tensor
    expert_ids: list[torch.Tensor] = field(default_factory=list)
    selections: list[tuple[ExpertSegments, int]] = field(default_factory=list)
    calls: int = 0

    def load(self) -> torch.Tensor:
        """(E,) float32 share of the assignments each expert received (sums to 1; zeros before any call)."""
        counts = self.counts.float().cpu()
        total = counts.sum()
        return counts / total if total > 0 else counts

    def imbalance(self) -> float:
        """Largest expert share times E: 1.0 is perfectly balanced, E means every token went to one expert."""
        return float(self.load().max()) * self.num_experts

    def unused_experts(self) -> int:
        """Number of experts that received no token."""
        return int((self.counts == 0).sum())

    def top_experts(self, call: int) -> torch.Tensor:
        """
        (S,) int64 expert of each token of the `call`-th kept call: a token-choice layer's first choice; for an
        expert-choice layer the highest-scoring of the experts that took the token, -1 where none did.
        """
        if not self.selections:
            return self.expert_ids[call][:, 0]
        selection, num_tokens = self.selections[call]
        scores = torch.full((num_tokens, self.num_experts), float("-inf"), device=selection.token_index.device)
        scores[selection.token_index, selection.expert_index] = selection.weights.float()
        best, top_expert = scores.max(dim=1)
        return torch.where(best > float("-inf"), top_expert, -1)


class RoutingRecord(dict):
    """`{layer name: LayerRouting}` in model order, filled while `record_routing` is active."""

    def summary(self, prefix: str = "routing/", per_expert: bool = False) -> dict[str, float]:
        """
        Flat per-layer statistics for a tracker (`accelerator.log`): `<prefix><layer>/imbalance`, `/max_share`,
        `/min_share`, `/unused_experts` (and with `per_expert` each expert's token share, `/expert_<e>`), plus
        `<prefix>mean_imbalance` and `<prefix>max_imbalance` over layers. Layers that were not called are skipped.
        """
        stats, imbalances = {}, []
        for name, layer in self.items():
            if layer.calls == 0:
                continue
            load = layer.load()
            imbalances.append(layer.imbalance())
            stats[f"{prefix}{name}/imbalance"] = imbalances[-1]
            stats[f"{prefix}{name}/max_share"] = float(load.max())
            stats[f"{prefix}{name}/min_share"] = float(load.min())
            stats[f"{prefix}{name}/unused_experts"] = float(layer.unused_experts())
            if per_expert:
                stats.update({f"{prefix}{name}/expert_{e}": float(share) for e, share in enumerate(load)})
        if imbalances:
            stats[f"{prefix}mean_imbalance"] = sum(imbalances) / len(imbalances)
            stats[f"{prefix}max_imbalance"] = max(imbalances)
        return stats

    def expert_shares(self) -> dict[str, list[float]]:
        """`{layer name: [share of expert 0, ..., share of expert E-1]}` for the layers that were called."""
        return {name: layer.load().tolist() for name, layer in self.items() if layer.calls}


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE layers of `model` that `record_routing` understands, by module path (a DDP `module.` prefix dropped)."""
    layers = {}
    for name, module in model.named_modules():
        name = name.removeprefix("module.")
        router = getattr(module, "router", None)
        if isinstance(router, nn.Module) and hasattr(router, "num_experts"):
            layers[name] = module
    return layers


@contextmanager
def record_routing(model: nn.Module, keep_expert_ids: bool = True) -> Iterator[RoutingRecord]:
    """
    Records the routing of every MoE layer of `model` while the context is active (forward hooks, removed on exit).

    Args:
        model: A diffmoe_hf transformer (or any module containing its MoE layers, e.g. a DDP wrapper).
        keep_expert_ids: Keep each call's expert ids (token-choice layers) or selection (expert-choice layers);
            `False` only counts them (what a training loop logging the expert load needs).

    Yields:
        A `RoutingRecord` mapping layer names to `LayerRouting`; it keeps its contents after the context exits.
    """
    record, handles = RoutingRecord(), []
    for name, layer in moe_layers(model).items():
        counts = torch.zeros(layer.num_experts, dtype=torch.long)
        entry = LayerRouting(name=name, num_experts=layer.num_experts, counts=counts)
        record[name] = entry
        handles.append(layer.router.register_forward_hook(_routing_hook(entry, keep_expert_ids)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _routing_hook(entry: LayerRouting, keep_expert_ids: bool):
    def hook(module, inputs, output):
        if isinstance(output, ExpertSegments):
            selection = output._replace(weights=output.weights.detach())
            counts = torch.diff(selection.offsets, prepend=selection.offsets.new_zeros(1)).long()
            if keep_expert_ids:
                entry.selections.append((selection, inputs[0].shape[0]))
        else:
            expert_ids = output[0].detach()
            counts = torch.bincount(expert_ids.reshape(-1), minlength=entry.num_experts)
            if keep_expert_ids:
                entry.expert_ids.append(expert_ids)
        entry.counts = entry.counts.to(counts.device) + counts
        entry.calls += 1

    return hook
