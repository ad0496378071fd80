"""Which experts an expert bank builds: all of them (the default), or, while `holding_experts(rank, size)` is open,
only the contiguous block of expert rank `rank` among `size` expert-parallel ranks. A bank built that way holds its
experts under their global names (`experts.{e}` with e the global expert id), so its state dict, LoRA targets and
checkpoints name every expert as a single-process model does; the other experts are never built."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch


_placement: ContextVar[tuple[int, int] | None] = ContextVar("expert_placement", default=None)


@contextmanager
def holding_experts(rank: int, size: int) -> Iterator[None]:
    """
    Expert banks built inside this context build only expert-parallel rank `rank`'s experts of `size` ranks.

    Args:
        rank: This process's index on the expert axis, 0 <= rank < size.
        size: Expert-parallel ranks K; every bank built inside must have a multiple of K experts.
    """
    if not 0 <= rank < size:
        raise ValueError(f"expert-parallel rank={rank} must be between 0 and size-1={size - 1}.")
    token = _placement.set((rank, size))
    try:
        yield
    finally:
        _placement.reset(token)


@contextmanager
def holding_all_experts() -> Iterator[None]:
    """Expert banks built inside this context hold every expert, also inside `holding_experts` (e.g. a model built
    to describe a full checkpoint)."""
    token = _placement.set(None)
    try:
        yield
    finally:
        _placement.reset(token)


def expert_block(num_experts: int, rank: int, size: int) -> range:
    """The global ids of the E/K contiguous experts of expert-parallel rank `rank` of `size` (E = `num_experts`)."""
    if num_experts % size:
        raise ValueError(
            f"{num_experts} experts cannot be split over an expert-parallel size of {size}: it must divide them."
        )
    per_rank = num_experts // size
    return range(rank * per_rank, (rank + 1) * per_rank)


def expert_placement() -> tuple[int, int] | None:
    """`(expert rank, expert-parallel size)` of the banks built now: inside `holding_experts`, else None."""
    return _placement.get()


def expert_rank_seed(expert_rank: int) -> int:
    """The seed of expert rank `expert_rank`'s own random stream, from the process's seed (`torch.initial_seed()`, the
    same on every rank of a seeded run): fresh experts, and fresh adapters on them, are drawn from it, so that the ranks
    do not draw copies of each other's."""
    return (torch.initial_seed() * 1_000_003 + expert_rank) % 2**63


def holds_every_expert() -> bool:
    """Whether banks built now build every expert (`False` inside `holding_experts`)."""
    return _placement.get() is None


class OtherRanksExpertsUnused:
    """
    A model class's diffusers `_keys_to_ignore_on_load_unexpected`, computed when diffusers reads it: the patterns of
    the experts a full checkpoint holds and a model built inside `holding_experts` does not (the other ranks'), so that
    loading a full checkpoint for one rank does not warn about every expert it leaves to the others. Outside the
    context, `None`: every unused weight is reported.
    """

    def __get__(self, instance, owner) -> list[str] | None:
        return None if holds_every_expert() else [r"\.experts\.\d+\."]


def placed_expert_ids(num_experts: int) -> range:
    """The global ids of the experts a bank of `num_experts` built now holds (all of them outside `holding_experts`)."""
    placement = _placement.get()
    return range(num_experts) if placement is None else expert_block(num_experts, *placement)
