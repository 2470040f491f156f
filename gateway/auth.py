"""Who may call what: API keys on the generation endpoints, the admin key on operators' ones.

`AuthMiddleware` is a pure ASGI middleware (BaseHTTPMiddleware would break the streaming
responses' disconnect detection). It sorts every request by its path, before any body is read:

- open: `/healthz`, `/readyz` (probes), the API docs (`/openapi.json`, `/docs`, `/redoc`) and
  the browser pages, which hold no figure and no secret (`/`, `/chatstream.js`, `/ui/*`, and
  the ops page's shell `/admin`: its figures come from `/admin/status` and `/admin/history`).
- admin: `/admin/*` and `/metrics`. With `--admin-key`: `Authorization: Bearer <admin key>`,
  else 401. Without an admin key: clients on a loopback address only, and only when the request
  carries no proxy header (a proxy on the same host may be relaying anyone); others get 403.
- api: everything else (`/v1/*`, the ChatStream endpoints, unknown paths). With `--api-key`:
  `Authorization: Bearer <one of the keys>` (what the OpenAI SDK's `api_key` sends), else 401.
  Without API keys: open.

Keys are compared in constant time (`hmac.compare_digest` over SHA-256 digests, every key tried)
and never logged. The matched API key's id (`sha256(key)[:16]`, not the key) goes into the
request's state as `api_key_id`, for the per-key concurrency cap (`gateway.admission`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.shared.settings import GatewaySettings

log = logging.getLogger("chatstream.gateway")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
#: The browser pages (gateway/routes/ui.py): static files, no data.
PAGE_PATHS = frozenset({"/", "/chatstream.js", "/admin"})
PAGE_ASSETS_PREFIX = "/ui/"
ADMIN_PREFIX = "/admin/"
ADMIN_PATHS = frozenset({"/metrics"})
#: Headers a reverse proxy adds: a request with one did not come from this host's own client.
PROXY_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")
API_KEY_ID_STATE = "api_key_id"

OPEN, ADMIN, API = "open", "admin", "api"


def classify(path: str) -> str:
    """`open`, `admin` or `api`: which rule applies to a request path."""
    trimmed = path.rstrip("/") or "/"
    if trimmed in OPEN_PATHS or trimmed in PAGE_PATHS or path.startswith(PAGE_ASSETS_PREFIX):
        return OPEN
    if trimmed in ADMIN_PATHS or path.startswith(ADMIN_PREFIX):
        return ADMIN
    return API


def key_id(key: str) -> str:
    """The id of an API key in names and metrics: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class KeyChecker:
    """The configured keys, as digests, and the decisions that follow from them."""

    def __init__(self, settings: GatewaySettings) -> None:
        keys = [k.strip() for k in settings.api_keys if k.strip()]
        self.api_keys = [(_digest(k), key_id(k)) for k in keys]
        admin = settings.admin_key.strip()
        self.admin_key = _digest(admin) if admin else None

    def api_key_id(self, token: bytes | None) -> str | None:
        """The id of the configured API key equal to `token`; compares with every key."""
        if token is None:
            return None
        given = _digest(token)
        found = None
        for digest, kid in self.api_keys:
            if hmac.compare_digest(given, digest) and found is None:
                found = kid
        return found

    def api_denial(self, scope: Scope) -> APIError | None:
        """None when the request may use the API (recording its key id), else the 401."""
        if not self.api_keys:
            return None
        kid = self.api_key_id(bearer_token(scope.get("headers", [])))
        if kid is None:
            return APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <API key>' (the "
                "OpenAI SDK's api_key)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scope.setdefault("state", {})[API_KEY_ID_STATE] = kid
        return None

    def admin_denial(self, scope: Scope) -> APIError | None:
        """None when the request may use an admin endpoint, else the 401 or 403."""
        headers = scope.get("headers", [])
        if self.admin_key is not None:
            token = bearer_token(headers)
            if token is not None and hmac.compare_digest(_digest(token), self.admin_key):
                return None
            return APIError(
                401,
                "this endpoint wants the admin key: send 'Authorization: Bearer <admin key>'",
                code="invalid_admin_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        client = scope.get("client")
        proxied = any(name in PROXY_HEADERS for name, _ in headers)
        if client and is_loopback(client[0]) and not proxied:
            return None
        return APIError(
            403,
            "no admin key is configured, so this endpoint answers local clients only; start "
            "the gateway with --admin-key (CHATSTREAM_ADMIN_KEY) and send 'Authorization: "
            "Bearer <admin key>'",
            code="admin_key_required",
        )

    def denial(self, scope: Scope) -> APIError | None:
        kind = classify(scope.get("path", "/"))
        if kind == ADMIN:
            return self.admin_denial(scope)
        if kind == API:
            return self.api_denial(scope)
        return None


class AuthMiddleware:
    """Answers 401/403 before the app sees a request it may not serve."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.checker = KeyChecker(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        denial = self.checker.denial(scope)
        if denial is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        log.info("request refused", extra={"path": scope.get("path"), "status": denial.status,
                                           "code": denial.code,
                                           "client": client[0] if client else None})
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = _error_response(denial, scope.get("path", "/"))
        await response(scope, receive, send)


def _error_response(error: APIError, path: str) -> JSONResponse:
    """OpenAI-style on /v1; ChatStream endpoints also get their `success`/`message` keys."""
    if path.startswith("/v1/") or classify(path) != API:
        return error.response()
    return error.chatstream_response()


def api_key_id(request: Request) -> str | None:
    """The id of the API key the request was admitted with (None when keys are off)."""
    return request.scope.get("state", {}).get(API_KEY_ID_STATE)


async def require_admin(request: Request) -> None:
    """A FastAPI dependency with the middleware's admin rule, for routers mounted elsewhere."""
    denial = KeyChecker(request.app.state.gateway.settings).admin_denial(request.scope)
    if denial is not None:
        raise denial
