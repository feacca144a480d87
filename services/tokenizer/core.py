"""The tokenizer tier's work, without gRPC: tokenize, chat templates, incremental detokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gpu_engine.errors import InvalidRequest, ModelLoadError
from services.common.types import ModelInfo
from services.tokenizer.config import TokenizerConfig


class TokenizerCore:
    def __init__(self, tokenizer, detokenizer_cls, info: ModelInfo):
        self.tokenizer = tokenizer
        self._detokenizer_cls = detokenizer_cls
        self.info = info

    def tokenize(self, text: str | None = None, messages: Sequence[dict] | None = None,
                 add_special_tokens: bool = True) -> tuple[list[int], str]:
        """(token ids, the text tokenized): plain text, or chat messages through the template."""
        if messages is not None:
            if not messages:
                raise InvalidRequest("messages is empty: give at least one chat turn")
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                      tokenize=False)
            add_special_tokens = False  # the template writes its own special tokens
        if text is None:
            raise InvalidRequest("no prompt: set text, token_ids or messages")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)), text

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's own text (decoded alone, special tokens kept)."""
        vocab = self.info.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is out of range: the vocabulary has {vocab} tokens")
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def detokenizer(self, prompt_token_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                    stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> DetokStream:
        """An incremental detokenizer for one request's output; it holds back text that might be
        the start of a stop string until it is sure."""
        return DetokStream(self._detokenizer_cls(
            self.tokenizer, prompt_token_ids=tuple(prompt_token_ids),
            skip_special_tokens=skip_special_tokens, stop=tuple(stop),
            include_stop_str_in_output=include_stop_str_in_output, stream_hold_back=True))


class DetokStream:
    """One request's detokenization: add() returns (new text, matched stop string or None)."""

    def __init__(self, detok):
        self._detok = detok

    def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        delta = self._detok.add_tokens(list(token_ids))
        text = delta.new_text
        if flush and not delta.stop:
            text += self._detok.flush()
        return text, self._detok.stop

    def close(self) -> None:
        pass


def load_core(config: TokenizerConfig) -> TokenizerCore:
    """The tokenizer of config.model (or the default model), or the fake one."""
    from gpu_engine.detokenizer import IncrementalDetokenizer

    if config.fake_engine:
        from services.tokenizer.fake import ByteTokenizer

        tok = ByteTokenizer()
        return TokenizerCore(tok, IncrementalDetokenizer,
                             ModelInfo(tok.name, tok.max_model_len, tok.vocab_size, tok.eos_token_ids))
    from gpu_engine.tokenizer import Tokenizer

    if config.model and not Path(config.model).is_dir():
        from gpu_engine.config import PRESETS

        if config.model in PRESETS:  # random weights for benchmarks: token ids only
            return _ids_only(config.model, PRESETS[config.model])
    folder = Path(config.model) if config.model else _default_model_path()
    if not (folder / "tokenizer.json").is_file():  # a checkpoint without one: token ids only
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder}: no tokenizer.json, and no config.json: {exc}") from exc
        return _ids_only(folder.name, cfg)
    tok = Tokenizer.from_folder(folder)
    info = ModelInfo(folder.name, _context_length(folder), tok.vocab_size, tuple(tok.eos_token_ids))
    return TokenizerCore(tok, IncrementalDetokenizer, info)


def _default_model_path() -> Path:
    from gpu_engine.default_model import default_model_path

    return Path(default_model_path())


def _context_length(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json: {exc}") from exc
    return int(config.get("max_position_embeddings") or 0)


class _IdsOnly:
    """The 'tokenizer' of a preset (benchmark architectures with random weights, no vocabulary):
    prompts must be token ids, and the output has no text (the ids stream as they are)."""

    def __init__(self, name: str):
        self.name = name

    def encode(self, text, add_special_tokens=True):
        raise InvalidRequest(f"model {self.name!r} is a preset without a tokenizer: send the "
                             "prompt as token_ids")

    def apply_chat_template(self, *args, **kwargs):
        self.encode("")

    def decode(self, ids, skip_special_tokens=True):
        return ""


class _SilentDetok:
    def __init__(self, tokenizer, *, stop=(), **kwargs):
        if stop:
            raise InvalidRequest(f"model {tokenizer.name!r} has no tokenizer: stop strings cannot "
                                 "match (use stop_token_ids)")
        self.stop = None

    def add_tokens(self, token_ids):
        from types import SimpleNamespace

        return SimpleNamespace(new_text="", stop=None)

    def flush(self) -> str:
        return ""


def _ids_only(name: str, preset: dict) -> TokenizerCore:
    eos = preset.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return TokenizerCore(_IdsOnly(name), _SilentDetok,
                         ModelInfo(name, int(preset.get("max_position_embeddings") or 0),
                                   int(preset["vocab_size"]), eos_ids, token_ids_only=True))
