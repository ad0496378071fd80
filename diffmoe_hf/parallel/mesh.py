"""The ranks of an expert-parallel run as a 2-D `DeviceMesh`: a `"data"` axis of replicas and an `"expert"` axis of
K ranks that share one copy of the experts (each holds E/K of every layer's experts)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ExpertParallelMesh:
    """
    Attributes:
        mesh: (world / K, K) `DeviceMesh` with dims `("data", "expert")`; rank = data index * K + expert index.
    """

    mesh: DeviceMesh

    @property
    def expert_group(self) -> dist.ProcessGroup:
        """The K ranks that together hold every expert once (rows are exchanged among them)."""
        return self.mesh.get_group("expert")

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The world / K ranks holding the same experts (an expert's gradient is summed over them)."""
        return self.mesh.get_group("data")

    @property
    def expert_rank(self) -> int:
        return self.mesh.get_local_rank("expert")

    @property
    def expert_size(self) -> int:
        return self.mesh.size(1)

    @property
    def world_size(self) -> int:
        return self.mesh.size()


def check_expert_parallel_processes(expert_parallel_size: int, num_processes: int, option: str) -> None:
    """
    Raises a `ValueError` naming `option` (how the caller's user gave the size, e.g. `"--expert-parallel-size"`) and
    the numbers unless K = `expert_parallel_size` is at least 1 and divides `num_processes`.
    """
    if expert_parallel_size < 1:
        raise ValueError(f"{option} must be at least 1, got {expert_parallel_size}.")
    if num_processes % expert_parallel_size:
        raise ValueError(
            f"{option} {expert_parallel_size} must divide the number of processes ({num_processes}); launch a "
            f"multiple of {expert_parallel_size} processes, e.g. `torchrun --nproc_per_node {expert_parallel_size}`."
        )


def expert_parallel_mesh(expert_parallel_size: int, device_type: str = "cpu") -> ExpertParallelMesh:
    """
    The (data x expert) mesh of all ranks of the initialised default process group, K = `expert_parallel_size`
    consecutive ranks per expert group. Every rank must call it.

    Raises:
        ValueError: when `torch.distributed` is not initialised, K does not divide the number of processes, or the
            backend does not run `all_to_all_single` (`check_all_to_all`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} needs torch.distributed initialised (torchrun or accelerate "
            "launch)."
        )
    world_size = dist.get_world_size()
    check_expert_parallel_processes(expert_parallel_size, world_size, "expert_parallel_size")
    shape = (world_size // expert_parallel_size, expert_parallel_size)
    mesh = ExpertParallelMesh(init_device_mesh(device_type, shape, mesh_dim_names=("data", "expert")))
    check_all_to_all(mesh.expert_group, device_type)
    return mesh


def check_all_to_all(group: dist.ProcessGroup, device_type: str) -> None:
    """
    Raises a `ValueError` naming the backend and torch's version unless the backend of `group` runs
    `all_to_all_single`, the exchange expert parallelism is built on (gloo and NCCL do; some builds' backends do not).
    One exchange of one int64 per rank; every rank of `group` must call it.
    """
    device = (
        torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    )
    sent = torch.arange(dist.get_world_size(group), dtype=torch.int64, device=device)
    try:
        dist.all_to_all_single(torch.empty_like(sent), sent, group=group)
    except (RuntimeError, NotImplementedError) as error:
        raise ValueError(
            f"expert parallelism exchanges tokens with all_to_all_single, which the {dist.get_backend(group)!r} "
            f"backend of torch {torch.__version__} does not run ({error}); launch with the gloo (CPU) or nccl (CUDA) "
            "backend, or a torch whose backend supports it."
        ) from error
