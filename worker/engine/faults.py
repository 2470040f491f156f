"""TEST ONLY: make an engine's forward fail on purpose, to test the worker's safe failure.

`CHATSTREAM_TEST_FAULTS` in a worker's environment (HFEngine and MockEngine read it; never
set it in production) lists faults as `kind@N` items, comma-separated, where N counts the
engine's forwards from 1 (start-up checks and the warm-up excluded):

- `raise@N`: the N-th forward raises RuntimeError;
- `alloc@N`: the N-th forward makes a real allocation that cannot succeed (the allocator's
  own out-of-memory error);
- `raise@N+`: every forward from the N-th on raises.

Faults fire inside the engine's step, after the scheduler has admitted sequences and
reserved their KV, which is the state a real failure leaves behind.

`CHATSTREAM_TEST_COLD_START` (also TEST ONLY) makes a worker wait before it builds its engine,
as a pod that pulls an image and loads a model does: `S` seconds, or `A-B` for a random time
between A and B seconds. The autoscaling test starts `mock` workers with it (worker/main.py).
"""

from __future__ import annotations

import os
import random

ENV = "CHATSTREAM_TEST_FAULTS"
COLD_START_ENV = "CHATSTREAM_TEST_COLD_START"


def cold_start_seconds() -> float:
    """The fake start-up delay `CHATSTREAM_TEST_COLD_START` asks for (0 when unset)."""
    spec = os.environ.get(COLD_START_ENV, "").strip()
    if not spec:
        return 0.0
    low, _, high = spec.partition("-")
    try:
        a, b = float(low), float(high or low)
    except ValueError:
        raise ValueError(f"{COLD_START_ENV}: cannot read {spec!r} (S or A-B seconds)") from None
    return random.uniform(min(a, b), max(a, b))


class FaultPlan:
    """Which forwards fail, and how."""

    def __init__(self, spec: str):
        self.at: dict[int, str] = {}
        self.from_on: tuple[int, str] | None = None
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, when = item.partition("@")
            if kind not in ("raise", "alloc") or not when.rstrip("+").isdigit():
                raise ValueError(f"{ENV}: cannot read {item!r} (kind@N or kind@N+)")
            if when.endswith("+"):
                self.from_on = (int(when[:-1]), kind)
            else:
                self.at[int(when)] = kind
        self.forwards = 0
        self.armed = False  # start-up checks and the warm-up run before the worker arms it

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        spec = os.environ.get(ENV, "")
        return cls(spec) if spec else None

    def before_forward(self) -> None:
        if not self.armed:
            return
        self.forwards += 1
        kind = self.at.get(self.forwards)
        if kind is None and self.from_on and self.forwards >= self.from_on[0]:
            kind = self.from_on[1]
        if kind == "raise":
            raise RuntimeError(f"injected fault at forward {self.forwards} ({ENV})")
        if kind == "alloc":
            import torch

            torch.empty(1 << 62, dtype=torch.uint8)  # raises the allocator's own error
