"""The tensor-parallel process group of this process, and the collectives the model calls.

One group per process: torch.distributed's default group, NCCL on CUDA and gloo on the CPU. With
no group (tensor_parallel_size 1) every collective returns its input unchanged, so one GPU runs
the same code as N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Set in every process of a group: NVLink multicast stays off (the GPU hosts do not offer it)."""

_control: dist.ProcessGroup | None = None
"""gloo beside NCCL on GPUs: the workers read rank 0's call headers on the host without waiting
for their GPU (the default group is gloo already on the CPU)."""

GROUP_TIMEOUT = timedelta(minutes=10)
"""How long one collective may wait for a peer (loading a large shard can keep one rank busy);
a rank that dies is noticed sooner, by its exit code or its closed connection."""


@dataclass(frozen=True)
class TPShard:
    """Which rank of how many a model (or a checkpoint read) is for."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of a tensor-parallel group of {self.world} does not exist")


def init_group(shard: TPShard, init_method: str, device: torch.device) -> None:
    """Join the group (blocks until every rank has): NCCL on CUDA, gloo on the CPU."""
    if dist.is_initialized():
        raise ValueError("this process already belongs to a tensor-parallel group: one engine with "
                         "tensor_parallel_size > 1 per process (shut the other down first)")
    os.environ.update(NO_MULTICAST_ENV)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=shard.rank, world_size=shard.world,
                            timeout=GROUP_TIMEOUT, **kwargs)
    global _control
    _control = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if backend == "nccl" else None


def destroy_group() -> None:
    global _control
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - an aborted group may refuse a clean teardown
            pass
    _control = None


def abort_group() -> None:
    """Abort the group from any thread: collectives waiting in it raise instead of hanging."""
    if dist.is_initialized():
        dist.distributed_c10d._abort_process_group()  # no public spelling yet (torch 2.13)


def tp_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (x itself at world 1)."""
    if tp_world() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., world * n], rank 0's columns first (x itself at world 1)."""
    world = tp_world()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank, in place (on the device's group: NCCL for CUDA tensors)."""
    if tp_world() > 1:
        dist.broadcast(x, src=0)
    return x


def broadcast_host(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's CPU tensor x on every rank, in place, over gloo (no GPU stream is involved)."""
    if tp_world() > 1:
        dist.broadcast(x, src=0, group=_control)
    return x


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's value (each rank's KV block count -> the group's)."""
    if tp_world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
