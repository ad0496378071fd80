"""Checks expert parallelism against one process; run by tests/test_expert_parallel.py as
`torchrun --standalone --nproc_per_node W -m tests.expert_parallel_worker <report.json> <K> [<K> ...]` (gloo, CPU).

For every registered family (its first tiny configuration, label dropout off) and every expert-parallel size K, each
rank holds the single-process reference model and an expert-parallel copy with only its own experts (loaded from the
reference's state dict by global names) and compares, for its own 2 of the global batch's 2 W samples:

- eval mode: the output; for Diff-MoE (Cheng et al.) with a hook on every local expert projection, so that the
  experts run through the `"modules"` fallback on the per-row conditioning they received;
- training mode: the output, the routing and the routing statistics (exactly), the auxiliary loss, and after a
  backward of `mean over samples of sum(output * probe) + aux_loss` (non-expert gradients averaged over the ranks as DDP does, expert
  gradients by `reduce_expert_gradients`) the gradient of every parameter, then the global gradient norm and clipping
  (`clip_grad_norm_`).

The reference runs the global batch in one call. DiffMoE (Shi et al.) routes over the samples of its call, and under
expert parallelism each rank selects among its own tokens as a data-parallel run of the original does, so its
reference is the single-process model on each rank's samples in turn (losses averaged, statistics summed; the mean
capacity quantile). Rank 0 writes the checks it ran to the report.

Checkpoints: after its checks at the first size, the DiT-MoE model takes one AdamW step and saves model and optimizer
(`save_expert_parallel_checkpoint`); at every later size a fresh model and optimizer load it and must hold exactly
the tensors of a single-process model loaded from it (resharding, K = 1 included).
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

from diffmoe_hf.families import get_family
from diffmoe_hf.parallel import (
    build_expert_parallel_model,
    clip_grad_norm_,
    expert_parallel_mesh,
    expert_parameter_names,
    load_expert_parallel_checkpoint,
    load_local_state_dict,
    reduce_expert_gradients,
    save_expert_parallel_checkpoint,
)
from diffmoe_hf.routing import record_routing

from .helpers import (
    assert_float32_close,
    expert_banks,
    float32_tolerance,
    model_float32_tolerance,
    model_inputs,
    registered_families,
    tiny_model,
)


SAMPLES_PER_RANK = 2
RESHARDED_FAMILY = "dit-moe"
CONFIG = dict(class_dropout_prob=0.0)


def samples(tensor: torch.Tensor, rank: int, per_sample: int = 1) -> torch.Tensor:
    """Rank `rank`'s rows of a batch-major tensor with `per_sample` rows per sample."""
    rows = SAMPLES_PER_RANK * per_sample
    return tensor[rank * rows : (rank + 1) * rows]


def objective(output, probe: torch.Tensor) -> torch.Tensor:
    """
    Mean over samples of `sum(sample * probe)`, plus the auxiliary loss (if any): every output value and the auxiliary
    loss reach the gradients, at a scale (gradients of order 1) where the float32 bound is tight.
    """
    loss = (output.sample * probe).flatten(1).sum(1).mean()
    return loss if output.aux_loss is None else loss + output.aux_loss


def routing_of(record) -> dict[str, torch.Tensor]:
    """The one call's routing per layer: sorted (S, k) expert ids, or DiffMoE's (2, R) (token, expert) selection."""
    routing = {}
    for name, layer in record.items():
        if layer.expert_ids:
            routing[name] = layer.expert_ids[0].sort(-1).values
        else:
            selection, _ = layer.selections[0]
            routing[name] = torch.stack([selection.token_index, selection.expert_index])
    return routing


