"""The ChatStream endpoints of the gateway app: `/chat_stream` and its companions.

`ENDPOINTS` maps ChatStream's API names to (method, path, endpoint); the gateway app mounts all
of them, and `ChatStreamCluster.append_apis` picks from the same table. Each endpoint calls the
`ChatStreamAPI` method of the same name on `app.state.chatstream`: the gateway app's own
`GatewayChatStream`, or the `ChatStreamCluster` of `append_apis` (gateway/chatstream/api.py has
what each one does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream.api import ChatStreamAPI
from chatstream_cluster.gateway.chatstream.roles import ClientRoles
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.shared.settings import GatewaySettings

Endpoint = Callable[[Request], Awaitable[Response]]


class GatewayChatStream(ChatStreamAPI):
    """ChatStreamAPI over the gateway app's own state (gateway/app.py's lifespan), with the
    client roles of `--client-roles-file` (a bad file raises ValueError)."""

    def __init__(self, app: Any, settings: GatewaySettings | None = None) -> None:
        path = settings.client_roles_file if settings is not None else ""
        super().__init__(client_roles=ClientRoles.from_file(path) if path else None)
        self.app = app

    async def gateway_state(self) -> GatewayState:
        return self.app.state.gateway


def _api(request: Request) -> ChatStreamAPI:
    """`app.state.chatstream` (create_app's, or `ChatStreamCluster.append_apis`'s)."""
    api = getattr(request.app.state, "chatstream", None)
    if api is None:
        api = request.app.state.chatstream = GatewayChatStream(request.app)
    return api


def _make_endpoint(name: str, doc: str) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await getattr(_api(request), f"handle_{name}_request")(request)

    endpoint.__name__, endpoint.__doc__ = name, doc
    return endpoint


ENDPOINTS: dict[str, tuple[str, str, Endpoint]] = {
    name: (method, "/" + name, _make_endpoint(name, doc))
    for name, method, doc in [
        ("chat_stream", "POST", "Stream one chat turn: `{user_input: str, regenerate: bool}`."),
        ("clear_context", "POST", "Forget this session's conversation (params stay)."),
        ("get_prompt", "GET", "The session's last prompt and reply, URL-encoded."),
        ("set_generation_params", "POST",
         "Set temperature (0-1), top_k_value (1-500), top_p_value (0-1) for this session."),
        ("get_generation_params", "GET", "This session's params: defaults merged with overrides."),
        ("set_feedback", "POST", "Like or dislike one reply: `{is_like, message_id, form_data}`."),
        ("get_load", "GET", "Running and waiting generations per worker, cluster-wide."),
        ("get_resource_usage", "GET", "GPU/CPU memory of every live worker."),
    ]
}

router = APIRouter(tags=["chatstream"])
for _method, _path, _handler in ENDPOINTS.values():
    router.add_api_route(_path, _handler, methods=[_method])
