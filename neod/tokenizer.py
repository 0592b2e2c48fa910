"""Tokenizers for the server, and incremental detokenization that never splits a character.

Two kinds: the model folder's `tokenizer.json` (through the `tokenizers` package) and a byte-level
tokenizer for the built-in presets (ids 0-255 are bytes, 256 BOS, 257 EOS). Both hand out a
per-request `Detokenizer` whose `step()` returns only complete characters: bytes of a character cut
across tokens wait for the rest, so streamed text concatenates to exactly the final text.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

from neod.config import ModelConfig

BYTE_BOS = 256
BYTE_EOS = 257
_CONTEXT_TOKENS = 6  # prompt tail that gives the first output token its leading-space context
_REPLACEMENT = "\ufffd"


class Detokenizer(Protocol):
    def step(self, token_ids: list[int]) -> str: ...

    def finish(self) -> str: ...


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def detokenizer(self, prompt_token_ids: list[int]) -> Detokenizer: ...


class ByteDetokenizer:
    """UTF-8 decoding of byte tokens; incomplete sequences wait, invalid ones become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_ids: list[int]) -> str:
        return self._decoder.decode(bytes(t for t in token_ids if t < 256))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    """The presets' tokenizer: UTF-8 bytes, BOS first; ids above 255 decode to nothing."""

    name = "byte-level"
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [BYTE_BOS, *text.encode("utf-8")]  # orjson never yields lone surrogates

    def detokenizer(self, prompt_token_ids: list[int]) -> ByteDetokenizer:
        return ByteDetokenizer()


class HFDetokenizer:
    """Decode a sliding window of ids and emit the new suffix once it no longer ends mid-character.

    Decoding ids one by one loses the spaces and merged bytes that tokenizers attach to neighbours,
    so each step decodes `ids[prefix:]` and emits what it adds to `ids[prefix:read]`, the text
    already emitted. A trailing U+FFFD means an unfinished character: hold it until the next token.
    """

    def __init__(self, tokenizer: object, prompt_token_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def step(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        # Drop ids no window will reach again, so a long output costs O(window) per token.
        if self._prefix > 64:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def finish(self) -> str:
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix:])
        return self._advance(text) if len(text) > len(self._prefix_text) else ""


class HFTokenizer:
    """A model folder's tokenizer.json; `encode` adds the special tokens the model expects (BOS)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"cannot load tokenizer {path}: {exc}") from exc
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not), so neither the event
        # loop nor the engine thread waits on a long prompt.
        return self._tok.encode_batch([text], add_special_tokens=True)[0].ids

    def detokenizer(self, prompt_token_ids: list[int]) -> HFDetokenizer:
        return HFDetokenizer(self._tok, prompt_token_ids)


def load_tokenizer(model: ModelConfig) -> Tokenizer:
    """tokenizer = explicit file, else <path>/tokenizer.json, else byte-level for presets."""
    if model.tokenizer:
        return HFTokenizer(Path(model.tokenizer).expanduser())
    if model.path:
        path = Path(model.path).expanduser() / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in the model folder {model.path}; "
                             "set [model] tokenizer to the tokenizer file")
        return HFTokenizer(path)
    return ByteTokenizer()