def reference_results(model, inputs: dict, probe: torch.Tensor, world_size: int) -> list[dict]:
    """Per rank: the reference's eval and training outputs, routing, statistics, aux loss, and the gradients."""
    per_call = model.routing_depends_on_batch
    calls = [{k: samples(v, r) for k, v in inputs.items()} for r in range(world_size)] if per_call else [inputs]
    probes = [samples(probe, r) for r in range(world_size)] if per_call else [probe]
    with torch.no_grad():
        eval_outputs = [model.eval()(**call).sample for call in calls]
    model.train()
    results, losses = [], []
    for call, call_probe in zip(calls, probes):
        with record_routing(model) as record:
            output = model(**call)
        losses.append(objective(output, call_probe))
        results.append(
            dict(
                eval=eval_outputs[len(results)],
                train=output.sample.detach(),
                routing=routing_of(record),
                statistics=output.moe_statistics,
                aux_loss=None if output.aux_loss is None else output.aux_loss.detach(),
            )
        )
    torch.stack(losses).mean().backward()
    if per_call:
        for name, stats in results[0]["statistics"].items():
            for kind in stats:
                values = torch.stack([result["statistics"][name][kind] for result in results])
                stats[kind] = values.sum(0) if kind == "tokens_per_expert" else values.mean(0)
        results[0]["aux_loss"] = torch.stack([result["aux_loss"] for result in results]).mean()
        return [
            {**result, "statistics": results[0]["statistics"], "aux_loss": results[0]["aux_loss"]}
            for result in results
        ]
    single = results[0]
    tokens_per_sample = next(iter(single["routing"].values())).shape[0] // probe.shape[0]
    return [
        {
            **single,
            "eval": samples(single["eval"], r),
            "train": samples(single["train"], r),
            "routing": {name: samples(ids, r, tokens_per_sample) for name, ids in single["routing"].items()},
        }
        for r in range(world_size)
    ]


def check_global_clipping(model, mesh, reference, distance_bound: float, family: str) -> None:
    """`clip_grad_norm_` of the expert-parallel model: its norm is the reference's global norm (the l2 distance of
    the gradients, `distance_bound`, bounds the difference of their norms), and it scales every rank's gradients, the
    experts' too, so that their global norm becomes `max_norm`."""
    wanted = float(torch.nn.utils.get_total_norm([parameter.grad for parameter in reference.parameters()]))
    max_norm = wanted / 2
    norm = float(clip_grad_norm_(model, mesh, max_norm))
    assert abs(norm - wanted) <= distance_bound, f"{family}: global gradient norm {norm}, single process {wanted}"
    elements = sum(parameter.numel() for parameter in reference.parameters())
    clipped = float(clip_grad_norm_(model, mesh, math.inf))  # only measures
    assert abs(clipped - max_norm) <= float32_tolerance(torch.tensor(max_norm), elements), f"{family}: {clipped}"


