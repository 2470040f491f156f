"""ChatStream Cluster: ChatStream's streaming chat API served by a cluster of GPU workers.

`from chatstream_cluster import ChatStreamCluster` gives the library API for an app that keeps
its own FastAPI server (gateway/library.py); `RequestHandler` is the base of a custom request
handler (gateway/chatstream/handlers.py). It is imported lazily, so the `chatstream` command
line (and the workers it starts) never loads the gateway's modules.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ChatStreamCluster", "GatewaySettings", "RequestHandler"]


def __getattr__(name: str) -> Any:
    if name == "ChatStreamCluster":
        from chatstream_cluster.gateway.library import ChatStreamCluster

        return ChatStreamCluster
    if name == "RequestHandler":
        from chatstream_cluster.gateway.chatstream.handlers import RequestHandler

        return RequestHandler
    if name == "GatewaySettings":
        from chatstream_cluster.shared.settings import GatewaySettings

        return GatewaySettings
    raise AttributeError(f"module 'chatstream_cluster' has no attribute {name!r}")
