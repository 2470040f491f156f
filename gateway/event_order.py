"""The ordering of one job's events: strictly by sequence number, each exactly once.

Events reach a gateway from two sources that may overlap or miss some: the pub/sub channel
(fast, lossy across reconnects) and the job's event stream in Redis (read to repair gaps).
`EventOrder` takes events from both in any order and hands them out in sequence: duplicates
are dropped, an event that arrives before the one it follows is held until the gap is filled.
It does no I/O: the caller reads the job's stream when `has_gap` says so.
"""

from __future__ import annotations

from collections import deque

from chatstream_cluster.shared.schemas import TokenEvent


class EventOrder:
    """Sequence-ordered, duplicate-free events of one job, from `next_seq` on."""

    __slots__ = ("next_seq", "_held", "_ready")

    def __init__(self, next_seq: int = 1) -> None:
        self.next_seq = next_seq
        self._held: dict[int, TokenEvent] = {}
        self._ready: deque[TokenEvent] = deque()

    def take(self, event: TokenEvent) -> None:
        """Add an event from either source; duplicates and already relayed ones are ignored."""
        seq = event.seq
        if seq < self.next_seq or seq in self._held:
            return
        self._held[seq] = event
        while self.next_seq in self._held:
            self._ready.append(self._held.pop(self.next_seq))
            self.next_seq += 1

    def pop(self) -> TokenEvent | None:
        """The next event in order, or None when it has not arrived yet."""
        return self._ready.popleft() if self._ready else None

    @property
    def ready(self) -> bool:
        """An event is waiting to be handed out."""
        return bool(self._ready)

    @property
    def has_gap(self) -> bool:
        """Events after a missing one arrived: the missing ones must be read from Redis."""
        return bool(self._held)

    @property
    def pending(self) -> int:
        """Events taken but not yet handed out (ready or held behind a gap)."""
        return len(self._ready) + len(self._held)
