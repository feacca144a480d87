"""Paged KV-cache bookkeeping: block allocation, reference counts and the prefix cache. No torch.

Every block is in exactly one of three states:
  free       no content worth keeping; on the free list (FIFO)
  cached     holds a full block of tokens with a known hash, no user; evictable, least recently used first
  in use     ref_count >= 1 (shared between sequences when > 1)
Allocation takes free blocks first and evicts cached ones (LRU) only when the free list is empty.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block, chained to the hash of the block before it (b"" for the first)."""
    return hashlib.blake2b(parent + array("I", token_ids).tobytes(), digest_size=16).digest()


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, parent: bytes = b"", start_block: int = 0
) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids`, from block `start_block` on."""
    hashes = []
    for i in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[i : i + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    """Allocates KV blocks, counts references and keeps the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._events: list[tuple[str, bytes]] = []
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    # -- capacity ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with ref_count 1, or None (nothing taken) when fewer than n are available."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free_blocks:
            return None
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget_hash(block)
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Released in reverse order, so that when they were a
        sequence's table its tail blocks are evicted before its head (the prefix others share)."""
        for block in reversed(block_ids):
            self._check_id(block)
            if self._ref[block] <= 0:
                raise RuntimeError(f"double free of block {block}")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def share(self, block_ids: Iterable[int]) -> None:
        """Add a reference to blocks in use (a forked sequence shares its parent's blocks)."""
        for block in block_ids:
            self._check_id(block)
            if self._ref[block] <= 0:
                raise RuntimeError(f"cannot share block {block}: it is not in use")
            self._ref[block] += 1

    # -- prefix cache -----------------------------------------------------------------------------
    def cached_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` are cached now (takes no reference, counts nothing)."""
        n = 0
        for h in hashes:
            if h not in self._block_of:
                break
            n += 1
        return n

    def acquire_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Take a reference on the longest cached prefix of `hashes` and return its block ids."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            blocks.append(block)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(blocks)
        return blocks

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Record that an in-use block now holds the full block of tokens `block_hash` names."""
        if not self.enable_prefix_caching:
            return
        self._check_id(block_id)
        if self._ref[block_id] <= 0:
            raise RuntimeError(f"cannot register block {block_id}: it is not in use")
        if block_hash in self._block_of or block_id in self._hash_of:
            return  # the same content is cached in another block already, or this one is named
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self._events.append(("stored", block_hash))

    def take_events(self) -> list[tuple[str, bytes]]:
        """("stored" | "removed", hash) events since the last call, for placement by prefix."""
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached block with no user (e.g. after new weights are loaded)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget_hash(block)
            self._free.append(block)

    # -- checks -----------------------------------------------------------------------------------
    def check_integrity(self, held: Iterable[int] | None = None) -> None:
        """free + cached + in use == total, each block in one place, hashes consistent; with
        `held` (every block id in every live block table), each block's reference count equals
        the number of tables that hold it."""
        free = list(self._free)
        cached = list(self._evictable)
        used = [b for b in range(self.num_blocks) if self._ref[b] > 0]
        seen = free + cached + used
        if len(seen) != self.num_blocks or len(set(seen)) != self.num_blocks:
            raise AssertionError(
                f"block accounting broken: free={len(free)} cached={len(cached)} "
                f"used={len(used)} total={self.num_blocks} distinct={len(set(seen))}"
            )
        if any(self._ref[b] != 0 for b in free + cached):
            raise AssertionError("a free or cached block has references")
        if any(b not in self._hash_of for b in cached):
            raise AssertionError("a cached block has no hash")
        if any(b in self._hash_of for b in free):
            raise AssertionError("a free block still has a hash")
        if any(self._block_of[h] != b for b, h in self._hash_of.items()):
            raise AssertionError("hash maps disagree")
        if held is not None:
            counts = Counter(held)
            wrong = [b for b in range(self.num_blocks) if self._ref[b] != counts.get(b, 0)]
            if wrong:
                b = wrong[0]
                raise AssertionError(f"{len(wrong)} blocks have reference counts that no block "
                                     f"table accounts for (block {b}: {self._ref[b]} references, "
                                     f"{counts.get(b, 0)} tables)")

    def _forget_hash(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            self._events.append(("removed", h))

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"unknown block id {block} (pool has {self.num_blocks})")