def check_family(family: str, mesh, rank: int, world_size: int, checkpoint: str | None = None) -> dict:
    """The checks of the module docstring; with `checkpoint`, also one AdamW step saved there (see `main`)."""
    reference = tiny_model(family, **CONFIG)
    model = build_expert_parallel_model(lambda: get_family(family).tiny_model(**CONFIG), mesh)
    load_local_state_dict(model, reference.state_dict())
    banks = expert_banks(model)
    inputs = model_inputs(reference, SAMPLES_PER_RANK * world_size)
    local = {k: samples(v, rank) for k, v in inputs.items()}
    with torch.no_grad():
        shape = reference.eval()(**inputs).sample.shape
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    expected = reference_results(reference, inputs, probe, world_size)[rank]
    tolerance = model_float32_tolerance(reference, expected["eval"])

    hooks, calls = [], []
    if family == "spatial-temporal-moe":
        hooks = [p.register_forward_hook(lambda *_: calls.append(1)) for bank in banks for p in bank.projections()]
    with torch.no_grad():
        assert_float32_close(model.eval()(**local).sample, expected["eval"], tolerance, f"{family} eval")
    for hook in hooks:
        hook.remove()
    assert bool(calls) == bool(hooks), f"{family}: the hooked projections were not called"

    with record_routing(model.train()) as record:
        output = model(**local)
    assert_float32_close(output.sample, expected["train"], tolerance, f"{family} training output")
    routing = routing_of(record)
    assert routing.keys() == expected["routing"].keys()
    for name, ids in routing.items():
        assert torch.equal(ids, expected["routing"][name]), f"{family} {name}: routing differs"
    for name, stats in expected["statistics"].items():
        assert torch.equal(output.moe_statistics[name]["tokens_per_expert"], stats["tokens_per_expert"]), name
        if "capacity_quantile" in stats:
            assert_float32_close(
                output.moe_statistics[name]["capacity_quantile"], stats["capacity_quantile"], tolerance
            )
    tokens = expected["train"].numel() // expected["train"].shape[1] * world_size  # weight gradients sum over them
    if expected["aux_loss"] is None:
        assert output.aux_loss is None, family
    else:
        aux_tolerance = model_float32_tolerance(reference, expected["aux_loss"], tokens)
        assert_float32_close(output.aux_loss, expected["aux_loss"], aux_tolerance, f"{family} aux loss")

    objective(output, samples(probe, rank)).backward()
    experts = set(expert_parameter_names(model))
    for name, parameter in model.named_parameters():
        if name not in experts:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size
    reduce_expert_gradients(model, mesh)
    gradients = dict(reference.named_parameters())
    squared_tolerances = 0.0  # bound on the squared l2 distance of all gradients together
    for name, parameter in model.named_parameters():
        wanted = gradients[name].grad
        tolerance = model_float32_tolerance(reference, wanted, tokens, calls=2)
        assert_float32_close(parameter.grad, wanted, tolerance, f"{family} gradient of {name}")
        squared_tolerances += wanted.numel() * tolerance**2
    check_global_clipping(model, mesh, reference, math.sqrt(squared_tolerances), family)
    if checkpoint is not None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizer.step()
        save_expert_parallel_checkpoint(checkpoint, model, optimizer)
    held = sorted(int(e) for bank in banks for e in bank.expert_ids)
    return dict(
        family=family,
        expert_parallel_size=mesh.expert_size,
        experts_held=len(held) // len(banks),
        experts_per_layer=banks[0].num_experts,
        parameters_compared=len(list(model.parameters())),
        modules_fallback=bool(hooks),
    )


def check_resharding(family: str, mesh, checkpoint: str) -> None:
    """
    Loads the checkpoint saved at another expert-parallel size into this size's model and optimizer and into a
    single-process model and optimizer (K = 1): every tensor this rank holds equals the single-process one exactly,
    and the saved step is there (the experts moved away from the reference weights).
    """
    reference = tiny_model(family, **CONFIG)
    single = tiny_model(family, **CONFIG)
    single_optimizer = torch.optim.AdamW(single.parameters(), lr=1e-2)
    load_expert_parallel_checkpoint(checkpoint, single, single_optimizer)
    model = build_expert_parallel_model(lambda: get_family(family).tiny_model(**CONFIG), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_expert_parallel_checkpoint(checkpoint, model, optimizer)
    full, full_parameters = single.state_dict(), dict(single.named_parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full[name]), f"{family} {name} after resharding"
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state[parameter].items():
            assert torch.equal(value, single_optimizer.state[full_parameters[name]][key]), f"{name} {key}"
    moved = [name for name, tensor in reference.state_dict().items() if not torch.equal(tensor, full[name])]
    assert any(".experts." in name for name in moved), f"{family}: the checkpoint holds no step"


def main(report: str, sizes: list[int]) -> None:
    """`sizes[0]` saves a DiT-MoE checkpoint (after one AdamW step) that every other size loads (`check_resharding`)."""
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    checkpoint = os.path.join(os.path.dirname(report), "checkpoint")
    checks = []
    for index, size in enumerate(sizes):
        mesh = expert_parallel_mesh(size)
        for family in registered_families():
            saves = index == 0 and family == RESHARDED_FAMILY
            checks.append(check_family(family, mesh, rank, world_size, checkpoint if saves else None))
        if index > 0:
            check_resharding(RESHARDED_FAMILY, mesh, checkpoint)
            checks[-1]["loaded_checkpoint_of_size"] = sizes[0]
    if rank == 0:
        with open(report, "w") as f:
            json.dump(dict(world_size=world_size, checks=checks), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [int(size) for size in sys.argv[2:]])
