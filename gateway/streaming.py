"""A streaming response that owns a Generation: it watches for the client's disconnect and
always closes the generation with the status of what really happened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream_cluster.gateway.disconnect import wait_for_disconnect
from chatstream_cluster.gateway.generation import DISCONNECTED_WHILE_STREAMING, Generation
from chatstream_cluster.gateway.metrics import OPEN_STREAMS


class GenerationResponse(Response):
    """Streams `chunks` (bytes) of `generation`; closes it when done, failed or abandoned."""

    def __init__(
        self,
        generation: Generation,
        chunks: AsyncIterator[bytes],
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.generation = generation
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
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                status = gen.outcome()
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
