"""WAIT after the writes that a failover must not lose (Sentinel).

Redis replicates asynchronously: a primary that dies right after acknowledging a write may take
it along, and the replica promoted in its place never saw it. For most writes that is harmless
(a lease is refreshed again, a heartbeat comes again). For a few it breaks a guarantee:

- the attempt fence (`JobQueue.begin_attempt`): a lost bump lets a stale worker write again;
- a permit grant (`RedisSemaphore.try_acquire`): a lost grant lets another request take it;
- a job entry (`JobQueue.enqueue`): a lost entry is never run;
- a round of events (`EventWriter.publish`): a lost event leaves a gap that nothing fills.

Those writes are followed, on the same connection (WAIT only counts that connection's writes),
by `WAIT <replicas> <timeout_ms>`. When WAIT comes back short (a replica is down or far behind)
the write stands, and WAITs pause for `backoff_s` so a missing replica does not add its timeout
to every request: availability over durability, and the remaining window (writes made while
the replicas lag) is documented in docs/operations.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import NoScriptError

log = logging.getLogger("chatstream.redis")
ATTRIBUTE = "chatstream_replica_wait"


class ReplicaWait:
    """The WAIT policy of one client (set by `redis_topology.make_client` for Sentinel URLs)."""

    def __init__(self, replicas: int, timeout_ms: int, backoff_s: float = 5.0) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.backoff_s = backoff_s
        self._paused_until = 0.0

    def attach(self, client: Any) -> None:
        setattr(client, ATTRIBUTE, self)

    @staticmethod
    def of(client: Any) -> ReplicaWait | None:
        """The client's policy when WAITs are due now, else None."""
        wait = getattr(client, ATTRIBUTE, None)
        if wait is None or time.monotonic() < wait._paused_until:
            return None
        return wait

    def append(self, pipe: Any) -> None:
        """Queue the WAIT behind the writes already in `pipe` (a non-transactional pipeline)."""
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def note(self, acked: Any) -> None:
        """Record WAIT's answer; pause WAITs when fewer replicas than asked acknowledged."""
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.replicas:
            self._paused_until = time.monotonic() + self.backoff_s
            log.warning(
                "replicas did not acknowledge a write in time: not waiting for them for a while",
                extra={"acked": int(acked), "wanted": self.replicas, "pause_s": self.backoff_s},
            )


async def eval_durably(redis: Any, script: Any, keys: list[Any], args: list[Any]) -> Any:
    """Run a registered script (`redis.register_script`); when the client has a WAIT policy,
    follow it with WAIT in the same round trip."""
    wait = ReplicaWait.of(redis)
    if wait is None:
        return await script(keys=keys, args=args)
    for first in (True, False):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            wait.append(pipe)
            result, acked = await pipe.execute(raise_on_error=False)
        if first and isinstance(result, NoScriptError):
            await redis.script_load(script.script)  # Redis lost its scripts (a new primary)
            continue
        if isinstance(result, Exception):
            raise result
        wait.note(acked)
        return result
    raise AssertionError("unreachable")
