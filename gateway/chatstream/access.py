"""Client roles at request time: the role of a request, the 403, and UI pass-phrase promotion.

Every ChatStream endpoint asks `AccessControl.check(request, view, api_name)` first (the
definitions and the browser/program rule are in roles.py). A browser's promoted role is the
`role` field of its Redis session, so it holds on every gateway and survives /clear_context.

This layer comes after `--api-key` (gateway/auth.py): the API key decides whether a client may
talk to the gateway at all (401), the role which ChatStream APIs it may call (403).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream.chat import EOS_MARK
from chatstream_cluster.gateway.chatstream.roles import (
    AUTH_HEADER,
    DEV_TOOL_HEADER,
    ClientRoles,
    Role,
    is_program,
)
from chatstream_cluster.gateway.chatstream.session_view import SessionView
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.generation import SUCCESS
from chatstream_cluster.gateway.sessions.store import SessionStore

log = logging.getLogger("chatstream.gateway")


class RoleDenied(APIError):
    """403 with ChatStream's body (`{"success": false, "message": "Forbidden", "detail":
    "Denied on role layer."}`) plus the gateway's `error` object, which names role and API."""

    def __init__(self, api_name: str, role: Role | None) -> None:
        who = f"the client role {role.name!r}" if role else "a client without a role"
        super().__init__(403, f"{who} may not call {api_name!r}", code="role_forbidden")

    def chatstream_response(self) -> JSONResponse:
        body = {"success": False, "message": "Forbidden", "detail": "Denied on role layer.",
                **self.body()}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class AccessControl:
    """Enforces one `client_roles` definition."""

    def __init__(self, roles: ClientRoles) -> None:
        self.roles = roles

    async def check(self, request: Request, view: SessionView, api_name: str) -> Role:
        """The request's role, if it may call `api_name`; else raises RoleDenied."""
        if is_program(request.headers):
            role = self.roles.program_role(request.headers.get(AUTH_HEADER))
        else:
            if view.session is None:
                await view.load()
            role = self.roles.browser_role(view.session.role if view.session else None)
        view.client_role = role.as_client_role() if role else None
        if role is None or not role.allows(api_name):
            log.info("role denied", extra={"api": api_name, "role": role.name if role else None})
            raise RoleDenied(api_name, role)
        return role

    async def promote(
        self, request: Request, store: SessionStore, view: SessionView, user_input: Any
    ) -> Role | None:
        """If a browser typed a UI pass phrase: store the role in its session and return it."""
        if not isinstance(user_input, str) or is_program(request.headers):
            return None
        role = self.roles.pass_phrase_role(user_input)
        if role is not None:
            await store.set_role(view.sid, role.name)
            view.client_role = role.as_client_role()
            log.info("session promoted", extra={"role": role.name})
        return role


def promotion_response(role: Role, notify: Callable[[str], Awaitable[None]]) -> Response:
    """ChatStream's answer to a pass phrase, on the chat_stream wire: the text
    `New role: '<name>' has been granted` + EOS mark, `X-ChatStream-API-DevTool-Enabled:
    enabled` for a role with `enable_dev_tool`; the callback gets `success` once it is sent."""
    text = f"New role: '{role.name}' has been granted{EOS_MARK}"
    headers = {DEV_TOOL_HEADER: "enabled"} if role.enable_dev_tool else None
    return Response(text, media_type="text/plain; charset=utf-8", headers=headers,
                    background=BackgroundTask(notify, SUCCESS))
