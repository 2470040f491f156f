"""Where an engine step's time goes: the forward, the sampling, and the rest (the host's work).

Off unless a benchmark switches it on (`HFEngine.timer = StepTimer(device)`); the engine then
marks each step's phases. On CPU every phase is wall time: forward = the model's forward (the
batch already built), sampling = the draw, host = everything else in the step (scheduling,
building the batch, the draw's one `.tolist()`, detokenizing, outputs). On CUDA the forward
and the sampling are device time, from CUDA events around them (read after the step's sync),
and host = step wall time minus both: the time the device spent waiting for the host.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Accumulates per-step phase times; `summary()` gives the means in milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.cuda \
            else []
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.step_s = self.forward_s = self.sampling_s = 0.0
        self._marks: list[float] = []

    def start(self) -> None:
        """The step begins."""
        self._t0 = time.perf_counter()
        self._marks = []

    def mark(self) -> None:
        """Call before the forward, after it, and after the sampling (before its sync)."""
        if self.cuda:
            self._events[len(self._marks)].record()
        self._marks.append(time.perf_counter())

    def stop(self) -> None:
        """The step ends (its outputs made). A step without a forward is not counted."""
        if len(self._marks) != 3:
            return
        self.steps += 1
        self.step_s += time.perf_counter() - self._t0
        if self.cuda:
            begin, forward, sampled = self._events
            self.forward_s += begin.elapsed_time(forward) / 1000
            self.sampling_s += forward.elapsed_time(sampled) / 1000
        else:
            begin, forward, sampled = self._marks
            self.forward_s += forward - begin
            self.sampling_s += sampled - forward

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per step: step, forward, sampling, host (the rest)."""
        n = max(self.steps, 1)
        step, forward, sampling = (1000 * v / n for v in
                                   (self.step_s, self.forward_s, self.sampling_s))
        return {
            "steps": self.steps,
            "step_ms": round(step, 3),
            "forward_ms": round(forward, 3),
            "sampling_ms": round(sampling, 3),
            "host_ms": round(max(0.0, step - forward - sampling), 3),
        }
