"""Speculative decoding pieces on a GPU: the rejection sampler gives the CPU's tokens, the
drafters run on the Triton kernels in bfloat16, and train-draft trains under bf16 autocast."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_engine.sampler import row_key
from gpu_engine.spec.eagle3 import load_eagle3_head
from gpu_engine.spec.eagle3_proposer import Eagle3Proposer
from gpu_engine.spec.proposer import DraftBatch, DraftRequest
from gpu_engine.spec.rejection import VerifyLayout, rejection_sample
from tests.engine.spec_helpers import features, head_config, load_target, published_tensors, write_head

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dense", [False, True])
def test_rejection_sampler_on_the_gpu_equals_the_cpu(dense):
    g = torch.Generator().manual_seed(0)
    k = [3, 0, 5, 1] * 8
    layout_args = (k,)
    n, d, v = sum(k) + len(k), sum(k), 1000
    p = torch.rand(n, v, generator=g).pow(4)
    p /= p.sum(1, keepdim=True)
    q = torch.rand(d, v, generator=g).pow(4) if dense else None
    if q is not None:
        q /= q.sum(1, keepdim=True)
    drafts = torch.randint(0, v, (d,), generator=g)
    greedy = torch.arange(len(k)) % 3 == 0
    keys = torch.tensor([row_key(i, 0) for i in range(len(k))])
    pos = torch.arange(len(k), dtype=torch.int64) * 7
    out = []
    for dev in (torch.device("cpu"), CUDA):
        res = rejection_sample(p.to(dev), drafts.to(dev), VerifyLayout.build(*layout_args, dev), greedy.to(dev),
                               keys.to(dev), pos.to(dev), None if q is None else q.to(dev))
        out.append((res.token_ids.cpu(), res.num_emitted.cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_eagle3_drafts_in_bfloat16_on_the_kernels(tiny_llama, tmp_path):
    model, cfg = load_target(tiny_llama)
    hcfg = head_config(cfg, 100)
    head = load_eagle3_head(write_head(tmp_path / "h", hcfg, published_tensors(hcfg, cfg)), cfg,
                            torch.bfloat16, CUDA)
    rng = random.Random(0)
    seqs = [[rng.randrange(3, 320) for _ in range(n)] for n in (5, 17, 40, 9)]
    feats = features(model, seqs, head.cfg.aux_layers)
    model = model.to(CUDA, torch.bfloat16)
    p = Eagle3Proposer(head, model.embed_tokens, 64, 16, 128, CUDA)
    assert p.ops.name == "triton"
    rows, reqs, off = [], [], 0
    for i, (s, (aux, _)) in enumerate(zip(seqs, feats)):
        reqs.append(DraftRequest(i, s, 4, temperature=0.7 * (i % 2), key=i, hidden_rows=(off, 0, len(s) - 1)))
        rows.append(aux[: len(s) - 1])
        off += len(s) - 1
    prop = p.propose(DraftBatch(reqs, torch.cat(rows).to(CUDA, torch.bfloat16)))
    assert [len(t) for t in prop.token_ids] == [4, 4, 4, 4]
    assert all(bool(head.t2d[t]) for toks in prop.token_ids for t in toks)
    assert prop.draft_probs.shape == (16, cfg.vocab_size)
    p.cache.check_integrity()


def test_train_draft_under_autocast(tiny_llama, tmp_path):
    from gpu_engine.spec.train import train_draft
    from gpu_engine.spec.train_config import TrainDraftConfig

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randrange(4, 12))] for _ in range(10)]
    cfg = TrainDraftConfig(target=tiny_llama, out=str(tmp_path / "head"), holdout_prompts=3, samples_per_prompt=2,
                           max_new_tokens=16, draft_vocab_size=64, ttt_steps=3, steps=20, batch_size=4,
                           warmup_steps=2, eval_k=3, device="cuda", dtype="bfloat16", progress=False)
    report = train_draft(cfg, prompt_ids=prompts, engine_kwargs={"num_kv_blocks": 64})
    assert report["device"].startswith("cuda") and report["heldout_acceptance"]["steps"] > 0
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
