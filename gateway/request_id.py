"""The `X-Request-ID` a client sends, kept only when it is short and plain.

The id is echoed in the response's `X-Request-ID` header and written into every log line of
the request, so a client could otherwise make the gateway echo a megabyte header and write
megabyte log lines. An id longer than `MAX_REQUEST_ID` characters or with a character outside
`[A-Za-z0-9._:@/+=-]` is replaced by the gateway's own (the job id), never refused: a proxy's
id format is not the client's fault. This is the only request header the gateway echoes.
"""

from __future__ import annotations

import re

from starlette.requests import Request

MAX_REQUEST_ID = 128
_PLAIN = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{MAX_REQUEST_ID}}}")


def plain_request_id(value: str | None) -> str:
    """`value` when it may be echoed and logged, else "" (the gateway then uses its own)."""
    return value if value and _PLAIN.fullmatch(value) else ""


def client_request_id(request: Request) -> str:
    """The request's `X-Request-ID`, if plain (see `plain_request_id`)."""
    return plain_request_id(request.headers.get("x-request-id"))
