"""Token sampling: the slot-based device `Sampler`, and the per-step `sample(logits, SamplingBatch)`.

Semantics of both (penalties, bans, temperature, top-k, top-p, min-p, the seeded race):
taxiway_kernels/reference_sampling.py. Randomness is a counter-based hash of (row key, output position,
token id), so a seeded request draws the same tokens whatever else is in the batch, after
preemption, or when it resumes elsewhere, with no per-request generator and no host round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpu_engine.sampling_params import SamplingParams
from taxiway_kernels import reference_sampling as L
from taxiway_kernels.reference_sampling import uniform_noise  # noqa: F401  (part of this module's API)

if TYPE_CHECKING:
    from taxiway_kernels.sampling import SamplingKernelConfig

_M32 = 0xFFFFFFFF
_SAMPLING, _FILTERED, _SPECIAL = 1, 2, 4  # what an active slot needs (fast-path counters)


def row_key(seed: int, sample_index: int) -> int:
    """A 32-bit key for one sample's stream, from a 64-bit seed (pure Python, exact)."""
    x = (seed ^ (sample_index * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _M32


class Sampler:
    """Sampling state per slot of a persistent batch, kept on the device.

    `set_slot` on admission, resume or after preemption uploads a slot's parameters once (with
    its prompt-occurrence set and output counts when it has penalties); `sample(logits, slots)`
    applies penalties and bans, draws every row at its slot's current output position and records
    the drawn token into the slot (position + 1, output count + 1) on the device, so the next step
    needs nothing from the host. Host work per step does not grow with rows x vocabulary: the
    parameter tables are uploaded only for slots that changed, in the next call.

    Memory: 128 B per slot, plus one int32 row of the vocabulary per slot with penalties (or with
    more ban ids than max_stop_ids), in a pool that grows on demand to the most such slots at once
    (4 B x 128,256 = 513 KB each: 263 MB for 512 penalised slots), plus the kernels' workspace
    (about 37 KB per row of the largest batch at 128k vocabulary).

    On a GPU it runs the Triton kernels (taxiway_kernels/sampling.py); on the CPU the plain-torch reference
    (taxiway_kernels/reference_sampling.py), with the same semantics.
    """

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device | str, *,
                 max_stop_ids: int = 16, backend: str | None = None,
                 kernel_config: "SamplingKernelConfig | None" = None):
        if max_slots < 1 or vocab_size < 1 or max_stop_ids < 1:
            raise ValueError(f"max_slots, vocab_size and max_stop_ids must be >= 1, got "
                             f"{max_slots}, {vocab_size}, {max_stop_ids}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_slots, self.vocab_size, self.max_stop_ids = max_slots, vocab_size, max_stop_ids
        self.backend = backend or ("triton" if self.device.type == "cuda" else "torch")
        if self.backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {self.backend!r}")
        self._ws = None
        if self.backend == "triton":
            from taxiway_kernels.sampling import SamplingKernelConfig, SamplingWorkspace

            self._ws = SamplingWorkspace(self.device, kernel_config or SamplingKernelConfig())
        self._f = np.zeros((max_slots, L.NUM_F), dtype=np.float32)
        self._i = np.zeros((max_slots, L.NUM_I), dtype=np.int32)
        self._i[:, L.I_PEN_ROW] = -1
        self._stop = np.full((max_slots, max_stop_ids), -1, dtype=np.int32)
        self.tables = L.SlotTables(
            fparams=torch.from_numpy(self._f).to(self.device),
            iparams=torch.from_numpy(self._i).to(self.device),
            stop_ids=torch.from_numpy(self._stop).to(self.device),
            occ=torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device),
        )
        self._dirty: set[int] = set()
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # pool row -> ids
        self._free_rows: list[int] = []
        self._kind: dict[int, int] = {}  # active slot -> _SAMPLING | _FILTERED | _SPECIAL bits
        self._counts = {_SAMPLING: 0, _FILTERED: 0, _SPECIAL: 0}

    # -- slot lifecycle -----------------------------------------------------------------------------
    def set_slot(self, slot: int, params: SamplingParams, key: int, prompt_token_ids, output_token_ids=(),
                 eos_token_ids=()) -> None:
        """(Re)load a slot: key is row_key(seed, sample index); output_token_ids are the tokens
        already generated (resume, preemption): the position is their count. Stop and EOS ids
        (unless ignore_eos) are banned until min_tokens tokens exist."""
        self._check_slot(slot)
        if slot in self._kind:
            self.clear_slot(slot)
        key = self._check_key(key)
        prompt = self._token_array("prompt_token_ids", prompt_token_ids)
        output = self._token_array("output_token_ids", output_token_ids)
        bans = np.zeros(0, dtype=np.int64)
        if params.min_tokens > output.size:  # stop and EOS ids are banned until then
            bans = np.unique(self._token_array("ban ids (stop_token_ids + EOS)", list(params.stop_token_ids) + (
                [] if params.ignore_eos else list(eos_token_ids))))
        sampling = params.temperature > 0
        flags = (L.TOP_K * (sampling and 0 < params.top_k < self.vocab_size)
                 | L.TOP_P * (sampling and params.top_p < 1.0) | L.MIN_P * (sampling and params.min_p > 0)
                 | L.PENALTY * params.needs_penalties | L.BANS * (bans.size > 0))
        overflow = bool(flags & L.BANS) and bans.size > self.max_stop_ids
        pen_row = self._alloc_row() if flags & L.PENALTY or overflow else -1
        if pen_row >= 0:
            self._pending[pen_row] = (np.unique(prompt) if flags & L.PENALTY else prompt[:0], output,
                                      bans if overflow else bans[:0])
        self._f[slot] = 0.0
        self._f[slot, : L.F_FREQ + 1] = (
            params.temperature, params.top_p, _log_f32(params.min_p) if flags & L.MIN_P else -math.inf,
            params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
        self._i[slot] = 0
        self._i[slot, : L.I_MIN_TOKENS + 1] = (flags, params.top_k if flags & L.TOP_K else 0,
                                              _as_i32(key), output.size, pen_row, params.min_tokens)
        self._stop[slot] = -1
        if flags & L.BANS and not overflow:
            self._stop[slot, : bans.size] = bans
        self._dirty.add(slot)
        self._activate(slot, (_SAMPLING * sampling) | (_FILTERED * bool(flags & L.FILTERS))
                       | (_SPECIAL * bool(flags & (L.PENALTY | L.BANS))))

    def fork_slot(self, src: int, dst: int, key: int) -> None:
        """dst becomes a copy of src's current device state (position, output counts) with its own
        key: the n > 1 samples of one prompt. Ordered on the device after every earlier call."""
        self._check_slot(src)
        self._check_slot(dst)
        if src not in self._kind:
            raise ValueError(f"fork_slot: source slot {src} is not set")
        if dst in self._kind:
            self.clear_slot(dst)
        key = self._check_key(key)
        self._flush()
        t = self.tables
        for table, host in ((t.fparams, self._f), (t.iparams, self._i), (t.stop_ids, self._stop)):
            table[dst].copy_(table[src])
            host[dst] = host[src]
        t.iparams[dst, L.I_KEY] = _as_i32(key)
        self._i[dst, L.I_KEY] = _as_i32(key)
        if self._i[src, L.I_PEN_ROW] >= 0:
            row = self._alloc_row()
            t = self.tables  # the pool may have grown
            t.occ[row].copy_(t.occ[int(self._i[src, L.I_PEN_ROW])])
            t.iparams[dst, L.I_PEN_ROW] = row
            self._i[dst, L.I_PEN_ROW] = row
        self._activate(dst, self._kind[src])

    def clear_slot(self, slot: int) -> None:
        """Release a slot (and its penalty row). Clearing a slot that is not set raises."""
        self._check_slot(slot)
        if slot not in self._kind:
            raise ValueError(f"clear_slot: slot {slot} is not set")
        row = int(self._i[slot, L.I_PEN_ROW])
        if row >= 0:
            self._pending.pop(row, None)
            self._free_rows.append(row)
        kind = self._kind.pop(slot)
        for bit in self._counts:
            self._counts[bit] -= bool(kind & bit)
        self._f[slot] = 0.0
        self._i[slot] = 0
        self._i[slot, L.I_PEN_ROW] = -1
        self._stop[slot] = -1
        self._dirty.add(slot)

    # -- per step -----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """logits [R, V] float (rows in any order) and slots [R] int (device, each slot once)
        -> token ids [R] int64 on the device; each slot's position and counts advance."""
        self._check_call(logits, slots)
        self._flush()
        if self.plain_greedy():
            return logits.argmax(dim=-1)
        if self._ws is None:
            return L.sample_slots(logits, slots.long(), self.tables, record=True)
        from taxiway_kernels.sampling import sample_slots

        return sample_slots(logits, slots, self.tables, self._ws, filters=self._counts[_FILTERED] > 0)

    def warm_up(self, probs: bool = False) -> None:
        """Compile the kernels' configurations before a request waits for them (seconds each on a
        cold Triton cache): draws with and without top-k / top-p, under penalties, and with
        `probs` the distributions speculative verify reads. On a scratch sampler of the same
        vocabulary and tables' widths; this one's slots are not touched. Nothing on the torch
        backend (the CPU: nothing to compile)."""
        if self._ws is None:
            return
        scratch = Sampler(2, self.vocab_size, self.device, max_stop_ids=self.max_stop_ids,
                          kernel_config=self._ws.cfg)
        logits = torch.zeros(2, self.vocab_size, dtype=torch.float32, device=self.device)
        slots = torch.arange(2, dtype=torch.int64, device=self.device)
        top_k = min(40, self.vocab_size - 1)
        for params in (SamplingParams(temperature=0.8, top_k=top_k, top_p=0.9, repetition_penalty=1.1),
                       SamplingParams(temperature=0.8)):
            for slot in (0, 1):
                scratch.set_slot(slot, params, key=slot + 1, prompt_token_ids=[0])
            scratch.sample(logits, slots)
            if probs:
                scratch.probs(logits, slots)

    def plain_greedy(self) -> bool:
        """Every active slot is greedy with no penalty or ban: its token is the logits' argmax."""
        return not (self._counts[_SAMPLING] or self._counts[_SPECIAL])

    def probs(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[R, V] float32: the distribution each row would be drawn from (after penalties, bans,
        temperature, top-k, top-p, min-p; one-hot for greedy slots). Nothing is recorded."""
        self._check_call(logits, slots)
        self._flush()
        return self._probs(logits, slots, self.tables)

    def _probs(self, logits: torch.Tensor, rows: torch.Tensor, tables: L.SlotTables) -> torch.Tensor:
        """The distributions of logits' rows, row r under tables' row rows[r]: the Triton kernels
        where there are (no host sync), else the torch reference."""
        if self._ws is None:
            return L.probs_slots(logits, rows.long(), tables)
        from taxiway_kernels.sampling import probs_slots

        return probs_slots(logits, rows, tables, self._ws, filters=self._counts[_FILTERED] > 0)

    def verify_probs(self, logits: torch.Tensor, row_slots: np.ndarray, row_offsets: np.ndarray,
                     prior: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """[N, V] float32: what row r would be drawn from were it the slot's draw row_offsets[r]
        tokens further on (speculative verify rows). logits [N, V] on the device; row_slots and
        row_offsets [N] int64 on the host; prior = (rows, token ids) [M] int64: the drafts before
        each row, counted as output for penalties. The slots' state is not changed."""
        if logits.dim() != 2 or logits.shape != (len(row_slots), self.vocab_size):
            raise ValueError(f"logits must be [{len(row_slots)}, {self.vocab_size}], got {tuple(logits.shape)}")
        self._flush()
        t, n = self.tables, len(row_slots)
        dev = self._upload(row_slots)
        ip = t.iparams[dev].clone()
        ip[:, L.I_POS] += self._upload(row_offsets.astype(np.int32))
        pen = self._i[row_slots, L.I_PEN_ROW]
        occ = t.occ[:0]
        if (pen >= 0).any():
            occ = t.occ[self._upload(np.maximum(pen, 0))].clone()  # [N, V]: the rows' own copies
            rows, ids = prior
            if len(rows):
                occ.index_put_((self._upload(rows), self._upload(ids)),
                               torch.ones(len(rows), dtype=occ.dtype, device=occ.device), accumulate=True)
            ip[:, L.I_PEN_ROW] = self._upload(np.where(pen >= 0, np.arange(n), -1).astype(np.int32))
        rows_tables = L.SlotTables(fparams=t.fparams[dev], iparams=ip, stop_ids=t.stop_ids[dev], occ=occ)
        return self._probs(logits, torch.arange(n, device=self.device), rows_tables)

    def verify_params(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(greedy [S] bool, keys [S] int64, output positions [S] int64) of these slots ([S] int64
        on the host), on the device: what the rejection sampler draws with."""
        self._flush()
        greedy = self._upload(self._f[slots, L.F_TEMP] <= 0)
        keys = self._upload(self._i[slots, L.I_KEY].astype(np.int64) & _M32)
        return greedy, keys, self.tables.iparams[self._upload(slots), L.I_POS].long()

    def advance(self, slots: np.ndarray, token_ids: torch.Tensor, counts: torch.Tensor,
                device_slots: torch.Tensor | None = None) -> None:
        """Record several drawn tokens per slot: slots [S] int64 (host; device_slots, if given, the
        same on the device), token_ids [S, K] int64 and counts [S] int64 (device): slot s drew
        token_ids[s, :counts[s]] (the rest is -1)."""
        self._flush()
        t = self.tables
        dev = self._upload(slots) if device_slots is None else device_slots
        t.iparams[dev, L.I_POS] += counts.to(torch.int32)
        pen = self._i[slots, L.I_PEN_ROW]
        if (pen >= 0).any():
            rows = self._upload(pen.astype(np.int64))[:, None].expand_as(token_ids)
            valid = (token_ids >= 0) & (rows >= 0)
            t.occ.index_put_((rows[valid], token_ids[valid]),
                             torch.ones(int(valid.sum()), dtype=t.occ.dtype, device=t.occ.device),
                             accumulate=True)

    @staticmethod
    def logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int):
        """Raw-model logprobs (log-softmax of the logits, before any processing) of the given
        tokens [R], and the top-N values and ids [R, N] (None when num_top is 0)."""
        return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, num_top)

    def slot_state(self, slot: int) -> tuple[int, dict[int, int]]:
        """(position, {token: output count}) read back from the device (tests and debugging; it
        waits for the device). Counts are kept only for slots with penalties."""
        self._check_slot(slot)
        self._flush()
        pos = int(self.tables.iparams[slot, L.I_POS])
        row = int(self._i[slot, L.I_PEN_ROW])
        if row < 0:
            return pos, {}
        counts = (self.tables.occ[row] & L.COUNT_MASK).cpu()
        ids = counts.nonzero().squeeze(1).tolist()
        return pos, {t: int(counts[t]) for t in ids}

    # -- internals ----------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Upload the host rows of slots changed since the last call, then build new penalty rows."""
        t = self.tables
        if self._dirty:
            idx = np.fromiter(sorted(self._dirty), dtype=np.int64)
            dev = self._upload(idx)
            t.fparams[dev] = self._upload(self._f[idx])
            t.iparams[dev] = self._upload(self._i[idx])
            t.stop_ids[dev] = self._upload(self._stop[idx])
            self._dirty.clear()
        if self._pending:
            rows = np.fromiter(self._pending, dtype=np.int64)
            t.occ[self._upload(rows)] = 0
            r, c, v = [], [], []
            for row, parts in self._pending.items():
                for ids, val in zip(parts, (L.PROMPT_BIT, 1, L.BAN_BIT)):
                    r.append(np.full(ids.size, row, dtype=np.int64))
                    c.append(ids)
                    v.append(np.full(ids.size, val, dtype=np.int32))
            vals = self._upload(np.concatenate(v))
            t.occ.index_put_((self._upload(np.concatenate(r)), self._upload(np.concatenate(c))), vals,
                             accumulate=True)
            self._pending.clear()

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _alloc_row(self) -> int:
        if not self._free_rows:
            occ = self.tables.occ
            size = occ.shape[0]
            grown = torch.zeros(min(self.max_slots, max(4, 2 * size)), self.vocab_size,
                                dtype=torch.int32, device=self.device)
            grown[:size] = occ
            self.tables = replace(self.tables, occ=grown)
            self._free_rows = list(range(grown.shape[0] - 1, size - 1, -1))
        return self._free_rows.pop()

    def _activate(self, slot: int, kind: int) -> None:
        self._kind[slot] = kind
        for bit in self._counts:
            self._counts[bit] += bool(kind & bit)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.max_slots})")

    @staticmethod
    def _check_key(key: int) -> int:
        if not 0 <= key <= _M32:
            raise ValueError(f"key must be a 32-bit row_key(seed, sample_index), got {key}")
        return key

    def _token_array(self, name: str, ids) -> np.ndarray:
        a = np.asarray(list(ids), dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            bad = int(a[(a < 0) | (a >= self.vocab_size)][0])
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return a

    def _check_call(self, logits: torch.Tensor, slots: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [rows, {self.vocab_size}], got {tuple(logits.shape)}")
        if slots.shape != (logits.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"slots must be [{logits.shape[0]}] int32/int64, got {tuple(slots.shape)} "
                             f"{slots.dtype}")
        if logits.device != self.device or slots.device != self.device:
            raise ValueError(f"logits ({logits.device}) and slots ({slots.device}) must be on {self.device}")


def _log_f32(x: float) -> float:
    return float(np.float32(math.log(x)))


def _as_i32(key: int) -> int:
    return key - (1 << 32) if key >= 1 << 31 else key


# -- the per-step interface (built on the host each step; the engine uses it until the persistent
# batch drives a Sampler) -------------------------------------------------------------------------
@dataclass
class SamplingBatch:
    """Per-row sampling parameters, as tensors on the logits' device. One row per sample drawn."""

    temperature: torch.Tensor  # [R] float32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] float32, 1 = off
    min_p: torch.Tensor  # [R] float32, 0 = off
    keys: torch.Tensor  # [R] int64, row_key(seed, sample index)
    positions: torch.Tensor  # [R] int64, output index of the token being drawn
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    penalties: "Penalties | None" = None
    banned: list[tuple[int, list[int]]] | None = None
    """(row, token ids) the row must not emit now (stop tokens before min_tokens)."""


@dataclass
class Penalties:
    rows: torch.Tensor  # [P] int64: which rows
    prompt_mask: torch.Tensor  # [P, V] bool: token occurs in the prompt
    output_counts: torch.Tensor  # [P, V] float32: occurrences in the output
    repetition: torch.Tensor  # [P] float32
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition (HF: divide positive, multiply negative logits of seen tokens), then frequency and
    presence (subtract per output occurrence / once), on the rows p.rows. Returns new logits."""
    out = logits.clone()
    out[p.rows] = L.penalize(logits[p.rows], p.prompt_mask, p.output_counts, p.repetition, p.presence,
                             p.frequency)
    return out


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalties and bans: what both greedy and random sampling pick from."""
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.banned:
        logits = logits.clone()
        for row, ids in batch.banned:
            logits[row, ids] = float("-inf")
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [R, V] float32 -> token ids [R] int64 (the reference's semantics, in torch)."""
    logits = process_logits(logits, batch)
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    return L.sample_processed(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p.log(),
                              batch.keys, batch.positions)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For rows [R, V] of log-probabilities: the given tokens' values [R], and the top-N values and
    ids [R, N] (None when num_top is 0)."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if num_top <= 0:
        return chosen, None, None
    top = logprobs.topk(num_top, dim=-1)
    return chosen, top.values, top.indices
