"""A small OpenAI-SSE client for tests: stream a chat completion, resume it, read its events."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import orjson

from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt

CHAT = "/v1/chat/completions"


def expected(content: str, n: int) -> str:
    """The mock model's reply of `n` tokens to one user message."""
    return mock_reply(render_prompt([ChatMessage(role="user", content=content)]), n)


def body(content: str, max_tokens: int) -> dict:
    return {"model": "mock", "messages": [{"role": "user", "content": content}],
            "stream": True, "max_tokens": max_tokens}


@dataclass
class Stream:
    """What one SSE response carried."""

    status: int = 0
    text: str = ""
    ids: list[str] = field(default_factory=list)
    finish: str | None = None
    errors: list[dict] = field(default_factory=list)
    done: bool = False  # `data: [DONE]` arrived
    json: dict | None = None  # the body of a non-200 answer
    lines: Iterator[str] | None = None  # the open response's lines (set by open_stream)

    @property
    def last_id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    @property
    def error_code(self) -> str | None:
        if self.errors:
            return self.errors[-1].get("code")
        if self.json:
            return self.json.get("error", {}).get("code")
        return None

    def feed(self, stop_after_chunks: int | None = None) -> None:
        """Read the open response until [DONE] (or `stop_after_chunks` content chunks)."""
        chunks = 0
        for line in self.lines or ():
            if line.startswith("id: "):
                self.ids.append(line[4:])
            elif line == "data: [DONE]":
                self.done = True
                return
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
                if "error" in data:
                    self.errors.append(data["error"])
                    continue
                for choice in data.get("choices", []):
                    content = choice["delta"].get("content")
                    if content:
                        self.text += content
                        chunks += 1
                    self.finish = choice.get("finish_reason") or self.finish
                if stop_after_chunks is not None and chunks >= stop_after_chunks:
                    return


@contextmanager
def open_stream(
    base_url: str, payload: dict, *, last_event_id: str | None = None,
    api_key: str | None = None, timeout: float = 30,
) -> Iterator[tuple[httpx.Response, Stream]]:
    """An open streaming response and its (empty) record; read it with `Stream.feed`."""
    headers = {}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    record = Stream()
    with httpx.stream("POST", base_url + CHAT, json=payload, headers=headers,
                      timeout=timeout) as resp:
        record.status = resp.status_code
        if resp.status_code != 200:
            resp.read()
            record.json = resp.json()
        else:
            record.lines = resp.iter_lines()
        yield resp, record


def stream(base_url: str, payload: dict, **kw) -> Stream:  # noqa: ANN003
    """One whole streaming request."""
    with open_stream(base_url, payload, **kw) as (_resp, record):
        record.feed()
    return record
