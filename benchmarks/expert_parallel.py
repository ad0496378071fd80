"""
Expert parallelism (EP) against DDP, ZeRO-2 and FSDP2: memory per rank and bytes communicated per training step.

    # computed from the real models built on the meta device (no weights, no processes)
    python -m benchmarks.expert_parallel computed --output benchmarks/results/expert-parallel-computed.json
    # measured on this machine: CPU processes on gloo, DDP vs FSDP2 vs EP on an S preset
    torchrun --standalone --nproc_per_node 2 -m benchmarks.expert_parallel measured --preset DiT-MoE-S/2 \\
        --output benchmarks/results/expert-parallel-cpu-dit-moe-s2.json

Bytes communicated are the bytes one rank sends per training step (forward, backward and optimizer step), counted as
a ring implementation sends them: an all-reduce of S bytes sends 2 (W - 1) / W * S, an all-gather of S bytes in total
and a reduce-scatter of S bytes each (W - 1) / W * S, an all-to-all the rows bound for other ranks. `computed` derives
them from the parameter counts; `measured` counts them at the collectives the run calls (DDP's buckets through a
communication hook, FSDP2's and the expert-gradient collectives through `torch.distributed`, the expert-parallel
exchanges at the dispatch; an autograd exchange's backward mirrors its forward and is counted as such).
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch


FLOAT32 = 4
ADAM_STATES = 2
COMPUTED_MODELS = {
    "DiT-MoE-XL/2-8E2A": ("dit-moe", "DiT-MoE-XL/2", {}),
    "DiT-MoE-G/2-16E2A": ("dit-moe", "DiT-MoE-G/2", {"num_experts": 16}),
    "DSMoE-3B-E16": ("dsmoe", "DSMoE-3B-E16", {}),
}


def meta_model(family: str, preset: str, overrides: dict):
    """The preset's model with every parameter on the meta device (shapes only)."""
    from diffmoe_hf.families import get_family

    with torch.device("meta"):
        return get_family(family).model_class.from_preset(preset, **overrides)


