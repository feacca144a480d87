"""The tokenizer tier's core (gpu_engine.detokenizer over the byte tokenizer): chat template, UTF-8 held until complete,
stop strings split across tokens, hold-back released at the end."""

from __future__ import annotations

import pytest

from gpu_engine.errors import InvalidRequest
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import load_core


@pytest.fixture
def core():
    return load_core(TokenizerConfig(fake_engine=True))


def feed(stream, data: bytes, stop_at_end=True):
    out = []
    for i, b in enumerate(data):
        out.append(stream.add([b + 3], flush=stop_at_end and i == len(data) - 1))
        if out[-1][1]:
            break  # a stop string ended the output
    return out


def test_tokenize_text_and_chat(core):
    assert core.tokenize("a")[0] == [1, ord("a") + 3]
    ids, text = core.tokenize(messages=[{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>" and ids[0] != 1
    with pytest.raises(InvalidRequest, match="messages is empty"):
        core.tokenize(messages=[])


def test_multibyte_characters_are_never_split(core):
    text = "é😀中"
    out = feed(core.detokenizer(), text.encode())
    assert [t for t, _ in out] == ["", "é", "", "", "", "😀", "", "", "中"]


def test_stop_string_across_tokens_is_held_back_and_cut(core):
    out = feed(core.detokenizer(stop=["STOP"]), b"abSTOPcd", stop_at_end=False)
    assert "".join(t for t, _ in out) == "ab"
    assert [s for _, s in out if s] == ["STOP"]
    out = feed(core.detokenizer(stop=["STOP"]), b"abST")
    assert "".join(t for t, _ in out) == "abST"  # released by the final flush


def test_a_preset_without_a_tokenizer_streams_ids_without_text():
    import pytest

    from gpu_engine.errors import InvalidRequest
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.core import load_core

    core = load_core(TokenizerConfig(model="llama-3.1-8b"))
    assert (core.info.vocab_size, core.info.eos_token_ids) == (128256, (128001, 128008, 128009))
    stream = core.detokenizer([1, 2, 3])
    assert stream.add([5, 6], flush=True) == ("", None)
    with pytest.raises(InvalidRequest, match="send the prompt as token_ids"):
        core.tokenize("hello")
    with pytest.raises(InvalidRequest, match="stop strings cannot match"):
        core.detokenizer([1], stop=("x",))
