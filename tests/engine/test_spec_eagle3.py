"""EAGLE-3: the published head layout (read, errors named, written back), the target's auxiliary
hidden states, and chain drafting checked against the training-time-test forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.spec.eagle3 import Eagle3Config, load_eagle3_head, save_eagle3_head
from gpu_engine.spec.eagle3_proposer import Eagle3Proposer
from gpu_engine.spec.proposer import DraftBatch, DraftRequest
from gpu_engine.spec.ttt import ttt_forward
from tests.engine.spec_helpers import CPU, features, head_config, load_target, published_tensors, write_head


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_target(tiny_llama)


@pytest.fixture()
def head_dir(tmp_path, target):
    _, cfg = target
    hcfg = head_config(cfg, 100)
    return write_head(tmp_path / "head", hcfg, published_tensors(hcfg, cfg))


def test_loads_the_published_layout(head_dir, target):
    _, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    with safe_open(str(head_dir / "model.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    q = t["midlayer.self_attn.q_proj.weight"]
    assert torch.equal(head.qkv_proj.weight[: q.shape[0]], q)
    assert torch.equal(head.qkv_proj.weight[q.shape[0]:], torch.cat([t["midlayer.self_attn.k_proj.weight"],
                                                                     t["midlayer.self_attn.v_proj.weight"]]))
    assert torch.equal(head.gate_up_proj.weight, torch.cat([t["midlayer.mlp.gate_proj.weight"],
                                                            t["midlayer.mlp.up_proj.weight"]]))
    assert torch.equal(head.hidden_norm, t["midlayer.hidden_norm.weight"])
    assert torch.equal(head.fc.weight, t["fc.weight"])
    ids = torch.arange(100)
    assert torch.equal(head.target_ids(ids), ids + t["d2t"])
    assert torch.equal(head.t2d, t["t2d"])
    assert head.cfg.aux_layers == (0, 1, 1)
    assert head.embed_tokens is None  # the target's embedding is used


def test_writes_the_published_layout_back(head_dir, target, tmp_path):
    _, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    out = save_eagle3_head(head, tmp_path / "out", cfg, dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f, \
            safe_open(str(head_dir / "model.safetensors"), framework="pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLMEagle3"]
    assert written["draft_vocab_size"] == 100 and written["tie_word_embeddings"] is False
    assert written["eagle_aux_hidden_state_layer_ids"] == [0, 1, 1]
    again = load_eagle3_head(out, cfg, torch.float32, CPU)
    assert torch.equal(again.lm_head.weight, head.lm_head.weight)


def _rewrite(head_dir, tensors=None, **cfg_changes):
    cfg = json.loads((head_dir / "config.json").read_text())
    cfg.update(cfg_changes)
    (head_dir / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, str(head_dir / "model.safetensors"))


def test_layout_errors_name_the_tensor_and_the_shape(head_dir, target):
    _, cfg = target
    good = published_tensors(json.loads((head_dir / "config.json").read_text()), cfg)
    bad = dict(good, **{"fc.weight": torch.zeros(64, 100)})
    _rewrite(head_dir, bad)
    with pytest.raises(ModelLoadError, match=r"'fc.weight' has shape \(64, 100\).*imply \(64, 192\)"):
        load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    _rewrite(head_dir, dict(good, extra=torch.zeros(1)))
    with pytest.raises(ModelLoadError, match="tensor 'extra' is not part of an EAGLE-3 head"):
        load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    _rewrite(head_dir, {k: v for k, v in good.items() if k != "norm.weight"})
    with pytest.raises(ModelLoadError, match="lacks tensors: norm.weight"):
        load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    _rewrite(head_dir, dict(good, d2t=good["d2t"] + 1000))
    with pytest.raises(ModelLoadError, match="d2t maps draft ids outside"):
        load_eagle3_head(head_dir, cfg, torch.float32, CPU)


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 999}, "vocab_size 999 differs from the target's 320"),
    ({"eagle_aux_hidden_state_layer_ids": [0, 1, 5]}, r"auxiliary layers \[5\] are outside"),
    ({"num_hidden_layers": 2}, "only one-layer EAGLE-3 heads"),
    ({"architectures": ["LlamaForCausalLM"]}, "is not an EAGLE-3 head"),
    ({"target_hidden_size": 32}, "target_hidden_size 32 differs"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 0, 0]}}, "disagree"),
])
def test_config_errors(head_dir, target, change, message):
    _rewrite(head_dir, **change)
    with pytest.raises(ModelLoadError, match=message):
        load_eagle3_head(head_dir, target[1], torch.float32, CPU)


def test_aux_layer_conventions():
    target = ModelConfig.from_preset("llama-3.1-8b")  # 32 layers
    base = head_config(target, 32000)
    del base["eagle_aux_hidden_state_layer_ids"]
    assert Eagle3Config.from_dict(base, target).aux_layers == (2, 16, 29)  # EAGLE-3's default
    sglang = dict(base, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 15, 28]})  # outputs
    assert Eagle3Config.from_dict(sglang, target).aux_layers == (2, 16, 29)
    vllm = dict(base, eagle_aux_hidden_state_layer_ids=[2, 16, 29])  # layers entered
    assert Eagle3Config.from_dict(vllm, target).aux_layers == (2, 16, 29)


def test_target_returns_the_residual_stream_entering_chosen_layers(target):
    model, _ = target
    seq = [[5, 9, 17, 3, 88, 41, 7]]
    (aux, hidden), = features(model, seq, (0, 1, 1))
    assert aux.shape == (7, 3 * 64) and hidden.shape == (7, 64)
    emb = model.embed_tokens(torch.tensor(seq[0]))
    assert torch.allclose(aux[:, :64], emb)  # entering layer 0: the embeddings
    assert torch.equal(aux[:, 64:128], aux[:, 128:])
    (_, plain), = features(model, seq, ())
    assert torch.equal(plain, hidden)


def _proposer(head, model, num_blocks=64):
    return Eagle3Proposer(head, model.embed_tokens, num_blocks, 4, 256, CPU)


def _ttt_drafts(head, model, tokens, aux, k):
    """Drafts of a chain starting at the last position, by the training forward (greedy)."""
    cos_sin = rope_cos_sin_cache(head.cfg.layer, 512, CPU)
    t = aux.shape[0] - 1
    pad = aux.new_zeros(len(tokens) - aux.shape[0], aux.shape[1])  # later positions: not attended
    logits = ttt_forward(head, model.embed_tokens, torch.cat([aux, pad])[None], torch.tensor(tokens)[None],
                         k, cos_sin)
    return [int(head.target_ids(lg[0, t].argmax())) for lg in logits]


def test_chain_drafting_matches_the_training_forward(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    tokens = [3, 77, 12, 250, 41, 9, 130, 18, 66, 5, 201]
    (aux, _), = features(model, [tokens], head.cfg.aux_layers)
    n = len(tokens) - 1
    p = _proposer(head, model)
    got = p.propose(DraftBatch([DraftRequest(1, tokens, 4, hidden_rows=(0, 0, n))], aux[:n])).token_ids[0]
    assert len(got) == 4
    # the training forward over tokens + drafts, chain at position n - 1, reproduces them
    assert _ttt_drafts(head, model, tokens + got, aux[:n], 4) == got
    p.cache.check_integrity()


def test_incremental_drafting_equals_drafting_from_scratch(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    prompt = [3, 77, 12, 250, 41, 9, 130, 18, 66]
    (aux, _), = features(model, [prompt], head.cfg.aux_layers)
    p = _proposer(head, model)
    first = p.propose(DraftBatch([DraftRequest(7, prompt, 4, hidden_rows=(0, 0, len(prompt) - 1))],
                                 aux[:-1])).token_ids[0]
    # the target accepts 2 drafts and emits a token of its own; it computed positions 8 .. 10
    tokens = prompt + first[:2] + [299]
    (full, _), = features(model, [tokens], head.cfg.aux_layers)
    n = len(tokens) - 1
    inc = p.propose(DraftBatch([DraftRequest(7, tokens, 3, hidden_rows=(0, 8, 3))], full[8:n])).token_ids[0]
    fresh = _proposer(head, model).propose(
        DraftBatch([DraftRequest(7, tokens, 3, hidden_rows=(0, 0, n))], full[:n])).token_ids[0]
    assert inc == fresh == _ttt_drafts(head, model, tokens + inc, full[:n], 3)
    p.cache.check_integrity()
    p.release(7)
    assert p.cache.blocks.num_free_blocks == p.cache.blocks.num_blocks


def test_batched_and_prefix_hit_sequences(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    a = [3, 77, 12, 250, 41, 9, 130, 18, 66, 5]
    b = [8, 8, 100, 42, 17]
    (fa, _), (fb, _) = features(model, [a, b], head.cfg.aux_layers)
    p = _proposer(head, model)
    rows = torch.cat([fa[:9], fb[2:4]])
    # b: the target only computed positions 2, 3 (a prefix-cache hit covered 0, 1)
    got = p.propose(DraftBatch([DraftRequest(1, a, 3, hidden_rows=(0, 0, 9)),
                                DraftRequest(2, b, 2, hidden_rows=(9, 2, 2))], rows)).token_ids
    alone = _proposer(head, model).propose(
        DraftBatch([DraftRequest(1, a, 3, hidden_rows=(0, 0, 9))], fa[:9])).token_ids[0]
    assert got[0] == alone
    assert p.cache.start(2) == 2  # b's head cache starts where its hidden states do
    # rotary attention is relative: the suffix alone gives the same drafts
    assert got[1] == _ttt_drafts(head, model, b[2:] + got[1], fb[2:4], 2)
    p.cache.check_integrity()


def test_sampled_drafts_carry_their_distribution(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    tokens = [3, 77, 12, 250, 41, 9]
    (aux, _), = features(model, [tokens], head.cfg.aux_layers)
    reqs = [DraftRequest(1, tokens, 3, temperature=1.0, key=11, hidden_rows=(0, 0, 5)),
            DraftRequest(2, tokens, 2, hidden_rows=(0, 0, 5))]
    prop = _proposer(head, model).propose(DraftBatch(reqs, aux[:5]))
    again = _proposer(head, model).propose(DraftBatch(reqs, aux[:5]))
    assert prop.token_ids == again.token_ids and len(prop.token_ids[0]) == 3
    q = prop.draft_probs
    assert q.shape == (5, cfg.vocab_size)
    assert torch.allclose(q.sum(dim=1), torch.ones(5))
    assert bool((q[:, ~head.t2d] == 0).all())  # nothing outside the draft vocabulary
    for j, tok in enumerate(prop.token_ids[0]):
        assert q[j, tok] > 0
    for j, tok in enumerate(prop.token_ids[1]):  # the greedy request's rows are one-hot
        assert q[3 + j, tok] == 1.0


def test_out_of_blocks_proposes_nothing(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    tokens = list(range(3, 40))
    (aux, _), = features(model, [tokens], head.cfg.aux_layers)
    p = _proposer(head, model, num_blocks=4)  # 16 slots < the 36 entries needed
    got = p.propose(DraftBatch([DraftRequest(1, tokens, 3, hidden_rows=(0, 0, 36))], aux[:36]))
    assert got.token_ids == [[]]
    p.cache.check_integrity()
    assert p.cache.blocks.num_free_blocks == 4


def test_a_repeated_call_recomputes_the_last_entry_or_proposes_nothing(head_dir, target):
    model, cfg = target
    head = load_eagle3_head(head_dir, cfg, torch.float32, CPU)
    tokens = [3, 77, 12, 250, 41, 9, 130]
    (aux, _), = features(model, [tokens], head.cfg.aux_layers)
    p = _proposer(head, model)
    batch = DraftBatch([DraftRequest(1, tokens, 3, hidden_rows=(0, 0, 6))], aux[:6])
    first = p.propose(batch).token_ids[0]
    assert p.propose(batch).token_ids[0] == first  # same tokens again: the same drafts
    nothing = DraftBatch([DraftRequest(1, tokens, 3, hidden_rows=(0, 6, 0))], aux[:0])
    assert p.propose(nothing).token_ids == [[]]
    p.cache.check_integrity()
