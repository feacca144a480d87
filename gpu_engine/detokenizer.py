"""Incremental detokenization with stop strings, for one request's output tokens.

Each `add_tokens` call decodes only a small window of recent tokens (the prefix/read offset method):
text is released once the window decodes to more text than its already-released prefix and does
not end in U+FFFD, so a character whose UTF-8 bytes span several tokens comes out whole. A few
prompt tokens serve as context, so a SentencePiece "▁word" that continues the prompt keeps its
leading space.

Stop strings are matched on the decoded text, across token boundaries. With `stream_hold_back`,
text that may still turn into a stop string is held until that is decided, so a streaming client
never sees part of a stop string that is later cut away.

    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt, stop=["\\n\\n"], stream_hold_back=True)
    for ids in steps:
        delta = detok.add_tokens(ids)      # delta.new_text to stream, delta.stop when a stop string hit
        if delta.stop: break
    tail = detok.flush()                   # at finish: text held back so far
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpu_engine.errors import InvalidRequest

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decoding context (vLLM uses 5 as well).
_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 byte tokens: text still ending in U+FFFD after this many
# tokens is a real U+FFFD (or garbage) and is released, so the window stays short.
_MAX_UNFINISHED = 6
# Token ids before the decoding window are dropped once this many pile up.
_TRIM_AFTER = 256


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer (`gpu_engine.tokenizer.Tokenizer` has it)."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    """Text released by one `add_tokens` call, and the stop string that ended the output, if any."""

    new_text: str
    stop: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, step by step.

    Without a stop string hit, the concatenation of all deltas and `flush()` equals the text the
    output continues the prompt with: `tokenizer.decode(output_ids)` for byte-level BPE, and
    `decode(prompt + output)` minus `decode(prompt)` where a leading space depends on the prompt.
    After a hit, `text` ends right before the stop string (right after it with
    `include_stop_str_in_output`) and further `add_tokens` calls raise `RuntimeError`.
    Without `stream_hold_back`, deltas released before the hit may hold the stop string's
    beginning, which `text` then no longer contains.
    """

    def __init__(self, tokenizer: Decoder, *, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, stream_hold_back: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = _validate_stops(stop)
        self._include_stop = include_stop_str_in_output
        # Holding back is pointless when the stop string is released anyway.
        self._hold_back = stream_hold_back and not include_stop_str_in_output and bool(self._stops)
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        # Decoding window: text of ids[prefix:read] is out; ids[read:] are not yet.
        self._ids = self._context(prompt_token_ids)
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        # Text: released parts, the released tail a stop string may still start in, and held text.
        self._parts: list[str] = []
        self._tail = ""
        self._pending = ""
        self._stop: str | None = None
        self._done = False

    @property
    def text(self) -> str:
        """The output text released so far (cut at the stop string once one matched)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stop(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop

    def add_tokens(self, token_ids: Iterable[int]) -> DetokenizerDelta:
        """Feed newly generated ids; returns the text that became final and any stop string hit."""
        if self._done:
            state = f"stop string {self._stop!r} matched" if self._stop is not None else "flush() was called"
            raise RuntimeError(f"add_tokens after the output ended ({state})")
        decoded = "".join(self._step(int(t)) for t in token_ids)
        return DetokenizerDelta(self._take(decoded, final=False), self._stop)

    def decode_whole(self, token_ids: Iterable[int]) -> str:
        """The text of a whole output given at once, with one decode rather than one per token
        (a finished output nobody streamed); equals add_tokens(token_ids) + flush() without stop
        strings, which need the token-by-token form."""
        if self._stops:
            raise RuntimeError("stop strings are matched token by token: use add_tokens")
        if self._done or len(self._ids) != self._read:
            raise RuntimeError("decode_whole needs a fresh detokenizer")
        self._ids.extend(int(t) for t in token_ids)
        return self.flush()

    def flush(self) -> str:
        """At finish: release held-back text and the text of tokens that never formed a whole character."""
        if self._done:
            return ""
        rest = self._decode(self._ids[self._prefix:])
        rest = rest[len(self._prefix_text):]
        released = self._take(rest, final=True)
        self._done = True
        return released

    # ---- token ids -> text ------------------------------------------------------------------

    def _context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, starting on a whole character (byte-fallback decoders turn a
        run of byte tokens that starts mid-character into U+FFFD as a whole)."""
        context = [int(t) for t in prompt_token_ids[max(0, len(prompt_token_ids) - _CONTEXT_TOKENS):]]
        while context and self._decode(context).startswith(_REPLACEMENT):
            del context[0]
        return context

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def _step(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix:])
        if len(window) <= len(self._prefix_text):
            return ""  # nothing new (a skipped special token)
        if window.endswith(_REPLACEMENT) and len(self._ids) - self._read < _MAX_UNFINISHED:
            return ""  # a character still incomplete, or a real U+FFFD that the next token will confirm
        # Text beyond what is out. The window normally starts with `_prefix_text`; when it does not
        # (a byte-fallback run turned ill-formed, or the prompt ended inside a character), released
        # text stays released and only the part past its length is new.
        new_text = window[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:])
        if self._prefix > _TRIM_AFTER:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text

    # ---- text -> released text, stop strings ------------------------------------------------

    def _take(self, new_text: str, *, final: bool) -> str:
        """Add decoded text; return what is released now."""
        if not self._stops:
            self._release(new_text)
            return new_text
        held = self._pending + new_text
        region = self._tail + held
        hit = _first_stop(region, self._stops)
        if hit is not None:
            return self._finish_at(region, *hit)
        keep = 0 if final or not self._hold_back else _stop_prefix_len(region, self._stops, len(held))
        self._pending = held[len(held) - keep:] if keep else ""
        released = held[:len(held) - keep]
        self._release(released)
        return released

    def _finish_at(self, region: str, start: int, stop: str) -> str:
        """Cut the output at a stop string found at `region[start:]`; return the last delta."""
        end = start + len(stop) if self._include_stop else start
        tail_len = len(self._tail)
        self._stop, self._pending, self._done = stop, "", True
        if end >= tail_len:
            released = region[tail_len:end]
            self._release(released)
            return released
        # Part of the stop string was released already (no hold-back): cut the kept text.
        text = self.text
        self._parts = [text[:len(text) - (tail_len - end)]]
        return ""

    def _release(self, released: str) -> None:
        if not released:
            return
        self._parts.append(released)
        if self._keep:
            self._tail = (self._tail + released)[-self._keep:]


def _validate_stops(stop: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = [stop]
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequest(f"stop strings must be non-empty strings, got {s!r}")
    return tuple(dict.fromkeys(stop))


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop string in `text` (the longest on a tie) as (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1]))):
            best = (index, stop)
    return best


def _stop_prefix_len(text: str, stops: tuple[str, ...], limit: int) -> int:
    """Length of the longest end of `text` (at most `limit`) that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, limit, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
