"""Tensor parallelism: the process group and its collectives (state), how a model splits across
ranks and which checkpoint slice each rank reads (sharding), and the worker ranks that run the
same forward as rank 0 (workers)."""

from gpu_engine.parallel.state import TPShard, all_gather_last_dim, all_reduce, min_across_ranks, tp_world
from gpu_engine.parallel.sharding import LinearShard, check_tensor_parallel

__all__ = ["LinearShard", "TPShard", "all_gather_last_dim", "all_reduce", "check_tensor_parallel",
           "min_across_ranks", "tp_world"]
