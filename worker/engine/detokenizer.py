"""Streaming detokenization that never splits a UTF-8 character, and stop-string hold-back.

`make_detokenizer` gives, behind one interface:

- `StreamDetokenizer` for every fast (Rust-backed) tokenizer: `tokenizers.decoders.DecodeStream`,
  fed one id at a time, with the prompt as context. It passes the UTF-8 tests of
  tests/worker/test_detokenizer.py (byte tokens of one character are held until the last one,
  special tokens are skipped). It has no flush, so at the end of a sequence the ids it still
  holds (a character cut by the end) are decoded here, against the same context, as the
  replacement character.
- `PrefixDiffDetokenizer` for a slow (pure Python) tokenizer, which DecodeStream cannot drive:
  decode a short window and emit the difference, holding back while the text ends in
  "\ufffd" (the approach of TGI and vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
# How many already-emitted tokens give the prefix-diff decoder its context (as vLLM does).
PREFIX_WINDOW = 5


class Detokenizer(Protocol):
    """Turns token ids into text incrementally."""

    def add(self, ids: Iterable[int]) -> str:
        """Feed new token ids; return the newly completed text (maybe empty)."""

    def add_one(self, token: int) -> str:
        """`add((token,))`, without the iterable (the engine feeds one token per step)."""

    def flush(self) -> str:
        """Return whatever is still held back (the sequence has ended)."""


class StreamDetokenizer:
    """`tokenizers.decoders.DecodeStream` behind the Detokenizer interface."""

    def __init__(self, tokenizer: Any, prefix_ids: Sequence[int] = ()):
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._backend = tokenizer.backend_tokenizer
        context = list(prefix_ids[-PREFIX_WINDOW:])
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=True)
        self._emitted = list(context)  # ids whose text is out: the context of what is held
        self._held: list[int] = []

    def add(self, ids: Iterable[int]) -> str:
        return "".join([self.add_one(token) for token in ids])

    def add_one(self, token: int) -> str:
        chunk = self._stream.step(self._backend, token)
        if chunk is None:
            self._held.append(token)
            return ""
        if self._held:
            self._emitted = (self._emitted + self._held + [token])[-PREFIX_WINDOW:]
            self._held = []
        else:
            emitted = self._emitted
            emitted.append(token)
            if len(emitted) > PREFIX_WINDOW:
                del emitted[0]
        return chunk

    def flush(self) -> str:
        if not self._held:
            return ""
        before = self._tok.decode(self._emitted, skip_special_tokens=True)
        after = self._tok.decode(self._emitted + self._held, skip_special_tokens=True)
        self._emitted, self._held = (self._emitted + self._held)[-PREFIX_WINDOW:], []
        return after[len(before) :]


class PrefixDiffDetokenizer:
    """Decode-the-window-and-diff detokenizer for tokenizers without a Rust backend."""

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

    def add_one(self, token: int) -> str:
        return self.add((token,))

    def flush(self) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


def make_detokenizer(tokenizer: Any, prefix_ids: Sequence[int] = ()) -> Detokenizer:
    """The best detokenizer for `tokenizer`; `prefix_ids` (e.g. the prompt) give context only."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return StreamDetokenizer(tokenizer, prefix_ids)
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
