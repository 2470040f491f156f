"""`--model mock`'s echo: a last user message `echo: TEXT` is answered with exactly TEXT."""

from __future__ import annotations

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.engine_api import GenerationRequest
from chatstream_cluster.worker.mock_engine import MockEngine, echo_tokens, mock_reply, render_prompt

TEXT = '<script>alert("x")</script>  two\nlines, ünïcode 🙂 '


def run(engine: MockEngine, request: GenerationRequest) -> tuple[str, str | None, int]:
    engine.submit(request)
    text, finish, tokens = "", None, 0
    while engine.has_work():
        for out in engine.step():
            text += out.text
            finish, tokens = out.finish_reason or finish, out.tokens
    return text, finish, tokens


def test_echo_replies_verbatim_then_stops_and_resumes_exactly() -> None:
    messages = [ChatMessage(role="user", content="echo: " + TEXT)]
    tokens = echo_tokens(messages)
    assert tokens is not None and "".join(tokens) == TEXT and len(tokens) == 5
    engine = MockEngine(max_batch=2)
    text, finish, count = run(engine, GenerationRequest("a", messages, SamplingParams()))
    assert (text, finish, count) == (TEXT, "stop", len(tokens))
    # max_tokens still cuts it, as "length".
    text, finish, _ = run(engine, GenerationRequest("b", messages, SamplingParams(max_tokens=2)))
    assert (text, finish) == ("".join(tokens[:2]), "length")
    # Another worker continuing from token 2 produces exactly the rest.
    rest, finish, _ = run(engine, GenerationRequest(
        "c", messages, SamplingParams(), resume_text="".join(tokens[:2]), resume_tokens=2))
    assert (rest, finish) == ("".join(tokens[2:]), "stop")


def test_only_a_last_user_message_with_the_prefix_echoes() -> None:
    for messages in (
        [ChatMessage(role="user", content="say echo: hi")],
        [ChatMessage(role="user", content="echo: hi"), ChatMessage(role="assistant", content="x")],
    ):
        assert echo_tokens(messages) is None
        text, _, _ = run(MockEngine(), GenerationRequest("a", messages,
                                                         SamplingParams(max_tokens=6)))
        assert text == mock_reply(render_prompt(messages), 6)
