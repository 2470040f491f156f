"""A streaming response that owns a Generation: it watches for the client's disconnect and
always closes the generation with the status of what really happened.

A wire that can carry an error in its body (OpenAI SSE: an error event) always finishes the
body. One that cannot (ChatStream's cumulative text) must not look complete when the
generation did not end normally: the body is left unfinished, so the server closes the
connection without the final chunk and the client sees a truncated response."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream_cluster.gateway.disconnect import wait_for_disconnect
from chatstream_cluster.gateway.generation import DISCONNECTED_WHILE_STREAMING, SUCCESS, Generation
from chatstream_cluster.gateway.metrics import OPEN_STREAMS

log = logging.getLogger("chatstream.gateway")


class GenerationResponse(Response):
    """Streams `chunks` (bytes) of `generation`; closes it when done, failed or abandoned."""

    def __init__(
        self,
        generation: Generation,
        chunks: AsyncIterator[bytes],
        media_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        errors_in_band: bool = True,
    ) -> None:
        self.generation = generation
        self.errors_in_band = errors_in_band
        self.chunks = chunks
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = DISCONNECTED_WHILE_STREAMING
        gen = self.generation

        async def stream(cancel: anyio.CancelScope) -> None:
            nonlocal status
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                status = gen.outcome()
                if self.errors_in_band or status == SUCCESS:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    log.warning("stream did not end normally: closing the connection without "
                                "finishing the body", extra=gen.log_ctx)
            except OSError:
                pass  # the client is gone; `status` says so
            finally:
                cancel.cancel()

        async def watch(cancel: anyio.CancelScope) -> None:
            await wait_for_disconnect(receive)
            cancel.cancel()

        try:
            with OPEN_STREAMS.track_inprogress():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream, tg.cancel_scope)
                    tg.start_soon(watch, tg.cancel_scope)
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            await gen.close(status)
