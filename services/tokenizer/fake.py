"""A byte-level tokenizer with the interface of gpu_engine.tokenizer.Tokenizer, for tests and
`taxiway serve --fake-engine`: every UTF-8 byte is one token, so multi-byte characters always
arrive split across tokens. Ids: 0 <pad>, 1 <s> (BOS), 2 </s> (EOS), 3 + byte."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_engine.errors import InvalidRequest

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
SPECIAL = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}


class ByteTokenizer:
    name = "fake-bytes"
    vocab_size = 256 + OFFSET
    eos_token_ids = (EOS,)
    bos_token_id = BOS
    max_model_len = 4096

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        out, raw = [], bytearray()
        for t in ids:
            if t >= OFFSET:
                raw.append(t - OFFSET)
                continue
            out.append(raw.decode("utf-8", errors="replace"))
            raw.clear()
            if not skip_special_tokens:
                out.append(SPECIAL[t])
        out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise InvalidRequest(f"unknown chat role {m.get('role')!r}; use system, user, "
                                     "assistant or tool")
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=False) if tokenize else text
