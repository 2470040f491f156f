"""Read a JSON request body with the limits a public endpoint needs."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from chatstream_cluster.gateway.errors import APIError


async def read_json(request: Request, max_bytes: int) -> Any:
    """The parsed body; 413 when too large, 415 when not JSON, 400 when not UTF-8 JSON."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "") and not ctype.endswith("+json"):
        raise APIError(
            415,
            f"content type must be application/json, not {ctype!r}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    return parse_json(b"".join(chunks), max_bytes)


def parse_json(raw: bytes | bytearray | str, max_bytes: int) -> Any:
    """A body already read (e.g. by an app that looked at it first), with the same checks."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > max_bytes:
        raise APIError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_utf8") from None
    if not raw.strip():
        raise APIError(400, "request body is empty; a JSON object is required", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
