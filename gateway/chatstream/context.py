"""What every ChatStream endpoint starts from: the gateway state, the request's session and its
signed cookie, and the request's JSON body (read here, or as the app already read it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from chatstream_cluster.gateway.auth import api_key_id
from chatstream_cluster.gateway.body import parse_json, read_json
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.sessions.cookies import COOKIE_NAME, CookieSigner, new_sid
from chatstream_cluster.gateway.sessions.store import SessionStore
from chatstream_cluster.gateway.state import GatewayState


@dataclass
class SessionContext:
    """One request's gateway state and session (a verified cookie's id, or a fresh one).

    `owner` is the id of the API key the request came with ("" without keys): the cookie is
    signed for it, so a session is invisible to every other key (sessions/cookies.py).
    `set_cookie` is False for a session a RequestHandler names (chatstream/handlers.py)."""

    state: GatewayState
    store: SessionStore
    signer: CookieSigner
    sid: str
    owner: str = ""
    set_cookie: bool = True

    def with_cookie(self, response: Response) -> Response:
        """Set (and so slide) the signed session cookie."""
        if not self.set_cookie:
            return response
        s = self.state.settings
        response.set_cookie(
            COOKIE_NAME, self.signer.sign(self.sid, self.owner), max_age=int(s.session_ttl),
            path="/", httponly=True, samesite="lax", secure=s.cookie_secure,
        )
        return response


class SessionBinding:
    """The session store and cookie signer of the current gateway state (made once per state)."""

    def __init__(self) -> None:
        self._bound: tuple[GatewayState, SessionStore, CookieSigner] | None = None

    def context(self, state: GatewayState, request: Request) -> SessionContext:
        if self._bound is None or self._bound[0] is not state:
            s = state.settings
            store = SessionStore(state.redis, state.keys, s.session_ttl,
                                 max_per_owner=s.max_sessions_per_key)
            self._bound = (state, store, CookieSigner(s.session_secret))
        _, store, signer = self._bound
        owner = api_key_id(request) or ""
        sid = signer.verify(request.cookies.get(COOKIE_NAME), owner) or new_sid()
        return SessionContext(state, store, signer, sid, owner)


async def json_object(request: Request, request_body: Any, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, or the body the app already read (ChatStream's interception:
    bytes, str or an already parsed dict)."""
    if request_body is None:
        body = await read_json(request, max_bytes)
    elif isinstance(request_body, dict):
        body = request_body
    elif isinstance(request_body, bytes | bytearray | str):
        body = parse_json(request_body, max_bytes)
    else:
        raise TypeError("request_body must be bytes, str or dict")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body
