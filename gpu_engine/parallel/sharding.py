"""How the one Llama-family model splits across a tensor-parallel group (Megatron-style), and
which slice of each checkpoint tensor a rank reads.

Column-parallel linears (fused QKV, fused gate/up) keep a contiguous share of each part's output
rows; row-parallel linears (o_proj, down_proj) keep the matching share of their input columns and
their outputs are summed over ranks (one all-reduce each per layer). Attention heads are split
evenly; KV heads too, or, when there are fewer KV heads than ranks, each rank keeps the one KV head
its query heads attend to (replicated over world / num_kv_heads ranks). The embedding and LM head
split the vocabulary.

Quantized tensors follow the same rule: a tensor is sliced along its output axis (column) or input
axis (row) in proportion to the rows kept, so per-channel scales follow their rows, packed INT4
columns and per-group scales their groups, and a tensor of extent 1 on that axis (a per-tensor
scale) is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.parallel.state import TPShard

Range = tuple[int, int, int]  # (start, length, full extent) of the rows (or columns) a rank keeps


def check_tensor_parallel(cfg: ModelConfig, world: int) -> None:
    """Raise a ValueError naming the size that does not split across `world` ranks."""
    if world == 1:
        return
    need = {"num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size}
    for name, value in need.items():
        if value % world:
            raise ValueError(f"tensor_parallel_size {world} does not divide {name} {value} of "
                             f"{cfg.name or 'the model'}; choose a divisor of {value}")
    kv = cfg.num_kv_heads
    if kv >= world and kv % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide num_key_value_heads {kv}; "
                         f"choose a divisor of {kv}, or a multiple of it to replicate KV heads")
    if kv < world and world % kv:
        raise ValueError(f"tensor_parallel_size {world} is not a multiple of num_key_value_heads {kv}, "
                         f"so KV heads cannot be replicated evenly; choose a divisor or multiple of {kv}")


def even(full: int, shard: TPShard) -> Range:
    """The rank's share of `full` rows split evenly."""
    n = full // shard.world
    return shard.rank * n, n, full


def kv_heads(cfg: ModelConfig, shard: TPShard) -> Range:
    """(first KV head, count, total) a rank keeps: an even split, or the one head its query heads
    use when KV heads are fewer than ranks."""
    kv = cfg.num_kv_heads
    if kv >= shard.world:
        return even(kv, shard)
    return shard.rank * kv // shard.world, 1, kv


@dataclass(frozen=True)
class LinearShard:
    """The slice of its checkpoint tensors one rank's linear holds. column: `ranges` has one Range
    of output rows per fused part; row: one Range of input columns."""

    style: str  # "column" or "row"
    ranges: tuple[Range, ...]

    def __post_init__(self) -> None:
        if self.style not in ("column", "row") or not self.ranges:
            raise ValueError(f"a linear shard is column or row parallel with ranges, got {self}")

    def index(self, shape: tuple[int, ...], axes: tuple[int | None, int | None], part: int,
              name: str) -> tuple[slice, ...]:
        """The slice to read of a checkpoint tensor of `shape` whose output / input axes are `axes`."""
        axis = axes[0] if self.style == "column" else axes[1]
        idx = [slice(None)] * len(shape)
        if axis is None or axis >= len(shape) or shape[axis] == 1:
            return tuple(idx)  # replicated: bias of a row-parallel linear, per-tensor scales
        start, length, full = self.ranges[part if self.style == "column" else 0]
        n = shape[axis]
        if (start * n) % full or (length * n) % full:
            raise ModelLoadError(f"tensor {name!r} of shape {shape}: its axis {axis} ({n}) cannot be cut "
                                 f"at {start}..{start + length} of {full} for tensor parallelism (a group "
                                 f"or packing straddles the ranks); choose a smaller tensor_parallel_size")
        idx[axis] = slice(start * n // full, (start + length) * n // full)
        return tuple(idx)


def column_shard(part_ranges: list[Range]) -> LinearShard:
    return LinearShard("column", tuple(part_ranges))


def row_shard(inputs: Range) -> LinearShard:
    return LinearShard("row", (inputs,))
