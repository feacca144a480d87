"""bench/spec_decode.py (batch-1 speculative decoding per method) runs end to end on the default model
(no speculation, n-gram, a random EAGLE-3 head, each gated and always speculating; the draft-model
path is the same engine code)."""

import json
import subprocess
import sys

from gpu_engine.config import ModelConfig
from tests.engine.spec_helpers import head_config, published_tensors, write_head
from tests.integration.svc_stack import ROOT


def test_spec_decode_script_writes_every_method(default_model_dir, tmp_path):
    cfg = ModelConfig.from_folder(default_model_dir)
    hcfg = head_config(cfg, 256, intermediate_size=64)
    head = write_head(tmp_path / "head", hcfg, published_tensors(hcfg, cfg))
    out = tmp_path / "spec.json"
    proc = subprocess.run(
        [sys.executable, "bench/spec_decode.py", "--model", str(default_model_dir), "--eagle-head", str(head),
         "--per-kind", "1", "--osl", "6", "--k", "2",
         "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["per_prompt"]) == ["none", "ngram", "ngram-always", "eagle3", "eagle3-always",
                                          "none-last"]
    assert [r["kind"] for r in result["per_prompt"]["none"]] == ["code", "chat", "summarize"]
    eagle = result["per_prompt"]["eagle3-always"]
    assert all(r["spec_decode"]["num_draft_tokens"] > 0 for r in eagle)
    assert 1.0 <= result["summary"]["eagle3-always"]["mean_acceptance_length"] <= 3.0
    assert set(result["gate"]) == {"ngram", "eagle3"}  # the gated runs say what their gate measured
    assert result["gate"]["eagle3"]["1"]["spec_tokens_per_s"] > 0
    assert all(r["decode_tokens_per_s"] > 0 for rows in result["per_prompt"].values() for r in rows)
    steps = result["step_times"]  # where each method's steps spent their time, drafting included
    assert set(steps) == set(result["per_prompt"]) and steps["eagle3-always"]["verify"]["propose_ms"] > 0
    assert steps["none"]["decode"]["propose_ms"] < 0.01  # nothing to draft
    # the baseline is the faster of the two runs without speculation, so neither beats it
    assert max(r["speedup"] for name in ("none", "none-last") for r in result["per_prompt"][name]) == 1.0
    assert all(r["speedup"] <= 1.0 for name in ("none", "none-last") for r in result["per_prompt"][name])
