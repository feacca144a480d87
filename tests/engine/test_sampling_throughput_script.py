"""bench/sampling_throughput.py (issue 13's table) runs end to end on a tiny model and writes every row."""

import json
import subprocess
import sys

from tests.integration.svc_stack import ROOT


def test_sampling_table_script_writes_every_row(tiny_llama, tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "bench/sampling_throughput.py", "--model", tiny_llama, "--load-format", "auto",
         "--dtype", "float32", "--device", "cpu", "--num-requests", "6", "--isl", "6", "--osl", "4",
         "--max-num-seqs", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [r["row"] for r in result["throughput"]]
    assert names[0] == "greedy" and "sampled_plus_repetition_penalty_1.1" in names and len(names) == 7
    assert all(r["output_tokens_per_s"] > 0 for r in result["throughput"])
    assert [c["case"] for c in result["batch1"]] == ["greedy", "sampled_with_penalties"]
