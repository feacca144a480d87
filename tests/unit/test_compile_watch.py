"""The compile watch: Triton's hook calls (as triton.runtime.jit makes them) counted before and
after the start-up mark. That the engine leaves none late on a GPU is not a test yet: it was measured
on an H200 (bench/results/2026-12-02-callP3-serve-inprocess-cold-cache-h200.json, late 0)."""

from types import SimpleNamespace

import pytest

from taxiway_kernels import compile_watch
from taxiway_kernels.compile_watch import CompileWatch

ARGS = ("q_ptr", "n", "BLOCK")


def compile_once(watch: CompileWatch, name: str, block: int = 64, aligned: bool = True) -> None:
    """What one specialisation does: the cache hook, the compile, the post-compile hook, with the
    hook arguments Triton 3.6 gives (constants and attributes keyed by argument index paths)."""
    fn = SimpleNamespace(name=name, module="taxiway_kernels.x", jit_function=SimpleNamespace(arg_names=ARGS))
    attrs = {(0,): [["tt.divisibility", 16]]} if aligned else {}
    kwargs = {"key": ("k",), "repr": f"{name}[num_warps=4](q_ptr: ())", "fn": fn,
              "compile": {"constants": {(2,): block}, "configs": [attrs]},
              "is_manual_warmup": False, "already_compiled": False}
    assert watch.before(**kwargs) is None  # a true value would make Triton skip the compile
    watch.after(**kwargs)


def test_counts_split_at_the_mark():
    w = CompileWatch()
    compile_once(w, "_decode")
    compile_once(w, "_rms_norm")
    w.mark()
    assert w.num_late() == 0 and not w.has_new()
    compile_once(w, "_decode", block=128)
    compile_once(w, "_decode", aligned=False)
    compile_once(w, "_sample")
    s = w.summary()
    assert (s["at_start"], s["late"]) == (2, 3)
    assert s["late_by_kernel"]["_decode"]["count"] == 2 and s["late_by_kernel"]["_sample"]["count"] == 1
    assert [e["kernel"] for e in s["late_first"]] == ["_decode", "_decode", "_sample"]
    assert all(e["seconds"] is not None and e["seconds"] >= 0 for e in s["late_first"])
    assert w.has_new()
    assert [e["signature"] for e in w.new_since_mark()] == [
        "_decode[num_warps=4](BLOCK=128, q_ptr:16)", "_decode[num_warps=4](BLOCK=64)",
        "_sample[num_warps=4](BLOCK=64, q_ptr:16)"]
    assert not w.has_new() and w.new_since_mark() == []
    compile_once(w, "_rope")
    assert [e["kernel"] for e in w.new_since_mark()] == ["_rope"]
    assert w.num_late() == 4


def test_install_keeps_hooks_already_set(monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    if not hasattr(knobs, "runtime") or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("Triton older than its knobs")
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append("cache"))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append("post"))
    fresh = CompileWatch()
    monkeypatch.setattr(compile_watch, "WATCH", fresh)
    assert compile_watch.install() is fresh and fresh.enabled
    assert compile_watch.install() is fresh  # once
    fn = SimpleNamespace(name="_k")
    assert knobs.runtime.jit_cache_hook(key=(), repr="_k[]()", fn=fn) is None
    knobs.runtime.jit_post_compile_hook(key=(), repr="_k[]()", fn=fn)  # no compile dict: no detail
    assert seen == ["cache", "post"] and [(e["kernel"], e["signature"]) for e in fresh.events] == [("_k", "_k[]()")]
