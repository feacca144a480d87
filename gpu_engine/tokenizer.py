"""`Tokenizer`: a thin wrapper over `tokenizers.Tokenizer` loaded from a Hugging Face folder.

It reads what `transformers` would read (tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json, config.json) and gives the same token ids, decoded text and chat-template
rendering, without importing `transformers`:

    tok = Tokenizer.from_folder(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    text = tok.decode(ids)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from gpu_engine.errors import InvalidRequest, ModelLoadError

Message = dict[str, Any]

# transformers' `clean_up_tokenization` replacements, applied in order when a model asks for them.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Encode, decode and chat templates for one model, as HF `AutoTokenizer` does them."""

    def __init__(self, backend: Any, config: dict[str, Any], *, chat_template: str | None = None,
                 generation_eos: Sequence[int] = ()) -> None:
        """`backend` is a `tokenizers.Tokenizer`; `config` the parsed tokenizer_config.json."""
        self._tok = backend
        self._chat_template = chat_template
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self._special_text = {name: _token_text(config.get(name)) for name in
                              ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos = list(generation_eos)
        eos_text_id = self._id_of("eos_token")
        if eos_text_id is not None:
            eos.append(eos_text_id)
        self._eos_ids = tuple(dict.fromkeys(eos))
        self._compiled: Any = None

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load from an HF model folder; raises `ModelLoadError` if it has no usable tokenizer."""
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json (only `tokenizers`-format tokenizers are supported)")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ModelLoadError(f"cannot parse {tokenizer_file}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        return cls(backend, config, chat_template=_find_chat_template(folder, config),
                   generation_eos=_generation_eos_ids(folder))

    # ---- vocabulary facts -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: generation_config's eos_token_id(s), then tokenizer_config's eos_token."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special added token and of the named bos/eos/unk/pad tokens."""
        ids = {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        ids.update(i for i in (self._id_of(n) for n in self._special_text) if i is not None)
        return sorted(ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _id_of(self, name: str) -> int | None:
        text = self._special_text.get(name)
        return None if text is None else self._tok.token_to_id(text)

    # ---- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as HF `tokenizer(text).input_ids`."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text to encode must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of `ids`, as HF `tokenizer.decode`. Clean-up follows tokenizer_config unless given."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = self._clean_up if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    # ---- chat template ----------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
        """Render `messages` with the model's chat template (ids with `tokenize=True`).

        The template sees `messages`, `add_generation_prompt`, the `bos_token`, `eos_token`, `unk_token`
        and `pad_token` the model defines, `tools` and `documents` (None unless given) and any
        `template_kwargs`.
        """
        import jinja2

        validate_messages(messages)
        named = {name: text for name, text in self._special_text.items() if text is not None}
        variables = {"tools": None, "documents": None, **named, **template_kwargs}
        try:
            rendered = self._template().render(messages=list(messages),
                                               add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"chat template failed on these messages: {exc}") from exc
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _template(self) -> Any:
        if self._chat_template is None:
            raise InvalidRequest("this model has no chat template (tokenizer_config.json chat_template or "
                                 "chat_template.jinja); send a plain prompt instead of messages")
        if self._compiled is None:
            self._compiled = compile_chat_template(self._chat_template)
        return self._compiled


def validate_messages(messages: Any) -> None:
    """Raise `InvalidRequest` unless `messages` is a non-empty list of {role: str, content: str} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequest(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequest("messages must not be empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise InvalidRequest(f"messages[{i}] must be a dict with 'role' and 'content', got {kind}")
        for key in ("role", "content"):
            if key not in message:
                raise InvalidRequest(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise InvalidRequest(f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__}")
        if not message["role"]:
            raise InvalidRequest(f"messages[{i}]['role'] must not be empty")


def compile_chat_template(source: str) -> Any:
    """A jinja2 template in a sandbox set up as transformers does (trim_blocks, lstrip_blocks, helpers)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it; we need not)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template rejected the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ModelLoadError(f"the chat template does not compile: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers 5) wins over tokenizer_config.json's chat_template."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ModelLoadError(f"tokenizer_config.json has named chat templates {sorted(map(str, named))} "
                             "but none called 'default'")
    kind = type(template).__name__
    raise ModelLoadError(f"tokenizer_config.json chat_template must be a string or a list, got {kind}")


def _generation_eos_ids(folder: Path) -> list[int]:
    """eos_token_id (int or list) from generation_config.json, else from config.json."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ModelLoadError(f"{folder / name} eos_token_id must be an int or a list of ints, got {value!r}")
        return list(values)
    return []
