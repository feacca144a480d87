"""bench/overlap_probe.py (issue 14: two half-batches on two streams): on the CPU the probe runs the
whole decode batch and its two halves eagerly, and their greedy tokens must agree (all rows in
float32)."""

import json

import torch

from bench.overlap_probe import decode_program, main, probe
from bench.profile_decode import decoding_engine


class _Args:
    def __init__(self, model):
        self.model, self.seqs, self.ctx, self.steps = model, 5, 30, 1
        self.quantization, self.kv_cache_dtype, self.enforce_eager, self.device = None, "auto", False, "cpu"


def test_halves_give_the_whole_batch_tokens(tiny_llama):
    engine = decoding_engine(_Args(tiny_llama))
    found = probe(engine, reps=1)
    assert found == {"rows": 5, "halves": [2, 3], "agreeing_rows": 1.0}
    rows = sorted(s for s, seq in enumerate(engine.runner.batch.seqs) if seq is not None)
    with torch.inference_mode():  # what the probe compares is the next greedy token of each row
        whole = decode_program(engine, rows)()
        engine.step()
    assert [seq.token_ids[-1] for seq in (engine.runner.batch.seqs[s] for s in rows)] == whole.tolist()


def test_script_writes_its_record(tiny_llama, tmp_path):
    out = tmp_path / "probe.json"
    assert main(["--model", tiny_llama, "--device", "cpu", "--seqs", "4", "--ctx", "20", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "overlap_probe" and r["rows"] == 4 and r["agreeing_rows"] == 1.0
    assert r["context"]["min"] >= 20 and "source_sha256" in r["machine"]
