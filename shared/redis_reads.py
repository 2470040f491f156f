"""Read timeouts that a busy event loop does not turn into false Redis outages.

redis-py bounds each reply with an asyncio timeout (`socket_timeout`). When the process's event
loop is busy — a gateway taking a burst of a thousand requests runs each of them for a while
before it gets back to reading sockets — a reply that arrived in time may be seen only after the
timer fired, and the timer wins: the call fails with "Timeout reading" although Redis answered
in a millisecond. A short timeout (what makes a frozen Redis fail fast) then makes bursts fail.

`lag_tolerant(connection_class)` adds one rule to a redis-py connection class: when a read
times out but the timeout itself was seen late (the loop woke more than `LATE_S` after the
deadline), the loop was busy, not Redis; the reply is read once more (at once, if it is there)
instead of failing. A timeout seen on time is a Redis that did not answer: it fails as before.
Kept here rather than in redis-py's options because redis-py has no such option.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: A timeout noticed later than this after its deadline was delayed by the event loop.
LATE_S = 0.1


class LagTolerantReads:
    """Mixin for a redis-py asyncio Connection class (see the module docstring)."""

    socket_timeout: float | None

    async def read_response(
        self, disable_decoding: bool = False, timeout: float | None = None, *,
        disconnect_on_error: bool = True, push_request: bool | None = False,
    ) -> Any:
        read = super().read_response  # type: ignore[misc]
        if timeout is not None or self.socket_timeout is None:
            return await read(disable_decoding, timeout, disconnect_on_error=disconnect_on_error,
                              push_request=push_request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.socket_timeout
        try:
            return await read(disable_decoding, None, disconnect_on_error=False,
                              push_request=push_request)
        except RedisTimeoutError:
            if loop.time() - deadline < LATE_S:  # seen on time: Redis did not answer
                if disconnect_on_error:
                    await self.disconnect(nowait=True)  # type: ignore[attr-defined]
                raise
        except ResponseError:
            raise  # an error reply: the connection is fine
        except BaseException:
            if disconnect_on_error:
                await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise
        # The loop was too busy to see the reply in time; nothing was consumed: look again.
        return await read(disable_decoding, None, disconnect_on_error=disconnect_on_error,
                          push_request=push_request)


def lag_tolerant(connection_class: type) -> type:
    """`connection_class` (plain, TLS or Unix socket) with `LagTolerantReads`."""
    if issubclass(connection_class, LagTolerantReads):
        return connection_class
    return type(f"LagTolerant{connection_class.__name__}", (LagTolerantReads, connection_class),
                {})
