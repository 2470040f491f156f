"""OpenAI-style error responses for every failure the gateway reports.

Body: `{"error": {"message", "type", "param", "code"}}`. Request validation errors are 400 and
name the offending field in `param`; nothing the client sends may produce a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatstream_cluster.shared.redis_errors import is_transient

log = logging.getLogger("chatstream.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as JSON with a status code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "api_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def chatstream_response(self) -> JSONResponse:
        """ChatStream's `success`/`message` keys plus the `error` object (ChatStream routes)."""
        body = {"success": False, "message": self.message, **self.body()}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def redis_unavailable() -> APIError:
    return APIError(
        503,
        "the cluster's Redis is unreachable; retry shortly",
        code="redis_unavailable",
        headers={"Retry-After": "2"},
    )


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """The first validation problem as a 400 naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{first.get('msg')}", code="invalid_value", param=param)


def as_api_error(exc: Exception, *, log_unexpected: bool = True) -> APIError:
    """The answer for any exception a request hit: APIErrors as they are, validation errors as
    400, Redis outages as 503, anything else a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return validation_error(list(exc.errors()))
    if is_transient(exc):
        log.warning("redis unavailable", extra={"error": str(exc)})
        return redis_unavailable()
    if log_unexpected:
        log.error("unexpected error", exc_info=exc)
    return APIError(500, "internal error", code="internal_error")


def describe(err: APIError) -> str:
    """`<code>: <message>`, the detail of ChatStream's `unknown_error_occurred,<detail>`."""
    return f"{err.code}: {err.message}" if err.code else err.message


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to an OpenAI-style JSON error."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _pyd_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        """Transient Redis errors are a 503; anything else is a bug: a logged 500."""
        return as_api_error(exc).response()
