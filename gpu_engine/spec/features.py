"""The target's features for EAGLE-3 training and evaluation: one forward over whole sequences
(prefill only, through a scratch paged KV cache), keeping the auxiliary hidden states and the
final normed hidden state of every position."""

from __future__ import annotations

import numpy as np
import torch

from gpu_engine.model import CausalLM
from gpu_engine.ops import AttentionMetadata, TorchOps
from gpu_engine.step_inputs import padded_tables


@torch.inference_mode()
def target_features(
    model: CausalLM,
    ops: TorchOps,
    cos_sin: torch.Tensor,
    sequences: list[list[int]],
    aux_layers: tuple[int, ...],
    max_batch_tokens: int = 16384,
    block_size: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (aux [L, len(aux_layers) * hidden], final normed hidden [L, hidden]), in the
    model's dtype on its device. Sequences are batched up to max_batch_tokens tokens."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    batch: list[list[int]] = []
    for seq in sequences:
        if batch and sum(map(len, batch)) + len(seq) > max_batch_tokens:
            out += _run(model, ops, cos_sin, batch, aux_layers, block_size)
            batch = []
        batch.append(seq)
    if batch:
        out += _run(model, ops, cos_sin, batch, aux_layers, block_size)
    return out


def _run(model, ops, cos_sin, batch, aux_layers, bs):
    c = model.cfg
    dev = model.norm.device
    lens = np.array([len(s) for s in batch], dtype=np.int32)
    per = [-(-int(n) // bs) for n in lens]
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    tables = [list(range(int(s), int(s) + p)) for s, p in zip(starts, per)]
    shape = (c.num_layers, 2, int(sum(per)), c.num_kv_heads, bs, c.head_dim)
    cache = torch.zeros(shape, dtype=model.norm.dtype, device=dev)
    kv = [(cache[i, 0], cache[i, 1]) for i in range(c.num_layers)]
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
    slots = np.concatenate([np.arange(n, dtype=np.int64) + int(s) * bs for n, s in zip(lens, starts)])
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=up(slots), query_start_loc=up(qsl), seq_lens=up(lens),
        block_tables=up(padded_tables(tables)), num_decodes=0, max_query_len=int(lens.max()),
        max_seq_len=int(lens.max()), query_start_loc_host=qsl.tolist(), seq_lens_host=lens.tolist(),
    )
    ids = torch.tensor([t for s in batch for t in s], dtype=torch.int64, device=dev)
    hidden, aux = model.forward_aux(ids, up(positions), kv, meta, cos_sin, ops, aux_layers)
    if aux is None:
        aux = hidden.new_zeros(hidden.shape[0], 0)
    return [(aux[a:b].clone(), hidden[a:b].clone()) for a, b in zip(qsl[:-1], qsl[1:])]
