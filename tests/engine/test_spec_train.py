"""`taxiway train-draft` end to end on a tiny random Llama (a few steps), and its CLI on the
default model: a head is written in the published layout and loads."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gpu_engine.config import ModelConfig
from gpu_engine.spec.eagle3 import load_eagle3_head
from gpu_engine.spec.train import train_draft
from gpu_engine.spec.train_config import TrainDraftConfig
from gpu_engine.spec.train_data import draft_vocabulary, load_prompts, Example
from taxiway.cli import main


def test_train_draft_writes_a_head_that_loads(tiny_llama, tmp_path):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randrange(4, 12))] for _ in range(10)]
    cfg = TrainDraftConfig(target=tiny_llama, out=str(tmp_path / "head"), holdout_prompts=3,
                           samples_per_prompt=2, max_new_tokens=12, draft_vocab_size=64, ttt_steps=3,
                           steps=4, batch_size=4, warmup_steps=2, eval_k=3, device="cpu", progress=False)
    report = train_draft(cfg, prompt_ids=prompts, engine_kwargs={"num_kv_blocks": 64})
    assert report["num_train_examples"] == 14 and report["num_heldout_examples"] == 3
    assert len(report["history"]) >= 1 and all(l["loss"] > 0 for l in report["history"])
    acc = report["heldout_acceptance"]
    assert acc["k"] == 3 and acc["steps"] > 0 and 1.0 <= acc["mean_acceptance_length"] <= 4.0
    target = ModelConfig.from_folder(tiny_llama)
    head = load_eagle3_head(tmp_path / "head", target, torch.float32, torch.device("cpu"))
    assert head.cfg.draft_vocab_size == 64 and head.cfg.aux_layers == (1, 1, 0)
    written = json.loads((tmp_path / "head" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLMEagle3"]
    assert json.loads((tmp_path / "head" / "train_report.json").read_text())["heldout_acceptance"] == acc


def test_shipped_prompts_and_the_draft_vocabulary():
    rows = load_prompts()
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 300 and kinds == {"chat", "summarize", "code"}
    ex = [Example([1], [5, 5, 7, 9, 9, 9], True), Example([1], [7, 2], True)]
    assert draft_vocabulary(ex, 12, 3).tolist() == [5, 7, 9]
    assert draft_vocabulary(ex, 12, 5).tolist() == [0, 2, 5, 7, 9]  # ties: lower ids


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_prompts .3. must exceed holdout_prompts .24."):
        TrainDraftConfig(num_prompts=3)
    with pytest.raises(ValueError, match="ttt_steps must be a positive integer, got 0"):
        TrainDraftConfig(ttt_steps=0)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: expected"):
        load_prompts(bad)


@pytest.mark.slow
def test_cli_on_the_default_model(default_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "kind": "chat"}) + "\n" for p in [
        "What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.",
        "What is 2 + 2?", "Name a fruit."]))
    rc = main(["train-draft", "--target", str(default_model_dir), "--out", str(tmp_path / "h"),
               "--prompts", str(prompts), "--holdout-prompts", "2", "--samples-per-prompt", "1",
               "--max-new-tokens", "8", "--steps", "2", "--batch-size", "2", "--warmup-steps", "1",
               "--draft-vocab-size", "512", "--ttt-steps", "2", "--eval-k", "2", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["k"] == 2 and summary["heldout_mean_acceptance_length"] >= 1.0
    target = ModelConfig.from_folder(default_model_dir)
    head = load_eagle3_head(tmp_path / "h", target, torch.float32, torch.device("cpu"))
    assert head.cfg.aux_layers == (2, 15, 27) and head.lm_head.weight.shape == (512, 576)
