"""Which Triton kernels get specialised, and when: the engine marks the end of its start-up (weights,
warm-up forward, CUDA graphs), and every specialisation after that mark is one a request waited for.

Triton compiles a kernel once per specialisation (constexpr values, dtypes, and each integer
argument's "equals 1" / "divisible by 16" class), on the first launch that needs it. A cold compile
takes from a fraction of a second to a few seconds, so one that happens while serving stalls every
running sequence for that long; with Triton's disk cache warm it still costs a few milliseconds.

    watch = compile_watch.install()   # once; a no-op (enabled False) where Triton has no hooks
    ...start-up...
    watch.mark()
    ...serving...
    watch.new_since_mark()  ->  [{"kernel", "signature", "seconds"}, ...]  (each once)
    watch.summary()         ->  counts and seconds before and after the mark

The hooks are Triton's process-wide `knobs.runtime.jit_cache_hook` (before a specialisation is
compiled or loaded from the disk cache) and `jit_post_compile_hook` (after); hooks already set by
someone else are kept and called first. Under TRITON_INTERPRET=1 nothing is compiled, so nothing is
seen."""

from __future__ import annotations

import threading
import time

LISTED = 64  # late specialisations listed whole in summary()


class CompileWatch:
    def __init__(self):
        self.events: list[dict] = []
        self.enabled = False
        self._mark = 0
        self._reported = 0
        self._lock = threading.Lock()
        self._started = threading.local()

    # Triton's hook signature: keyword arguments key, repr, fn, compile, is_manual_warmup,
    # already_compiled; a true result from the cache hook would skip the compile, so both give None.
    def before(self, **kwargs) -> None:
        self._started.t = time.perf_counter()

    def after(self, *, repr: str = "", fn=None, compile=None, **kwargs) -> None:
        t0 = getattr(self._started, "t", None)
        name = getattr(fn, "name", None) or repr.split("[", 1)[0]
        event = {"kernel": name, "signature": repr.split("(", 1)[0] + "(" + _specialisation(fn, compile) + ")",
                 "seconds": round(time.perf_counter() - t0, 4) if t0 is not None else None}
        with self._lock:
            self.events.append(event)

    def mark(self) -> None:
        """Start-up is over: specialisations from here on are counted as late."""
        with self._lock:
            self._mark = self._reported = len(self.events)

    def has_new(self) -> bool:
        """Whether a late specialisation came since new_since_mark() last looked (no lock: a step's check)."""
        return len(self.events) > self._reported

    def num_late(self) -> int:
        return len(self.events) - self._mark

    def new_since_mark(self) -> list[dict]:
        """The late specialisations not returned by an earlier call (for a warning per compile)."""
        with self._lock:
            fresh = self.events[self._reported:]
            self._reported = len(self.events)
            return list(fresh)

    def summary(self) -> dict:
        """Counts and seconds at start-up and after it, the late ones by kernel, the first LISTED whole."""
        with self._lock:
            early, late = self.events[:self._mark], self.events[self._mark:]
        by_kernel: dict[str, dict] = {}
        for e in late:
            row = by_kernel.setdefault(e["kernel"], {"count": 0, "seconds": 0.0})
            row["count"] += 1
            row["seconds"] = round(row["seconds"] + (e["seconds"] or 0.0), 4)
        return {"enabled": self.enabled, "at_start": len(early),
                "at_start_s": round(sum(e["seconds"] or 0.0 for e in early), 3),
                "late": len(late), "late_s": round(sum(e["seconds"] or 0.0 for e in late), 3),
                "late_by_kernel": by_kernel, "late_first": late[:LISTED]}


def _specialisation(fn, compile) -> str:
    """What this specialisation fixed, by argument name: constexpr and constant values
    (`BLOCK=64`, `n=1`) and alignment attributes (`stride:16`, Triton's tt.divisibility);
    empty where Triton's hook arguments are not what this reads (it never fails a compile)."""
    try:
        names = list(fn.jit_function.arg_names)
        parts = []
        for where, value in compile["constants"].items():
            parts.append(f"{names[where[0]]}={getattr(value, 'value', value)}")
        for where, attrs in compile["configs"][0].items():
            parts.append(f"{names[where[0]]}:" + "/".join(str(v) for _, v in attrs))
        return ", ".join(parts)
    except Exception:  # noqa: BLE001  (a report, never a reason to fail the launch)
        return ""


WATCH = CompileWatch()


def _chain(first, second):
    if first is None:
        return second

    def both(**kwargs):
        result = first(**kwargs)
        second(**kwargs)
        return result

    return both


def install() -> CompileWatch:
    """Hook the process-wide watch into Triton (once); it stays disabled without Triton's knobs."""
    if WATCH.enabled:
        return WATCH
    try:
        from triton import knobs

        runtime = knobs.runtime
        runtime.jit_cache_hook = _chain(runtime.jit_cache_hook, WATCH.before)
        runtime.jit_post_compile_hook = _chain(runtime.jit_post_compile_hook, WATCH.after)
    except (ImportError, AttributeError):  # no Triton, or one older than its knobs (3.4)
        return WATCH
    WATCH.enabled = True
    return WATCH
