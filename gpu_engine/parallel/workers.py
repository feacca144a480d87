"""The worker ranks of a tensor-parallel engine, and rank 0's side of them.

Rank 0 (the engine's process) plans every step; its ModelRunner hands each call that touches the
model or the KV cache to its `RankDriver`, which broadcasts it to the worker ranks as one
fixed-layout int64 header on the host (gloo) and, where the call has inputs, one tensor on the
device (NCCL on GPUs): no pickle per step, and a worker reads the next header while its GPU still
runs the previous call. Every worker runs the same call on its own shard, so the collectives inside
the forward line up. Only rank 0 samples: the workers' share of the LM head takes part in the
logits' all-gather.

A worker that dies is seen by a watcher thread on rank 0 (which aborts an NCCL group, so that no
collective waits for it), at rank 0's next call, or inside a gloo collective (the connection
closes); the engine then raises TensorParallelError and the group is not used again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, replace
from enum import IntEnum
from multiprocessing import connection
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gpu_engine.config import EngineConfig, ModelConfig
from gpu_engine.errors import TensorParallelError
from gpu_engine.ops import AttentionMetadata
from gpu_engine.parallel.state import (NO_MULTICAST_ENV, TPShard, abort_group, broadcast, broadcast_host,
                                       destroy_group, init_group, tp_world)
from gpu_engine.quant.spec import QuantSpec

log = logging.getLogger(__name__)

HEADER_LEN = 8


class Call(IntEnum):
    STOP = 0
    FORWARD = 1  # header: T, S, max_blocks, num_decodes, max_query_len, max_seq_len, host lists
    LOGITS = 2  # header: rows
    COPY_BLOCKS = 3  # header: pairs
    ALLOCATE_KV = 4  # header: blocks
    PROFILE = 5


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker rank needs to build its shard and its runner (picklable, sent once)."""

    config: EngineConfig
    device: torch.device  # rank 0's; rank r runs on rank_device(device, r)
    model_config: ModelConfig
    folder: Path | None
    dtype: torch.dtype
    quant_spec: QuantSpec | None
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    init_method: str


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on GPUs (rank 0 is cuda:0), the CPU for every rank on the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _free_tcp_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class RankDriver:
    """Rank 0's handle on ranks 1..N-1: starts them, sends them each runner call, stops them."""

    def __init__(self, spec: WorkerSpec):
        """Start ranks 1..N-1 of `spec` (its init_method is chosen here) and join their group."""
        world = spec.config.tensor_parallel_size
        self.lost: str | None = None
        self.block_size = spec.config.block_size
        spec = replace(spec, init_method=_free_tcp_port())
        os.environ.update(NO_MULTICAST_ENV)  # inherited by the workers
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, args=(rank, spec), daemon=True,
                                  name=f"taxiway-tp-rank{rank}") for rank in range(1, world)]
        self._stopping = False
        for p in self.procs:
            p.start()
        try:
            init_group(TPShard(0, world), spec.init_method, spec.device)
        except BaseException:
            self.stop()
            raise
        self._abort_on_loss = spec.device.type == "cuda"
        threading.Thread(target=self._watch, name="taxiway-tp-watch", daemon=True).start()

    # -- calls --------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """One forward: ids, positions [T] int64 and the step's metadata, in one int64 tensor; the
        block tables only as wide as the longest sequence needs (not max_model_len's width)."""
        s = meta.block_tables.shape[0]
        b = min(meta.block_tables.shape[1], -(-meta.max_seq_len // self.block_size))
        self._send(Call.FORWARD, len(ids), s, b, meta.num_decodes, meta.max_query_len, meta.max_seq_len,
                   int(bool(meta.query_start_loc_host)))
        self._payload(torch.cat([ids, positions, meta.slot_mapping, meta.query_start_loc.long(),
                                 meta.seq_lens.long(), meta.block_tables[:, :b].long().flatten()]))

    def logits(self, hidden: torch.Tensor) -> None:
        self._send(Call.LOGITS, hidden.shape[0])
        self._payload(hidden.contiguous())

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self._send(Call.COPY_BLOCKS, len(src))
        self._payload(torch.cat([src, dst]))

    def allocate_kv(self, num_blocks: int) -> None:
        self._send(Call.ALLOCATE_KV, num_blocks)

    def profile(self) -> None:
        self._send(Call.PROFILE)

    def stop(self) -> None:
        """Tell the workers to leave, wait for them briefly, kill any that stay; idempotent."""
        self._stopping = True
        if self.procs and self.lost is None and all(p.is_alive() for p in self.procs) and tp_world() > 1:
            try:
                self._send(Call.STOP)
            except Exception:  # noqa: BLE001 - a rank that is already gone is killed below
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        destroy_group()

    # -- failure ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for any worker to exit; unless stopping, mark the group lost and, on GPUs, abort
        it: NCCL does not notice a dead peer, so rank 0 could otherwise wait inside a collective
        until the group's timeout (gloo raises on the closed connection by itself)."""
        procs = list(self.procs)
        connection.wait([p.sentinel for p in procs])
        if self._stopping:
            return
        self._note_dead(procs)
        log.error("tensor-parallel group lost: %s", self.lost)
        if self._abort_on_loss:
            abort_group()

    def _note_dead(self, procs: list) -> None:
        dead = [f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
                for i, p in enumerate(procs) if p.exitcode is not None]
        if dead and self.lost is None:
            self.lost = "; ".join(dead)

    def check(self) -> None:
        """Raise TensorParallelError if a worker has exited (or the group failed before)."""
        self._note_dead(self.procs)
        if self.lost is not None:
            raise TensorParallelError(f"the tensor-parallel group is down: {self.lost}")

    def fail(self, exc: BaseException) -> TensorParallelError:
        """The error to raise for an exception in a step: the ranks may be out of step, so the
        group is lost either way; a worker that died is named."""
        if isinstance(exc, TensorParallelError):
            return exc
        for p in self.procs:
            p.join(timeout=2)  # a dead peer closes its connection before its exit is reaped
        try:
            self.check()
        except TensorParallelError as lost:
            return lost
        self.lost = f"a step failed on rank 0 ({type(exc).__name__}: {exc})"
        return TensorParallelError(f"the tensor-parallel group is down: {self.lost}")

    def _send(self, call: Call, *fields: int) -> None:
        self.check()
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = int(call)
        header[1 : 1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
        broadcast_host(header)

    def _payload(self, tensor: torch.Tensor) -> None:
        broadcast(tensor)


# -- the worker process -----------------------------------------------------------------------------
def worker_main(rank: int, spec: WorkerSpec) -> None:
    """A worker rank: join the group, build and load this rank's shard, then run rank 0's calls
    until STOP (or until the group fails, when rank 0 is gone)."""
    from gpu_engine.runner import ModelRunner
    from gpu_engine.weights import load_model

    cfg = spec.config
    world = cfg.tensor_parallel_size
    device = rank_device(spec.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_group(TPShard(rank, world), spec.init_method, device)
    try:
        model = load_model(spec.model_config, spec.folder, spec.dtype, device, spec.quant_spec,
                           load_format=cfg.load_format, seed=cfg.seed, kv_fp8=cfg.kv_cache_dtype == "fp8",
                           shard=TPShard(rank, world), progress=False)
        runner = ModelRunner(spec.model_config, cfg, model, device, spec.max_model_len, spec.max_num_seqs,
                             spec.max_num_batched_tokens)
        with torch.inference_mode():
            _serve(runner, spec.dtype)
    finally:
        destroy_group()


def _serve(runner, dtype: torch.dtype) -> None:
    dev = runner.device
    hidden_size = runner.model_cfg.hidden_size
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    while True:
        call, *f = broadcast_host(header).tolist()
        if call == Call.STOP:
            return
        if call == Call.FORWARD:
            ids, positions, meta = _forward_inputs(f, dev)
            runner.model(ids, positions, runner.kv_caches, meta, runner.cos_sin, runner.ops)
        elif call == Call.LOGITS:
            hidden = broadcast(torch.empty(f[0], hidden_size, dtype=dtype, device=dev))
            runner.model.compute_logits(hidden)
        elif call == Call.COPY_BLOCKS:
            pairs = broadcast(torch.empty(2 * f[0], dtype=torch.int64, device=dev))
            runner.copy_kv_blocks(pairs[: f[0]], pairs[f[0] :])
        elif call == Call.ALLOCATE_KV:
            runner.allocate_kv_cache(f[0])
        elif call == Call.PROFILE:
            runner.num_blocks_for_memory()
        else:
            raise TensorParallelError(f"unknown call {call} from rank 0")


def _forward_inputs(f: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    t, s, b, num_decodes, max_q, max_seq, host_lists = f[:7]
    flat = broadcast(torch.empty(3 * t + (s + 1) + s + s * b, dtype=torch.int64, device=dev))
    ids, positions, slots, qsl, lens, tables = flat.split([t, t, t, s + 1, s, s * b])
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=qsl.to(torch.int32), seq_lens=lens.to(torch.int32),
        block_tables=tables.view(s, b).to(torch.int32), num_decodes=num_decodes, max_query_len=max_q,
        max_seq_len=max_seq, query_start_loc_host=qsl.tolist() if host_lists else [],
        seq_lens_host=lens.tolist() if host_lists else [],
    )
    return ids, positions, meta
