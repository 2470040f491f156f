"""Streaming detokenization that never splits a UTF-8 character, and stop-string hold-back.

Two strategies behind one interface (`make_detokenizer`):

- `ByteLevelDetokenizer` for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, the demo
  model): each token maps to raw bytes, fed to an incremental UTF-8 decoder that holds back
  the bytes of an incomplete character.
- `PrefixDiffDetokenizer` for any other HF tokenizer (SentencePiece, WordPiece...): decode a
  short window and emit the difference, holding back while the text ends in "\\ufffd" (the
  approach of TGI and vLLM).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
# How many already-emitted tokens give the prefix-diff decoder its context (as vLLM does).
PREFIX_WINDOW = 5


class Detokenizer(Protocol):
    """Turns token ids into text incrementally."""

    def add(self, ids: Iterable[int]) -> str:
        """Feed new token ids; return the newly completed text (maybe empty)."""

    def flush(self) -> str:
        """Return whatever is still held back (the sequence has ended)."""


class ByteLevelDetokenizer:
    """Maps tokens to bytes and decodes them with an incremental UTF-8 decoder."""

    def __init__(self, token_bytes: Any):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Iterable[int]) -> str:
        data = b"".join(self._token_bytes(i) for i in ids)
        return self._decoder.decode(data) if data else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class PrefixDiffDetokenizer:
    """Decode-the-window-and-diff detokenizer for tokenizers that are not byte-level."""

    def __init__(self, tokenizer: Any, prefix_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids: list[int] = list(prefix_ids[-PREFIX_WINDOW:]) if prefix_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: Iterable[int]) -> str:
        self._ids.extend(ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class ByteTable:
    """Token id -> bytes for a byte-level tokenizer, built lazily and cached."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._added = {
            i: getattr(t, "content", str(t))
            for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        }
        self._char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        data = self._cache.get(token_id)
        if data is None:
            data = self._cache[token_id] = self._lookup(token_id)
        return data

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tok.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        table = self._char_to_byte
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")


def is_byte_level(tokenizer: Any) -> bool:
    """True when the tokenizer's decoder is the byte-level one (GPT-2 style)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def make_detokenizer(
    tokenizer: Any, prefix_ids: Sequence[int] = (), byte_table: ByteTable | None = None
) -> Detokenizer:
    """The best detokenizer for `tokenizer`; `prefix_ids` (e.g. the prompt) give context only."""
    if byte_table is not None:
        return ByteLevelDetokenizer(byte_table)
    if is_byte_level(tokenizer):
        return ByteLevelDetokenizer(ByteTable(tokenizer))
    return PrefixDiffDetokenizer(tokenizer, prefix_ids)


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split pending `text` into (emit now, hold back, stop hit).

    On a hit the text is cut at the earliest stop string, which is not emitted, and nothing
    is held back. Otherwise the longest suffix that could begin a stop string is held back.
    """
    if not stops:
        return text, "", False
    cut = -1
    for stop in stops:
        if stop:
            i = text.find(stop)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
    if cut != -1:
        return text[:cut], "", True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    if hold:
        return text[:-hold], text[-hold:], False
    return text, "", False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}
