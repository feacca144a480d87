"""bench/spec_verify_cost.py (verify step vs decode step, issue 10) on a tiny model on the CPU, with
the overlapped loop a GPU runs: every (batch, k) is measured through the engine's own verify path
(each timed step checked to be B verify entries of 1 + k tokens), and the projection is the
acceptance length over the measured cost ratio."""

import json

import pytest

from bench.spec_verify_cost import acceptance_from_file, main, set_mode

BATCHES, KS, CONTEXT = [1, 3], [1, 2], 24


def spec_batch1_result(path, k: int) -> None:
    """A bench/spec_decode.py result of two prompts (the fields the projection reads)."""
    def row(kind, length):
        return {"kind": kind, "spec_decode": {"mean_acceptance_length": length}}

    path.write_text(json.dumps({
        "config": {"k": k, "model": None},
        "per_prompt": {"none": [{"kind": "chat"}, {"kind": "code"}],
                       "ngram": [row("chat", 1.2), row("code", 2.0)]}}))


def test_every_batch_and_k_is_measured_and_projected(tiny_llama, tmp_path):
    accept, out = tmp_path / "spec-batch1.json", tmp_path / "cost.json"
    spec_batch1_result(accept, k=2)
    assert main(["--model", tiny_llama, "--dtype", "float32", "--device", "cpu",
                 "--batch-sizes", *map(str, BATCHES), "--ks", *map(str, KS), "--context", str(CONTEXT),
                 "--warmup", "1", "--steps", "2", "--reps", "2", "--num-kv-blocks", "128", "--async-scheduling",
                 "--acceptance", str(accept), "--acceptance-length", "1=1.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine"]["async_scheduling"] is True  # plain decodes overlap, as on a GPU
    decode = {r["batch"]: r for r in result["decode"]}
    assert sorted(decode) == BATCHES and sorted(r["batch"] for r in result["decode_sync"]) == BATCHES
    verify = {(r["batch"], r["k"]): r for r in result["verify"]}
    assert sorted(verify) == [(b, k) for b in BATCHES for k in KS]
    for (b, k), row in verify.items():
        assert row["ms"] > 0 and all(t > 0 for t in row["runs_ms"]) and len(row["runs_ms"]) == 2
        assert row["verify_over_decode"] == pytest.approx(row["ms"] / decode[b]["ms"], abs=1e-3)
        assert CONTEXT < row["context_start"] <= row["context_end"]
        assert 1.0 <= row["observed_acceptance_length"] <= k + 1
    rows = result["projection"]["rows"]
    assert result["projection"]["note"].startswith("projection")
    lengths = {(r["method"], r["kind"]): r["acceptance_length"] for r in rows}
    assert lengths == {("ngram", "all"): 1.6, ("ngram", "chat"): 1.2, ("ngram", "code"): 2.0, ("given", "all"): 1.5}
    assert len(rows) == len(lengths) * len(BATCHES)
    for r in rows:
        ratio = verify[(r["batch"], r["k"])]["verify_over_decode"]
        assert r["projected_speedup"] == pytest.approx(r["acceptance_length"] / ratio, abs=1e-3)


def test_an_acceptance_length_for_an_unmeasured_k_is_refused_before_the_engine_starts(tmp_path):
    accept = tmp_path / "spec-batch1.json"
    spec_batch1_result(accept, k=4)
    with pytest.raises(SystemExit, match=r"is for k=4, but this run measures k in \[1, 2\]: add 4 to --ks"):
        main(["--model", str(tmp_path / "missing"), "--ks", "1", "2", "--acceptance", str(accept)])
    with pytest.raises(SystemExit, match="K=L items"):
        main(["--acceptance-length", "4:2.5"])


def test_a_timed_step_of_another_shape_is_an_error_not_a_figure(tiny_llama, tmp_path, monkeypatch):
    from bench import spec_verify_cost

    real = spec_verify_cost.ForcedDrafts.propose
    monkeypatch.setattr(spec_verify_cost.ForcedDrafts, "propose",  # one draft short of k for every sequence
                        lambda self, batch: real(spec_verify_cost.ForcedDrafts(self.k - 1), batch))
    with pytest.raises(RuntimeError, match=r"expected 2 verify steps of 1 sequences and 3 tokens, the engine "
                                           r"ran \{'verify': \{'steps': 2, 'mean_seqs': 1.0, 'mean_tokens': 2.0"):
        main(["--model", tiny_llama, "--dtype", "float32", "--device", "cpu", "--batch-sizes", "1",
              "--ks", "2", "--context", str(CONTEXT), "--warmup", "1", "--steps", "2", "--reps", "1",
              "--num-kv-blocks", "64"])


def test_the_projection_reads_speculation_s_own_acceptance_and_skips_prompts_that_verified_nothing(tmp_path):
    path = tmp_path / "spec-batch1.json"

    def row(kind, drafts, length):
        return {"kind": kind, "spec_decode": {"num_drafts": drafts, "mean_acceptance_length": length}}

    path.write_text(json.dumps({"config": {"k": 4}, "per_prompt": {
        "none": [{"kind": "chat"}, {"kind": "code"}],
        "ngram": [row("chat", 0, 0.0), row("code", 3, 2.0)],  # gated: kept off on the chat prompt
        "ngram-always": [row("chat", 20, 1.5), row("code", 0, 0.0)]}}))  # no n-gram match on code
    got = {(s["method"], s["kind"]): s["acceptance_length"] for s in acceptance_from_file(str(path))}
    assert got == {("ngram-always", "all"): 1.5, ("ngram-always", "chat"): 1.5}


def test_the_measured_decoders_have_no_gate():
    """The speculation gate would turn the forced drafts off where verify steps measure slower
    (on the H200 it did after 2 of 50 steps): every mode runs ungated."""
    from types import SimpleNamespace

    from gpu_engine.spec.config import SpeculativeConfig

    engine = SimpleNamespace(config=SimpleNamespace(speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4)))
    for k in (0, 3):
        set_mode(engine, k)
        assert engine.spec.gate is None and engine.spec.active(1)
    set_mode(engine, None)
    assert engine.spec is None
