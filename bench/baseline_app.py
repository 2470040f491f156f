"""The relay benchmark's baseline: a plain FastAPI app that streams from an in-process generator.

`POST /v1/chat/completions` answers like the gateway does (same SSE chunks: a role chunk, one
chunk per token with the mock engine's text, a finish chunk, the usage chunk, `[DONE]`), but
the tokens come straight from a generator in the same process: no Redis, no worker, no
admission. Same chunk encoder (ChunkEncoder, gateway/completions/encode.py), served by uvicorn
with the gateway's own options (`gateway.main.UVICORN_OPTIONS`).

Run: `python -m bench.baseline_app --port 8100`.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from chatstream_cluster.gateway.completions.encode import ChunkEncoder
from chatstream_cluster.gateway.main import UVICORN_OPTIONS
from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_tokens, render_prompt

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = FastAPI(title="in-process streaming baseline")


async def _chunks(tokens: list[str], model: str, prompt_tokens: int) -> AsyncIterator[bytes]:
    enc = ChunkEncoder(uuid.uuid4().hex, model, int(time.time()))  # the gateway's encoder
    yield enc.chunk({"role": "assistant", "content": ""}, None, 0)
    seq = 0
    for seq, token in enumerate(tokens, 1):
        yield enc.content(token, seq)
    yield enc.chunk({}, "length", seq)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    yield enc.data({**enc.head, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> StreamingResponse:
    """Stream `max_tokens` mock tokens for the request's messages, one token per event."""
    body = orjson.loads(await request.body())
    messages = [ChatMessage.model_validate(m) for m in body["messages"]]
    prompt = render_prompt(messages)
    tokens = mock_tokens(prompt, int(body.get("max_tokens") or 256))
    return StreamingResponse(
        _chunks(tokens, body.get("model", "mock"), len(prompt.split())),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
