"""Random inputs for kernel tests and benchmarks: paged KV caches and flattened step batches.

Plain torch, no triton. Every cache slot is filled with random values (never zeros), so a kernel
that reads a wrong block or an unwritten slot gives a wrong answer instead of a lucky one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """One step's attention inputs over a paged cache (see taxiway_kernels/reference.py for the layout)."""

    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, KVH, block_size, D]
    v_cache: torch.Tensor  # [num_blocks, KVH, block_size, D]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    num_decodes: int  # leading sequences with q_len 1
    max_query_len: int


def make_paged_batch(
    seqs: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    extra_blocks: int = 3,
    copies: int = 1,
) -> PagedBatch:
    """seqs: (q_len, seq_len) per sequence, decodes (q_len 1) first.

    Block ids are a random permutation of the cache, so a sequence's blocks are scattered and
    out of order. `copies` > 1 builds that many disjoint block tables over one cache
    (block_tables: [copies * num_seqs, ...]) for benchmarks that rotate inputs.
    """
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    max_blocks = max(blocks_per_seq)
    used = sum(blocks_per_seq)
    num_blocks = used * copies + extra_blocks
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache, v_cache = (_randn(shape, dtype, device, generator) for _ in range(2))
    perm = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(copies * len(seqs), max_blocks, dtype=torch.int32)
    nxt = 0
    for c in range(copies):
        for i, nb in enumerate(blocks_per_seq):
            tables[c * len(seqs) + i, :nb] = perm[nxt : nxt + nb]
            nxt += nb
    q_lens = [q for q, _ in seqs]
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = _randn((sum(q_lens), num_heads, head_dim), dtype, device, generator)
    num_decodes = 0
    while num_decodes < len(seqs) and seqs[num_decodes][0] == 1:
        num_decodes += 1
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables.to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device=device),
        num_decodes=num_decodes,
        max_query_len=max(q_lens),
    )


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    """Seeded through `generator` on the CPU; without one, drawn where it lives (large caches)."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator).to(dtype).to(device)


def make_cos_sin_cache(max_position: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[max_position, head_dim] float32: cos in the first half, sin in the second (rotate-half)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN if out has any NaN."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
