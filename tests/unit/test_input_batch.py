"""The runner side of the persistent batch on the CPU: each step's device inputs (token ids, positions,
KV slots, block tables, sampling rows) equal what the plan's sequences say, with decode tokens
read from the device in the overlapped loop."""

import numpy as np
import pytest
import torch

from gpu_engine.input_batch import InputBatch
from gpu_engine.step_inputs import InputBuilder
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
    want = [(7 * want_ids[r] + 3 * k + 1) % VOCAB for k, r in enumerate(rows)]
    logits = torch.full((len(rows), VOCAB), float("-inf"))
    logits[torch.arange(len(rows)), torch.tensor(want, dtype=torch.int64)] = 0.0  # one token possible
    tokens = batch.sample(layout, logits, torch.from_numpy(layout.sample_slot))
    assert tokens.tolist() == want
    for r, slot in enumerate(layout.sample_slot.tolist()):  # each sample: its slot's next input, on the device
        last_sampled[batch.seqs[slot].seq_id] = want[r]
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
    builder = InputBuilder(torch.device("cpu"))
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


def test_slots_start_sampling_where_their_sequences_are_and_forks_draw_their_own_tokens():
    sched = make_scheduler(budget=100)
    resumed = make_request("resumed", [1, 2, 3], max_tokens=6, temperature=0.0, min_tokens=4, stop_token_ids=[11])
    forked = make_request("forked", [4, 5, 6], max_tokens=4, temperature=1.0, n=3, seed=7)
    batch = InputBatch(8, 16, BS, VOCAB, torch.device("cpu"))
    builder = InputBuilder(torch.device("cpu"))
    sched.add(resumed, prior_output_token_ids=[20, 21])
    sched.add(forked)
    plan = sched.schedule()
    batch.apply(plan, builder.upload)
    layout = batch.layout(plan)
    r_slot = resumed.seqs[0].slot
    assert batch.sampler.slot_state(r_slot)[0] == 2  # it draws its third output token next
    assert [s.index for s in forked.seqs] == [0, 1, 2]  # forked as the prompt was planned
    fork_slots = [s.slot for s in forked.seqs]
    assert layout.sample_slot.tolist() == [r_slot] + fork_slots
    assert layout.sample_rows.tolist() == [4, 7, 7, 7]  # the forking prompt's last row, three times
    logits = torch.zeros(4, VOCAB)
    logits[0, 11] = 5.0  # the stop token, banned until min_tokens
    tokens = batch.sample(layout, logits, torch.from_numpy(layout.sample_slot)).tolist()
    assert tokens[0] != 11
    assert len(set(tokens[1:])) > 1  # three seeded streams over a uniform distribution
    assert [batch.sampler.slot_state(s)[0] for s in [r_slot] + fork_slots] == [3, 1, 1, 1]
