"""`taxiway train-draft`: train an EAGLE-3 head for a target by self-distillation.

1. The target answers the prompts through our own engine (batched): greedy, plus sampled answers.
2. One target forward over each prompt + answer keeps its auxiliary and final hidden states.
3. The head is trained with EAGLE-3's training-time test (gpu_engine/spec/ttt.py): several unrolled
   draft steps, each fed the head's own outputs, against the target's distribution over the draft
   vocabulary (the answers' most used tokens), steps weighted 0.8^i.
4. Held-out prompts' greedy answers measure the mean acceptance length at k: chain drafting by the
   real proposer against the target's tokens, as greedy speculative decoding would run.
5. The head is written in the published EAGLE-3 layout (gpu_engine/spec/eagle3.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpu_engine.model import CausalLM, rope_cos_sin_cache
from gpu_engine.spec.eagle3 import Eagle3Config, Eagle3Head, default_aux_layers, save_eagle3_head
from gpu_engine.spec.eagle3_proposer import Eagle3Proposer
from gpu_engine.spec.features import target_features
from gpu_engine.spec.proposer import DraftBatch, DraftRequest
from gpu_engine.spec.train_data import (Example, draft_vocabulary, encode_prompts, generate,
                                        load_prompts, split_holdout)
from gpu_engine.spec.train_config import TrainDraftConfig
from gpu_engine.spec.ttt import ttt_forward


def train_draft(cfg: TrainDraftConfig, prompt_ids: list[list[int]] | None = None, *,
                engine_kwargs: dict | None = None) -> dict:
    """Run the whole pipeline; returns the report also written to OUT/train_report.json.
    `prompt_ids` (token ids) replace the prompt file (targets without a tokenizer, tests)."""
    from taxiway import LLM

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    llm = LLM(cfg.target, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
              **({"gpu_memory_utilization": 0.5} | (engine_kwargs or {})))
    engine = llm.engine
    if prompt_ids is None:
        rows = load_prompts(cfg.prompts)[: cfg.num_prompts]
        prompt_ids, kinds = encode_prompts(engine.tokenizer, rows), [r["kind"] for r in rows]
    else:
        prompt_ids, kinds = prompt_ids[: cfg.num_prompts], [""] * len(prompt_ids[: cfg.num_prompts])
    if len(prompt_ids) <= cfg.holdout_prompts:
        raise ValueError(f"{len(prompt_ids)} prompts, but {cfg.holdout_prompts} are held out")
    examples = generate(llm, prompt_ids, kinds, cfg.max_new_tokens, cfg.samples_per_prompt,
                        cfg.sample_temperature, cfg.seed)
    t_gen = time.perf_counter()
    model, target_cfg = engine.runner.model, engine.model_config
    train_set, held = split_holdout(examples, len(prompt_ids), cfg.holdout_prompts, cfg.seed)
    for e in train_set:
        e.prompt_ids, e.response_ids = _truncate(e, cfg.max_seq_len)
    aux_layers = default_aux_layers(target_cfg.num_layers)
    draft_ids = draft_vocabulary(train_set, target_cfg.vocab_size, min(cfg.draft_vocab_size, target_cfg.vocab_size))
    head = init_head(model, aux_layers, draft_ids)
    feats = target_features(model, engine.runner.ops, engine.runner.cos_sin,
                            [e.token_ids for e in train_set + held], aux_layers)
    t_feat = time.perf_counter()
    history = train_head(head, model, train_set, feats[: len(train_set)], cfg)
    t_train = time.perf_counter()
    head = head.to(model.norm.dtype).eval()  # measured as it will be served
    acceptance = heldout_acceptance(head, model, held, feats[len(train_set):], cfg.eval_k, engine.config.block_size)
    out = save_eagle3_head(head, cfg.out, target_cfg)
    coverage = _coverage(held, head.t2d)
    report = {
        "target": target_cfg.name, "device": str(engine.device), "config": asdict(cfg),
        "num_train_examples": len(train_set), "num_heldout_examples": len(held),
        "train_tokens": sum(len(e.token_ids) for e in train_set),
        "aux_layers": list(aux_layers), "draft_vocab_size": int(draft_ids.numel()),
        "heldout_draft_vocab_coverage": coverage, "heldout_acceptance": acceptance,
        "history": history,
        "seconds": {"generate": t_gen - t_start, "features": t_feat - t_gen, "train": t_train - t_feat,
                    "total": time.perf_counter() - t_start},
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _truncate(e: Example, max_len: int) -> tuple[list[int], list[int]]:
    keep = max(max_len - len(e.prompt_ids), 0)
    if keep == 0:  # a prompt longer than the limit: keep its tail and a little answer
        return e.prompt_ids[-(max_len // 2):], e.response_ids[: max_len - max_len // 2]
    return e.prompt_ids, e.response_ids[:keep]


def init_head(target: CausalLM, aux_layers: tuple[int, ...], draft_ids: torch.Tensor) -> Eagle3Head:
    """A head shaped like one target layer; its lm_head and final norm start as the target's (over
    the draft vocabulary), the rest random (N(0, 0.02), unit norms). float32, trainable."""
    t = target.cfg
    cfg = Eagle3Config(layer=t, vocab_size=t.vocab_size, draft_vocab_size=int(draft_ids.numel()),
                       target_hidden_size=t.hidden_size, aux_layers=tuple(aux_layers))
    dev = target.norm.device
    head = Eagle3Head(cfg, own_embedding=False).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, p in head.named_parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 0.02, generator=gen)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.lm_head.weight[draft_ids.to(dev)].float())
        head.norm.copy_(target.norm.float())
    head.set_draft_vocab(draft_ids)
    return head


def _batches(n: int, size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - size + 1 if n >= size else 1, size):
            yield order[i : i + size]


def train_head(head: Eagle3Head, target: CausalLM, examples: list[Example],
               feats: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainDraftConfig) -> list[dict]:
    """The training-time-test objective, AdamW with warmup and cosine decay; returns per-log metrics."""
    dev = target.norm.device
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cos_sin = rope_cos_sin_cache(head.cfg.layer, cfg.max_seq_len + cfg.ttt_steps + 1, dev)
    lm_rows = target.lm_head.weight.detach()[head.target_ids(torch.arange(head.cfg.draft_vocab_size, device=dev))]
    weights = [0.8**i for i in range(cfg.ttt_steps)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    history, start = [], time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train-draft", unit="step", disable=not cfg.progress)
    batches = _batches(len(examples), min(cfg.batch_size, len(examples)), cfg.seed)
    for step in range(cfg.steps):
        if time.perf_counter() - start > cfg.time_budget_s:
            break
        lr = _lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(batches)
        batch = _collate([examples[i] for i in idx], [feats[i] for i in idx], dev)
        with autocast:
            logits = ttt_forward(head, target.embed_tokens, batch["aux"], batch["tokens"], cfg.ttt_steps, cos_sin)
            losses, accs = _ttt_losses(logits, batch, lm_rows, head)
        loss = sum(w * l for w, l in zip(weights, losses))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        bar.update(1)
        if step % 25 == 0 or step == cfg.steps - 1:
            row = {"step": step, "lr": lr, "loss": float(loss.detach()), "acc": [round(float(a), 4) for a in accs]}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc'][0]:.3f}")
    bar.close()
    return history


def _lr(step: int, cfg: TrainDraftConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _collate(examples: list[Example], feats: list[tuple[torch.Tensor, torch.Tensor]],
             dev: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch: tokens [B, L] int64, aux [B, L, 3Ht], final [B, L, Ht] (the target's normed
    last hidden state), answer [B, L] bool (positions holding answer tokens)."""
    length = max(len(e.token_ids) for e in examples)
    b = len(examples)
    aux0, fin0 = feats[0]
    tokens = torch.zeros(b, length, dtype=torch.int64, device=dev)
    answer = torch.zeros(b, length, dtype=torch.bool, device=dev)
    aux = aux0.new_zeros(b, length, aux0.shape[1])
    final = fin0.new_zeros(b, length, fin0.shape[1])
    for r, (e, (a, f)) in enumerate(zip(examples, feats)):
        n, p = len(e.token_ids), len(e.prompt_ids)
        tokens[r, :n] = torch.tensor(e.token_ids, device=dev)
        answer[r, p:n] = True
        aux[r, :n], final[r, :n] = a[:n], f[:n]
    dtype = torch.float32
    return {"tokens": tokens, "answer": answer, "aux": aux.to(dtype), "final": final}