def model_counts(model) -> dict:
    """Parameter counts: all, routed experts, the largest block and its non-expert part, the MoE layers' shape."""
    from diffmoe_hf.parallel.model import expert_banks

    banks = [bank for _, bank in expert_banks(model)]
    experts = sum(p.numel() for bank in banks for p in bank.parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.transformer_blocks]
    block_experts = [
        sum(p.numel() for bank in expert_banks(block) for p in bank[1].parameters())
        for block in model.transformer_blocks
    ]
    config = model.config
    return dict(
        parameters=sum(p.numel() for p in model.parameters()),
        expert_parameters=experts,
        largest_block=max(blocks),
        largest_block_without_experts=max(b - e for b, e in zip(blocks, block_experts)),
        moe_layers=len(banks),
        num_experts=banks[0].num_experts,
        experts_per_token=config.num_experts_per_tok if "num_experts_per_tok" in config else 2,
        hidden_size=config.num_attention_heads * config.attention_head_dim,
        tokens_per_image=(config.sample_size // config.patch_size) ** 2,
    )


def ring_all_reduce(size: float, world: int) -> float:
    return 2 * (world - 1) / world * size if world > 1 else 0.0


def ring_gather_or_scatter(size: float, world: int) -> float:
    return (world - 1) / world * size


def strategies(counts: dict, world: int, images_per_rank: int, activation_bytes: int) -> dict:
    """Per-rank GB of weights, gradients, optimizer state (float32, AdamW), FSDP's transient gathered weights, and GB
    sent per step, for DDP, ZeRO-2, FSDP2 (one unit per block) and EP (K = gcd(E, W)) with DDP or FSDP2 on the rest
    (`--non_expert_parallel ddp|fsdp2`)."""
    n, n_e = counts["parameters"], counts["expert_parameters"]
    n_d = n - n_e
    gb = 1e9
    k = math.gcd(counts["num_experts"], world)
    replicas = world // k
    rows = images_per_rank * counts["tokens_per_image"] * counts["experts_per_token"]
    # dispatch + combine in the forward, and both again in the backward, for every MoE layer
    all_to_all = 4 * counts["moe_layers"] * (k - 1) / k * rows * counts["hidden_size"] * activation_bytes
    fsdp = lambda size: 3 * ring_gather_or_scatter(FLOAT32 * size, world)  # noqa: E731 (gather x2, reduce-scatter)
    rows_of = {
        "DDP": (n, n, n, 0, ring_all_reduce(FLOAT32 * n, world)),
        "ZeRO-2": (n, n / world, n / world, 0, 2 * ring_gather_or_scatter(FLOAT32 * n, world)),
        "FSDP2": (n / world, n / world, n / world, counts["largest_block"], fsdp(n)),
        f"EP (K={k}) + DDP": (
            n_e / k + n_d,
            n_e / k + n_d,
            n_e / k + n_d,
            0,
            ring_all_reduce(FLOAT32 * n_d, world) + ring_all_reduce(FLOAT32 * n_e / k, replicas) + all_to_all,
        ),
        f"EP (K={k}) + FSDP2": (
            n_e / k + n_d / world,
            n_e / k + n_d / world,
            n_e / k + n_d / world,
            counts["largest_block_without_experts"],
            fsdp(n_d) + ring_all_reduce(FLOAT32 * n_e / k, replicas) + all_to_all,
        ),
    }
    return {
        name: dict(
            weights_gb=FLOAT32 * w / gb,
            gradients_gb=FLOAT32 * g / gb,
            optimizer_gb=ADAM_STATES * FLOAT32 * o / gb,
            gathered_transient_gb=FLOAT32 * t / gb,
            sent_per_step_gb=c / gb,
        )
        for name, (w, g, o, t, c) in rows_of.items()
    }


def computed(args) -> dict:
    results = {}
    for label, (family, preset, overrides) in COMPUTED_MODELS.items():
        counts = model_counts(meta_model(family, preset, overrides))
        per_world = {
            str(world): strategies(counts, world, args.images_per_rank, args.activation_bytes) for world in args.ranks
        }
        results[label] = dict(counts=counts, ranks=per_world)
    assumptions = (
        f"float32 weights, gradients and AdamW states (2 per weight); {args.images_per_rank} images per rank per step; "
        f"expert-parallel rows exchanged at {args.activation_bytes} bytes per value (bf16 autocast)"
    )
    return dict(kind="computed on the meta device", assumptions=assumptions, models=results)


class CollectiveCounter:
    """Bytes this rank sends per collective kind (ring model, see the module docstring), counted where called."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world, self.sent = world, {}
        self._originals = []
        for name, cost in (
            ("all_reduce", lambda size, world: ring_all_reduce(size, world)),
            ("all_gather_single", lambda size, world: (world - 1) * size),
            ("all_gather_into_tensor", lambda size, world: (world - 1) * size),
            ("reduce_scatter_single", ring_gather_or_scatter),
            ("reduce_scatter_tensor", ring_gather_or_scatter),
        ):
            if hasattr(dist, name):
                self._wrap(dist, name, cost)

    def _size(self, kwargs) -> int:
        import torch.distributed as dist

        return dist.get_world_size(kwargs.get("group"))

    def _wrap(self, owner, name: str, cost) -> None:
        """`cost(bytes of the input tensor, group size)`: the input is the collective's `tensor` (all-reduce) or its
        `input` / `input_tensor` (second positional argument)."""
        import inspect

        original = getattr(owner, name)
        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor = bound.get("tensor", bound.get("input", bound.get("input_tensor")))
            self.add(name, cost(tensor.nbytes, self._size(bound)))
            return original(*args, **kwargs)

        self._originals.append((owner, name, original))
        setattr(owner, name, counted)

    def add(self, kind: str, size: float) -> None:
        self.sent[kind] = self.sent.get(kind, 0.0) + size

    @staticmethod
    def ddp_hook(state, bucket):
        """DDP's own all-reduce of a bucket, called through `torch.distributed.all_reduce` (counted there) instead of
        from DDP's C++ reducer (which no Python wrapper sees)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(state, bucket)

    def count_expert_exchanges(self) -> None:
        from torch.distributed import _functional_collectives as functional_collectives

        original = functional_collectives.all_to_all_single_autograd

        def counted(tensor, output_split_sizes, input_split_sizes, group, *rest):
            import torch.distributed as dist

            rank = dist.get_rank(group)
            others = sum(size for index, size in enumerate(input_split_sizes) if index != rank)
            self.add("expert_all_to_all", 2 * others * tensor[0].nbytes if len(tensor) else 0)  # + its backward
            return original(tensor, output_split_sizes, input_split_sizes, group, *rest)

        self._originals.append((functional_collectives, "all_to_all_single_autograd", original))
        functional_collectives.all_to_all_single_autograd = counted

    def reset(self) -> None:
        self.sent = {}


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank stores (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def measured(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from diffmoe_hf.families import FAMILIES
    from diffmoe_hf.parallel import (
        build_expert_parallel_model,
        expert_parallel_mesh,
        expert_parameter_names,
        reduce_expert_gradients,
        shard_non_experts,
    )

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    family = next(f for f in FAMILIES.values() if args.preset in f.presets)
    build = lambda: family.model_class.from_preset(args.preset, **json.loads(args.overrides))  # noqa: E731
    counter = CollectiveCounter(world)
    counter.count_expert_exchanges()
    results = {}
    for mode in args.modes:
        torch.manual_seed(0)
        if mode == "ep":
            mesh = expert_parallel_mesh(world)
            model = build_expert_parallel_model(build, mesh).train()
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
            wrapped = DistributedDataParallel(model)
            wrapped.register_comm_hook(None, counter.ddp_hook)
        elif mode == "ep-fsdp2":
            mesh = expert_parallel_mesh(world)
            model = wrapped = shard_non_experts(build_expert_parallel_model(build, mesh).train())
        elif mode == "ddp":
            model = build().train()
            wrapped = DistributedDataParallel(model)
            wrapped.register_comm_hook(None, counter.ddp_hook)
        else:
            model = build().train()
            for block in model.transformer_blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        config = model.config
        generator = torch.Generator().manual_seed(rank)
        shape = (args.images_per_rank, config.in_channels, config.sample_size, config.sample_size)
        inputs = dict(
            hidden_states=torch.randn(shape, generator=generator),
            timestep=torch.rand(args.images_per_rank, generator=generator),
            class_labels=torch.randint(0, config.num_classes, (args.images_per_rank,), generator=generator),
        )
        times, sent = [], []
        for step in range(args.warmup + args.steps):
            counter.reset()
            dist.barrier()
            start = time.perf_counter()
            output = wrapped(**inputs)
            loss = output.sample.square().mean()
            if output.aux_loss is not None:
                loss = loss + output.aux_loss
            loss.backward()
            if mode in ("ep", "ep-fsdp2"):
                reduce_expert_gradients(model, mesh)
            optimizer.step()
            optimizer.zero_grad()
            dist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                sent.append(dict(counter.sent))
        state = [t for values in optimizer.state.values() for t in values.values() if t.dim() > 0]
        results[mode] = dict(
            step_seconds_median=statistics.median(times),
            step_seconds=times,
            parameter_bytes=local_bytes(model.parameters()),
            optimizer_state_bytes=local_bytes(state),
            sent_bytes_per_step=dict(sent[-1]),
            sent_bytes_per_step_total=sum(sent[-1].values()),
        )
        del wrapped, model, optimizer
    dist.destroy_process_group()
    return dict(
        kind="measured",
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__),
        preset=args.preset,
        overrides=json.loads(args.overrides),
        processes=world,
        threads_per_process=args.threads,
        images_per_rank=args.images_per_rank,
        steps=args.steps,
        rank=rank,
        results=results,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    computed_parser = commands.add_parser("computed")
    computed_parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    computed_parser.add_argument("--images-per-rank", type=int, default=32)
    computed_parser.add_argument("--activation-bytes", type=int, default=2)
    measured_parser = commands.add_parser("measured")
    measured_parser.add_argument("--preset", default="DiT-MoE-S/2")
    measured_parser.add_argument("--overrides", default="{}", help="JSON config overrides")
    measured_parser.add_argument(
        "--modes", nargs="+", default=["ddp", "fsdp2", "ep"], choices=["ddp", "fsdp2", "ep", "ep-fsdp2"]
    )
    measured_parser.add_argument("--images-per-rank", type=int, default=4)
    measured_parser.add_argument("--warmup", type=int, default=1)
    measured_parser.add_argument("--steps", type=int, default=3)
    measured_parser.add_argument("--threads", type=int, default=1)
    for command in (computed_parser, measured_parser):
        command.add_argument("--output", required=True)
    args = parser.parse_args()
    result = computed(args) if args.command == "computed" else measured(args)
    if result.get("rank", 0) == 0:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
