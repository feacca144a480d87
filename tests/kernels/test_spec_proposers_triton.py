"""The drafters on the Triton kernels (CPU interpreter here, the GPU there) propose what they
propose on the torch references: EAGLE-3 chain drafting and a draft model, prefill + chain steps."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from gpu_engine.triton_ops import TritonOps  # noqa: E402
from gpu_engine.spec.draft_model import DraftModelProposer  # noqa: E402
from gpu_engine.spec.eagle3 import load_eagle3_head  # noqa: E402
from gpu_engine.spec.eagle3_proposer import Eagle3Proposer  # noqa: E402
from gpu_engine.spec.proposer import DraftBatch, DraftRequest  # noqa: E402
from tests.engine.spec_helpers import features, head_config, load_target, published_tensors, write_head  # noqa: E402
from tests.tiny_models import tiny_checkpoints, tiny_llama  # noqa: E402,F401

A = [3, 77, 12, 250, 41, 9, 130, 18, 66, 5, 201]
B = [8, 100, 42, 17, 5, 9]


def _drafts(proposer, batch, ops, device):
    proposer.ops = ops
    return proposer.propose(batch).token_ids


def test_eagle3_on_triton_matches_torch(tiny_llama, tmp_path, device):
    model, cfg = load_target(tiny_llama)
    hcfg = head_config(cfg, 100)
    head = load_eagle3_head(write_head(tmp_path / "h", hcfg, published_tensors(hcfg, cfg)), cfg,
                            torch.float32, torch.device("cpu"))
    (fa, _), (fb, _) = features(model, [A, B], head.cfg.aux_layers)
    dev = torch.device(device)
    head, model = head.to(dev), model.to(dev)
    batch = DraftBatch([DraftRequest(1, B, 2, hidden_rows=(0, 0, 5)), DraftRequest(2, A, 4, hidden_rows=(5, 0, 10))],
                       torch.cat([fb[:5], fa[:10]]).to(dev))
    from gpu_engine.ops import TorchOps

    got = {}
    for name in ("torch", "triton"):
        ops = TritonOps() if name == "triton" else TorchOps()
        got[name] = _drafts(Eagle3Proposer(head, model.embed_tokens, 16, 16, 64, dev), batch, ops, dev)
    assert got["triton"] == got["torch"]
    assert [len(t) for t in got["torch"]] == [2, 4]


def test_draft_model_on_triton_matches_torch(tiny_llama, device):
    model, cfg = load_target(tiny_llama)
    dev = torch.device(device)
    model = model.to(dev)
    from gpu_engine.ops import TorchOps

    batch = DraftBatch([DraftRequest(1, B, 3), DraftRequest(2, A, 3)])
    got = [_drafts(DraftModelProposer(model, 16, 16, 64, dev, cfg.vocab_size), batch, ops, dev)
           for ops in (TorchOps(), TritonOps())]
    assert got[0] == got[1] and [len(t) for t in got[0]] == [3, 3]
