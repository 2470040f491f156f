"""Streaming detokenization never splits a UTF-8 character; stop strings are held back."""

from __future__ import annotations

import pytest

from chatstream_cluster.worker.demo_model import build_demo_tokenizer
from chatstream_cluster.worker.engine.detokenizer import (
    PrefixDiffDetokenizer,
    StreamDetokenizer,
    make_detokenizer,
    split_stop,
)

TEXT = "héllo 日本語 🎉 done"


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def _stream(detok, ids: list[int]) -> list[str]:
    chunks = [detok.add([i]) for i in ids]
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("kind", ["auto", "prefix-diff"])
def test_one_byte_token_at_a_time_never_splits_a_character(tokenizer, kind: str) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode())  # byte tokens: multi-byte characters are cut
    if kind == "auto":
        detok = make_detokenizer(tokenizer)
        assert isinstance(detok, StreamDetokenizer)  # tokenizers' DecodeStream
    else:
        detok = PrefixDiffDetokenizer(tokenizer)
    chunks = _stream(detok, ids)
    assert "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)
    # "é" is two tokens: the first yields nothing, the second the whole character.
    assert chunks[1:3] == ["", "é"]
    emoji = chunks.index("🎉")  # four byte tokens, one character
    assert chunks[emoji - 3 : emoji] == ["", "", ""]


def test_special_tokens_are_skipped(tokenizer) -> None:
    detok = make_detokenizer(tokenizer)
    ids = [tokenizer.bos_token_id, *tokenizer.encode("ok", add_special_tokens=False)]
    assert "".join(_stream(detok, [*ids, tokenizer.eos_token_id])) == "ok"


def test_several_ids_at_once_and_truncated_character_on_flush(tokenizer) -> None:
    detok = make_detokenizer(tokenizer)
    ids = tokenizer.encode("日本", add_special_tokens=False)
    assert detok.add(ids[:4]) == "日"
    assert detok.add(ids[4:5]) == ""
    assert detok.flush() == "\ufffd"  # the sequence ended inside a character


@pytest.mark.parametrize("kind", [StreamDetokenizer, PrefixDiffDetokenizer])
def test_prefix_ids_give_context_but_are_not_emitted(tokenizer, kind) -> None:  # noqa: ANN001
    prompt = tokenizer.encode("prompt: ", add_special_tokens=False)
    detok = kind(tokenizer, prompt)
    ids = tokenizer.encode("ça", add_special_tokens=False)
    assert "".join(_stream(detok, ids)) == "ça"


def test_stream_detokenizer_keeps_sentencepiece_spaces() -> None:
    """A Metaspace (SentencePiece-style) tokenizer: the word-initial space survives."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "▁": 3, "h": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    detok = make_detokenizer(fast, [1])  # the prompt ends in "hello"
    assert isinstance(detok, StreamDetokenizer)
    assert "".join(_stream(detok, [2, 2])) == " world world"


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", [], ("hello world", "", False)),
        ("hello world", ["xyz"], ("hello world", "", False)),
        ("hello wo", ["world"], ("hello ", "wo", False)),
        ("hello w", ["wx", "world"], ("hello ", "w", False)),
        ("hello world!", ["world"], ("hello ", "", True)),
        ("a STOP b END", ["END", "STOP"], ("a ", "", True)),
        ("abcab", ["abd"], ("abc", "ab", False)),
        ("STOP", ["STOP"], ("", "", True)),
    ],
)
def test_split_stop(text: str, stops: list[str], expected: tuple[str, str, bool]) -> None:
    assert split_stop(text, stops) == expected


def test_stop_string_across_chunks() -> None:
    emitted, pending = "", ""
    for chunk in ["Hel", "lo <", "|en", "d|> tail"]:
        emit, pending, hit = split_stop(pending + chunk, ["<|end|>"])
        emitted += emit
        if hit:
            break
    assert hit and emitted == "Hello "