def _ttt_losses(logits: list[torch.Tensor], batch: dict[str, torch.Tensor], lm_rows: torch.Tensor,
                head: Eagle3Head) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Soft cross-entropy against the target's distribution over the draft vocabulary, on answer
    positions whose next token is in it; and top-1 accuracy per step."""
    final, tokens, answer = batch["final"], batch["tokens"], batch["answer"]
    losses, accs = [], []
    for i, lg in enumerate(logits):
        # step i at position t predicts token t + 2 + i from the target's logits at t + 1 + i
        with torch.no_grad():
            src = F.pad(final[:, 1 + i :], (0, 0, 0, 1 + i))
            p = (src.to(lm_rows.dtype) @ lm_rows.T).float().softmax(dim=-1)
            label = F.pad(tokens[:, 2 + i :], (0, 2 + i))
            mask = F.pad(answer[:, 2 + i :], (0, 2 + i)) & head.t2d[label]
            denom = mask.sum().clamp(min=1)
        logp = lg.float().log_softmax(dim=-1)
        losses.append(-((p * logp).sum(-1) * mask).sum() / denom)
        with torch.no_grad():
            hit = head.target_ids(lg.argmax(-1)) == label
            accs.append((hit & mask).sum() / denom)
    return losses, accs


def heldout_acceptance(head: Eagle3Head, target: CausalLM, examples: list[Example],
                       feats: list[tuple[torch.Tensor, torch.Tensor]], k: int, block_size: int) -> dict:
    """Greedy speculative decoding of the held-out answers with chain drafting of k tokens:
    mean tokens per target step (accepted drafts + 1) and the acceptance rate of each draft position."""
    dev = target.norm.device
    max_len = max(len(e.token_ids) for e in examples)
    blocks = len(examples) * (-(-(max_len + k + 1) // block_size) + 1)
    proposer = Eagle3Proposer(head, target.embed_tokens, blocks, block_size, max_len + k + 1, dev)
    live = {i: len(e.prompt_ids) + 1 for i, e in enumerate(examples)}  # known tokens: prompt + first answer token
    computed = {i: 0 for i in live}  # positions whose hidden states were handed over
    steps = emitted = 0
    per_position = [0] * k
    while live:
        reqs, rows, offset = [], [], 0
        for i, known in live.items():
            tokens = examples[i].token_ids
            first, count = computed[i], known - 1 - computed[i]
            reqs.append(DraftRequest(i, tokens[:known], min(k, len(tokens) - known), hidden_rows=(offset, first, count)))
            rows.append(feats[i][0][first : first + count])
            offset += count
        proposal = proposer.propose(DraftBatch(reqs, torch.cat(rows).to(dev)))
        for req, drafts in zip(reqs, proposal.token_ids):
            i, known = req.seq_id, live[req.seq_id]
            tokens = examples[i].token_ids
            a = 0
            while a < len(drafts) and drafts[a] == tokens[known + a]:
                a += 1
            if len(drafts) == k:  # steps cut short by the end of the answer are not counted
                steps += 1
                emitted += a + 1
                for j in range(a):
                    per_position[j] += 1
            # the verify step computed positions known - 1 .. known - 1 + a: handed over next time
            computed[i] = known - 1
            live[i] = min(known + a + 1, len(tokens))
            if live[i] >= len(tokens):
                del live[i]
                proposer.release(i)
    return {"k": k, "steps": steps, "mean_acceptance_length": emitted / max(steps, 1),
            "acceptance_rate_by_position": [c / max(steps, 1) for c in per_position]}


def _coverage(examples: list[Example], t2d: torch.Tensor) -> float:
    ids = torch.tensor([t for e in examples for t in e.response_ids], dtype=torch.int64, device=t2d.device)
    return float(t2d[ids].float().mean()) if ids.numel() else 0.0
