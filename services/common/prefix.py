"""Block hashes of a prompt, exactly as the engine's prefix cache computes them."""

from gpu_engine.block_manager import hash_token_blocks

__all__ = ["hash_token_blocks"]
