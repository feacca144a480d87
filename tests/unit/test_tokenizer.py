"""gpu_engine.tokenizer.Tokenizer against HF AutoTokenizer on the default model, and its error paths."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from gpu_engine.errors import InvalidRequest, ModelLoadError
from gpu_engine.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "2024-11-27: 1234567 × 3.14159 = ?",
    "x1y22z333 1st 2nd ½ x² ٣ ४",
    "def f(x):\n    return x ** 2  # square\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文测试，日本語のテキスト、한국어",
    "don't I'll we've they're",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b<repo_name>x<file_sep>y",
    "<|im_start|> <|im_start|><|im_start|>",
    "Ünïcödé àccents ß and Ελληνικά and русский",
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(default_model_dir)


@pytest.fixture(scope="module")
def hf(default_model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_model_dir))


def test_vocabulary_facts(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == (2,)
    assert tok.bos_token_id == 1
    assert tok.pad_token_id == 2
    assert tok.all_special_ids == list(range(17))
    assert tok.token_to_id("<|im_start|>") == 1


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    # Every number character is its own pre-token (llama.cpp "smollm" = HF Digits(individual_digits)).
    assert tok.backend.encode(" x²").tokens == ["Ġx", "Â²"]
    assert tok.backend.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(tok: Tokenizer, hf, add_special_tokens: bool) -> None:
    for text in TEXTS:
        expected = hf(text, add_special_tokens=add_special_tokens).input_ids
        assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf(tok: Tokenizer, hf, skip: bool) -> None:
    rng = random.Random(7)
    cases = [tok.encode(t) for t in TEXTS]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))] for _ in range(200)]
    cases += [[rng.randrange(40) for _ in range(8)] for _ in range(50)]  # dense in special tokens
    for ids in cases:
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok: Tokenizer, hf, messages, add_generation_prompt: bool) -> None:
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)


def test_chat_template_exact_text(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, fragment", [
    ("hello", "must be a list"),
    ([], "must not be empty"),
    (["hi"], "messages[0] must be a dict"),
    ([{"content": "x"}], "messages[0] has no 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], "messages[1] has no 'content'"),
    ([{"role": "user", "content": 3}], "messages[0]['content'] must be a str"),
    ([{"role": "", "content": "x"}], "messages[0]['role'] must not be empty"),
])
def test_bad_messages(tok: Tokenizer, messages, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        tok.apply_chat_template(messages)


# ---- small synthetic folders for the loading rules ------------------------------------------------

def _write_folder(path: Path, *, tokenizer_config: dict | None = None, files: dict[str, object] | None = None) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "hello": 4, "world": 5, "!": 6, ".": 7, "don't": 8}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<s>", "</s>", "<eot>"])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in (files or {}).items():
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        Tokenizer.from_folder(tmp_path / "bad")
    folder = _write_folder(tmp_path / "badcfg")
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        Tokenizer.from_folder(folder)
    folder = _write_folder(tmp_path / "badeos", files={"generation_config.json": {"eos_token_id": "x"}})
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        Tokenizer.from_folder(folder)


def test_eos_union_and_special_tokens(tmp_path: Path) -> None:
    config = {"eos_token": {"content": "</s>", "special": True}, "bos_token": "<s>", "pad_token": None}
    folder = _write_folder(tmp_path / "a", tokenizer_config=config,
                           files={"generation_config.json": {"eos_token_id": [3, 2]}})
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids == (3, 2)
    assert (tok.bos_token_id, tok.pad_token_id) == (1, None)
    assert tok.all_special_ids == [1, 2, 3]
    assert tok.vocab_size == 9
    folder = _write_folder(tmp_path / "b", tokenizer_config={"eos_token": "<eot>"},
                           files={"config.json": {"eos_token_id": 2}})
    assert Tokenizer.from_folder(folder).eos_token_ids == (2, 3)
    assert Tokenizer.from_folder(_write_folder(tmp_path / "c")).eos_token_ids == ()


def test_template_sources(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hello"}]
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }} !"}]
    tok = Tokenizer.from_folder(_write_folder(tmp_path / "a", tokenizer_config={"chat_template": named}))
    assert tok.apply_chat_template(messages) == "hello !"
    assert tok.apply_chat_template(messages, tokenize=True) == [4, 6]
    folder = _write_folder(tmp_path / "b", tokenizer_config={"chat_template": "old"},
                           files={"chat_template.jinja": "{{ bos_token }}{{ messages[0]['content'] }}"})
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(messages) == "hello"  # bos_token undefined -> empty
    with pytest.raises(ModelLoadError, match="none called 'default'"):
        Tokenizer.from_folder(_write_folder(tmp_path / "c", tokenizer_config={"chat_template": named[:1]}))
    with pytest.raises(InvalidRequest, match="no chat template"):
        Tokenizer.from_folder(_write_folder(tmp_path / "d")).apply_chat_template(messages)


def test_template_environment(tmp_path: Path) -> None:
    source = (
        "{% for m in messages %}\n"
        "  {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
        "  {{ m | tojson }}|{% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{% generation %}{{ eos_token }}{% endgeneration %}{{ strftime_now('%Y')|length }}"
        "{% if add_generation_prompt %}>{% endif %}{{ extra }}"
    )
    config = {"chat_template": source, "eos_token": "</s>"}
    tok = Tokenizer.from_folder(_write_folder(tmp_path / "a", tokenizer_config=config))
    messages = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    # trim_blocks + lstrip_blocks: block-tag lines leave no whitespace behind; tojson keeps non-ASCII.
    expected = '  {"role": "user", "content": "é"}|  {"role": "assistant", "content": "b"}|</s>4>X'
    assert tok.apply_chat_template(messages, extra="X") == expected
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, extra="X") == expected
    with pytest.raises(InvalidRequest, match="bad role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    broken = _write_folder(tmp_path / "b", tokenizer_config={"chat_template": "{% for %}"})
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer.from_folder(broken).apply_chat_template(messages)


def test_template_sandboxed(tmp_path: Path) -> None:
    source = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_folder(_write_folder(tmp_path / "a", tokenizer_config={"chat_template": source}))
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_clean_up_tokenization_spaces(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "a", tokenizer_config={"clean_up_tokenization_spaces": True})
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode("hello world ! don't .")
    assert tok.decode(ids) == "hello world! don't."
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "hello world ! don't ."


def test_copied_default_folder_loads(default_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    assert Tokenizer.from_folder(tmp_path).encode("Hello") == [19556]
