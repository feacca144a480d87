"""The runner side of the persistent batch on the CPU: each step's device inputs (token ids, positions,
KV slots, block tables, sampling rows) equal what the plan's sequences say, with decode tokens
read from the device in the overlapped loop."""

import numpy as np
import pytest
import torch

from gpu_engine.input_batch import InputBatch
from gpu_engine.step_inputs import InputBuilder, sampling_batch
from gpu_engine.step_plan import PENDING, StepResult
from tests.fakes import make_request
from tests.unit.test_batch_state import BS, make_scheduler

VOCAB = 50


def expected_rows(plan, last_sampled):
    """Per token: (id, position, kv slot); per sequence: its table, length, query length."""
    ids, pos, kv, tables, lens, qlens = [], [], [], [], [], []
    for e in plan.scheduled:
        seq = e.seq
        for p in range(e.start, e.start + e.num_tokens):
            t = seq.token_ids[p]
            ids.append(last_sampled[seq.seq_id] if t == PENDING else t)
            pos.append(p)
            kv.append(seq.block_table[p // BS] * BS + p % BS)
        tables.append(list(seq.block_table))
        lens.append(e.start + e.num_tokens)
        qlens.append(e.num_tokens)
    return ids, pos, kv, tables, lens, qlens


def step(sched, batch, builder, last_sampled):
    """One runner-like launch checked against the plan; returns (plan, packed result)."""
    plan = sched.schedule()
    if plan.is_empty:
        return None
    up = builder.upload
    batch.apply(plan, up)
    layout = batch.layout(plan)
    ids, positions, meta, tok_slot = batch.device_inputs(layout, up, host_lists=True)
    want_ids, want_pos, want_kv, want_tables, want_lens, want_q = expected_rows(plan, last_sampled)
    assert ids.tolist() == want_ids
    assert positions.tolist() == want_pos
    assert meta.slot_mapping.tolist() == want_kv
    assert [row[: len(t)] for row, t in zip(meta.block_tables.tolist(), want_tables)] == want_tables
    assert meta.seq_lens.tolist() == want_lens == meta.seq_lens_host
    assert np.diff(meta.query_start_loc.tolist()).tolist() == want_q
    assert meta.num_decodes == plan.num_decodes
    rows = layout.sample_rows.tolist()
    tokens = torch.tensor([(7 * want_ids[r] + 3 * k + 1) % VOCAB for r, k in zip(rows, layout.sample_fork.tolist())],
                          dtype=torch.int64)
    batch.record(layout, tokens, torch.from_numpy(layout.sample_write))
    for r, (slot, k) in enumerate(zip(layout.sample_slot.tolist(), layout.sample_fork.tolist())):
        if k == 0:  # the sequence's own sample: its next input, on the device
            last_sampled[batch.seqs[slot].seq_id] = int(tokens[r])
    sched.commit(plan)
    return plan, StepResult(token_ids=tokens.numpy().copy())


@pytest.mark.parametrize("overlap", [False, True])
def test_device_inputs_match_the_plan_through_chunking_preemption_and_slot_reuse(overlap):
    sched = make_scheduler(num_blocks=14, budget=9, max_seqs=3, caching=False)
    reqs = [make_request(f"r{i}", [(3 * i + j) % 40 + 1 for j in range(2 + 3 * i)], max_tokens=5 + i)
            for i in range(6)]
    for r in reqs:
        sched.add(r)
    batch = InputBatch(3, 64, BS, VOCAB, torch.device("cpu"))
    builder = InputBuilder(torch.device("cpu"), VOCAB)
    last_sampled: dict[int, int] = {}
    inflight = None
    for _ in range(200):
        if not sched.num_unfinished and inflight is None:
            break
        launched = step(sched, batch, builder, last_sampled)
        if not overlap and launched is not None:
            sched.update(*launched)
            launched = None
        if inflight is not None:
            sched.update(*inflight)
        inflight = launched
    assert all(r.finished for r in reqs)
    assert sched.num_preemptions > 0
    assert all(len(s.output_token_ids) == r.max_tokens for r in reqs for s in r.seqs)


def test_sampling_rows_come_from_the_slots_and_greedy_needs_no_upload():
    sched = make_scheduler(budget=100)
    greedy = make_request("g", [1, 2, 3], max_tokens=4, temperature=0.0)
    hot = make_request("h", [4, 5, 6], max_tokens=4, temperature=0.7, top_k=5, top_p=0.9)
    banned = make_request("b", [7, 8, 9], max_tokens=4, temperature=0.0, min_tokens=2, stop_token_ids=[11])
    batch = InputBatch(8, 16, BS, VOCAB, torch.device("cpu"))
    builder = InputBuilder(torch.device("cpu"), VOCAB)
    sched.add(greedy)
    plan = sched.schedule()
    batch.apply(plan, builder.upload)
    first = batch.layout(plan)
    assert sampling_batch(batch, first, builder.upload).all_greedy
    batch.record(first, torch.tensor([5]), torch.from_numpy(first.sample_write))
    for r in (hot, banned):
        sched.add(r)
    sched.commit(plan)
    plan = sched.schedule()
    batch.apply(plan, builder.upload)
    layout = batch.layout(plan)
    sb = sampling_batch(batch, layout, builder.upload)
    assert not sb.all_greedy and sb.any_top_k and sb.any_top_p and not sb.any_min_p
    order = [e.seq.request.request_id for e in plan.scheduled]
    assert sb.temperature.tolist() == pytest.approx([{"g": 0.0, "h": 0.7, "b": 0.0}[r] for r in order])
    assert sb.top_k.tolist() == [{"g": 0, "h": 5, "b": 0}[r] for r in order]
    assert sb.banned == [(order.index("b"), [11])]  # make_request ignores eos
