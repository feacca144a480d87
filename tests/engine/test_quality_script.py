"""bench/quality.py end to end on a tiny model: perplexity and greedy agreement for each variant."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_quality_script_on_tiny_model(tiny_llama, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "tests" / "data" / "tiny-llama-fp8-dynamic" / name, folder / name)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{(i * 37) % 300 + 3}" for i in range(400)))
    out = tmp_path / "q.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--model", str(folder), "--device", "cpu",
                    "--text", str(text), "--window", "128", "--max-tokens", "4", "--out", str(out),
                    "--variant", "base:", "--variant", "fp8:quantization=fp8,kv_cache_dtype=fp8"],
                   check=True, capture_output=True, cwd=REPO, timeout=300)
    result = json.loads(out.read_text())
    base, fp8 = result["variants"]
    assert base["perplexity_vs_baseline"] == 0 and base["greedy_agreement"]["share"] == 1.0
    assert base["scored_tokens"] >= 400 - base["windows"] and base["windows"] >= 4
    assert fp8["kv_cache_dtype"] == "float8_e4m3fn" and fp8["quantization"].startswith("fp8 (online)")
    assert fp8["perplexity"] > 1 and 0 <= fp8["greedy_agreement"]["agreeing_prefix_tokens"] <= 16 * 4
