"""Block hashes of a prompt, as the engine's prefix cache computes them (chained, full blocks only)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

try:
    from gpu_engine.block_manager import hash_token_blocks
except ImportError:  # until the engine lands on this branch; then this fallback goes

    def hash_token_blocks(token_ids: Sequence[int], block_size: int) -> list[bytes]:
        hashes, parent = [], b""
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            block = token_ids[start:start + block_size]
            parent = hashlib.sha256(parent + b",".join(str(t).encode() for t in block)).digest()
            hashes.append(parent)
        return hashes
