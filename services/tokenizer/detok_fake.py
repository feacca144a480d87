"""An incremental detokenizer for the ByteTokenizer, with the interface of
gpu_engine.detokenizer.IncrementalDetokenizer (used with --fake-engine only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class DetokenizerDelta:
    new_text: str
    stop: str | None = None


class ByteDetokenizer:
    def __init__(self, tokenizer, *, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, stream_hold_back: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self._stop), default=1) - 1 if stream_hold_back else 0
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self._full = ""
        self.stopped: str | None = None

    def add_tokens(self, ids: Sequence[int]) -> DetokenizerDelta:
        if self.stopped:
            return DetokenizerDelta("", None)
        self._ids.extend(ids)
        full = self._full = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            full = full.rstrip("\ufffd")
        for s in self._stop:
            at = full.find(s, max(0, self._emitted - len(s)))
            if at >= 0:
                self.stopped = s
                self.text = full[: at + len(s) if self._include_stop else at]
                return self._release(len(self.text), s)
        self.text = full
        return self._release(max(self._emitted, len(full) - self._hold))

    def flush(self) -> DetokenizerDelta:
        if not self.stopped:
            self.text = self._full  # a trailing incomplete character stays as U+FFFD
        return self._release(len(self.text), self.stopped)

    def _release(self, upto: int, stop: str | None = None) -> DetokenizerDelta:
        new = self.text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return DetokenizerDelta(new, stop)
