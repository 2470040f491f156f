"""Limits on the HTTP layer of a gateway process: sizes, slow clients, connections.

uvicorn's httptools protocol (the fast one the gateway serves with) bounds none of these: it
buffers a header of any size (httptools concatenates the pieces of a header value as they
arrive), waits for ever for a client that trickles its headers or its body, and takes every
connection the kernel hands it. h11's `h11_max_incomplete_event_size` would bound the head,
but h11 is the slow protocol and bounds no time. So `limited_protocol()` subclasses the
httptools protocol and adds, per connection:

- head size: the request line and headers together at most `--max-head-bytes` (counted on the
  bytes received, checked after every read, so at most one read, <= 256 KiB, is ever buffered
  past the limit), each header at most `--max-header-bytes`, the URL at most `--max-url-bytes`
  (431 / 414);
- time: `--header-timeout` for the request line and headers, from connecting or from the
  request's first byte (an idle keep-alive connection is uvicorn's `--keep-alive-timeout`),
  and `--body-timeout` for the body once the headers are in (408);
- connections: past `--max-connections` open ones, a new connection gets 503 and is closed;
- malformed HTTP: a JSON 400 instead of uvicorn's plain-text one.

Every refusal is an OpenAI-style JSON error with `Connection: close`, sent only when no response
of the connection is under way, and counted in `chatstream_http_refused_total{reason}`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.metrics import HTTP_REFUSED
from chatstream_cluster.shared.settings import GatewaySettings

log = logging.getLogger("chatstream.gateway")

#: File descriptors kept for what is not a client connection (Redis pool, pub/sub, logs).
RESERVED_FDS = 512


@dataclass(frozen=True)
class HttpLimits:
    """The limits one gateway process enforces on its connections."""

    max_header_bytes: int
    max_head_bytes: int
    max_url_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, s: GatewaySettings, max_connections: int | None = None) -> HttpLimits:
        return cls(
            max_header_bytes=s.max_header_bytes, max_head_bytes=s.max_head_bytes,
            max_url_bytes=s.max_url_bytes, header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            max_connections=max_connections or s.max_connections,
        )


class Refusal(Exception):
    """A request the HTTP layer answers itself: status, OpenAI error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response_bytes(self) -> bytes:
        body = orjson.dumps(APIError(self.status, self.message, code=self.code).body())
        return b"".join([
            STATUS_LINE[self.status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ])


INVALID_HTTP = Refusal(400, "invalid_http", "malformed HTTP request")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `HttpLimits` (see the module docstring).

    Only uvicorn's documented extension points are used: the parser callbacks, the protocol
    callbacks, `send_400_response`, and the cycle's `disconnected` flag."""

    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # bytes received now belong to a request line or headers
        self._head_bytes = 0  # received while in the head (catches a head spread over reads)
        self._parsed_head = 0  # parsed into this request's URL and headers (one read's worth)
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: Refusal | None = None  # set by a parser callback that refused
        self._closed_by_limit = False

    # --- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(Refusal(503, "too_many_connections",
                                 "this gateway has too many open connections; retry shortly"))
            return
        self._arm(self.limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed_by_limit:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)  # parser errors end in send_400_response below
        if self._in_head and not self._closed_by_limit \
                and self._head_bytes > self.limits.max_head_bytes:
            self._refuse(self._head_too_large())

    def _head_too_large(self) -> Refusal:
        return Refusal(431, "headers_too_large",
                       f"request line and headers exceed {self.limits.max_head_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused: JSON, with the reason when one of
        our callbacks refused it."""
        self._refuse(self._refusal or INVALID_HTTP)

    # --- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._parsed_head = 0
        if self._timer is None:  # a keep-alive connection's next request: its first byte
            self._arm(self.limits.header_timeout, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed_head += len(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._refusal = Refusal(414, "url_too_long",
                                    f"request URL exceeds {self.limits.max_url_bytes} bytes")
            raise self._refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self.limits.max_header_bytes:
            self._refusal = Refusal(431, "header_too_large",
                                    f"a request header exceeds {self.limits.max_header_bytes} "
                                    "bytes")
            raise self._refusal
        self._parsed_head += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._parsed_head > self.limits.max_head_bytes:  # a whole head in one read
            self._refusal = self._head_too_large()
            raise self._refusal
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        self._arm(self.limits.body_timeout, self._body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_head = True  # what follows is the next request's head

    # --- timers --------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        self._refuse(Refusal(408, "header_timeout",
                             f"request headers not received within "
                             f"{self.limits.header_timeout:g}s"))

    def _body_timeout(self) -> None:
        self._timer = None
        self._refuse(Refusal(408, "body_timeout",
                             f"request body not received within {self.limits.body_timeout:g}s"))

    # --- refusing ------------------------------------------------------------------------
    def _refuse(self, refusal: Refusal) -> None:
        """Answer `refusal` (unless a response is under way) and close the connection."""
        if self._closed_by_limit:
            return
        self._closed_by_limit = True
        self._disarm()
        HTTP_REFUSED.labels(reason=refusal.code).inc()
        log.debug("connection refused by a limit", extra={
            "status": refusal.status, "code": refusal.code,
            "client": self.client[0] if self.client else None})
        cycle = self.cycle
        if self._in_head:  # `cycle` is the previous request's: answer once it is answered
            may_answer = cycle is None or cycle.response_complete
        else:  # `cycle` is this request's: answer unless the app already started to
            may_answer = cycle is None or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() ends, its send() is dropped
            cycle.message_event.set()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if may_answer:
            transport.write(refusal.response_bytes())
        transport.close()


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for uvicorn's `http=` with `limits` bound."""
    return type("GatewayHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def fit_open_files(max_connections: int) -> int:
    """Raise the soft open-files limit to fit `max_connections` client sockets plus
    `RESERVED_FDS`, up to the hard limit; returns the connection cap that fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + RESERVED_FDS
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    fits = max(1, soft - RESERVED_FDS)
    if fits < max_connections:
        log.warning("open-files limit too low for --max-connections: lowered", extra={
            "max_connections": max_connections, "effective": fits, "nofile": soft})
        return fits
    return max_connections
