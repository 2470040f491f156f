"""The worker's engine thread: outputs are coalesced per job; the publisher is woken at once
for a job's first and last output and for a job not sent for `stream_interval`, otherwise
within `stream_interval`.

Also: the CPU thread count a worker gives torch (`--torch-threads`), applied in the thread that
steps the engine (torch keeps that setting per thread).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.engine_api import GenerationRequest, StepOutput
from chatstream_cluster.worker.factory import torch_threads
from chatstream_cluster.worker.loop import Worker


class ScriptedEngine:
    """Returns one scripted list of outputs per step."""

    model_name = "scripted"
    max_batch = 4
    max_context = 100

    def __init__(self, steps: list[list[StepOutput]]) -> None:
        self.steps = deque(steps)

    def submit(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def cancel(self, request_id: str) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.steps)

    def step(self) -> list[StepOutput]:
        return self.steps.popleft()

    def close(self) -> None:
        pass


class RecordingLoop:
    """Stands in for the asyncio loop: records each wake-up with what was pending then."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.wakes: list[dict[str, str]] = []

    def call_soon_threadsafe(self, callback, *args) -> None:  # noqa: ANN001
        publisher = self.worker.publisher
        with publisher._lock:
            self.wakes.append({jid: p.text for jid, p in publisher._pending.items()})
            publisher._pending.clear()  # what the publisher would take


def run_engine_thread(steps: list[list[StepOutput]], interval: float) -> list[dict[str, str]]:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", stream_interval=interval)
    worker = Worker(settings, ScriptedEngine(steps))
    loop = RecordingLoop(worker)
    worker._loop = worker.publisher._loop = loop  # type: ignore[assignment]
    thread = threading.Thread(target=worker._engine_main)
    thread.start()
    deadline = time.monotonic() + 5
    while worker.engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # an idle pass flushes what is left
    worker._stop_engine.set()
    worker._engine_wake.set()
    thread.join(5)
    return loop.wakes


def text(jid: str, t: str, tokens: int, finish: str | None = None) -> StepOutput:
    return StepOutput(jid, text=t, tokens=tokens, finish_reason=finish)


def test_interval_zero_publishes_every_step() -> None:
    steps = [[text("a", "x", 1)], [text("a", "y", 2)], [text("a", "z", 3, "length")]]
    assert run_engine_thread(steps, 0) == [{"a": "x"}, {"a": "y"}, {"a": "z"}]


def test_first_and_last_outputs_go_at_once_the_middle_is_coalesced() -> None:
    steps = [
        [text("a", "1", 1)],
        [text("a", "2", 2), text("b", "B", 1)],  # b's first output: wakes with a's text
        [text("a", "3", 3), text("b", "C", 2)],
        [text("a", "4", 4)],
        [text("a", "5", 5, "length")],
    ]
    wakes = run_engine_thread(steps, 1.0)
    assert wakes == [{"a": "1"}, {"a": "2", "b": "B"}, {"a": "345", "b": "C"}]


def test_coalesced_text_is_flushed_when_the_engine_goes_idle() -> None:
    wakes = run_engine_thread([[text("a", "1", 1)], [text("a", "2", 2)], [text("a", "3", 3)]],
                              1.0)
    assert wakes == [{"a": "1"}, {"a": "23"}]


def test_the_interval_bounds_how_long_text_waits() -> None:
    class SlowEngine(ScriptedEngine):
        def step(self) -> list[StepOutput]:
            time.sleep(0.01)
            return super().step()

    steps = [[text("a", str(i % 10), i)] for i in range(1, 30)]
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", stream_interval=0.05)
    worker = Worker(settings, SlowEngine(steps))
    loop = RecordingLoop(worker)
    worker._loop = worker.publisher._loop = loop  # type: ignore[assignment]
    thread = threading.Thread(target=worker._engine_main)
    thread.start()
    time.sleep(0.8)
    worker._stop_engine.set()
    worker._engine_wake.set()
    thread.join(5)
    assert "".join(w["a"] for w in loop.wakes) == "".join(str(i % 10) for i in range(1, 30))
    # ~0.3 s of 10 ms steps with a 50 ms interval: several tokens per wake-up, not one each.
    assert 3 <= len(loop.wakes) <= 12


def test_a_slow_stream_is_never_held_back() -> None:
    class PacedEngine(ScriptedEngine):
        def step(self) -> list[StepOutput]:
            time.sleep(0.04)  # a token every 40 ms, slower than the interval
            return super().step()

    steps = [[text("a", str(i), i)] for i in range(1, 6)]
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", stream_interval=0.03)
    worker = Worker(settings, PacedEngine(steps))
    loop = RecordingLoop(worker)
    worker._loop = worker.publisher._loop = loop  # type: ignore[assignment]
    thread = threading.Thread(target=worker._engine_main)
    thread.start()
    time.sleep(0.5)
    worker._stop_engine.set()
    worker._engine_wake.set()
    thread.join(5)
    assert loop.wakes == [{"a": str(i)} for i in range(1, 6)]  # each token at once, alone


def test_torch_threads_auto_leaves_a_core_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert torch_threads(WorkerSettings(device="cpu")) == 3
    assert torch_threads(WorkerSettings(device="cpu", torch_threads=2)) == 2
    assert torch_threads(WorkerSettings(device="cuda:0")) == 0  # torch's default
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert torch_threads(WorkerSettings(device="cpu")) == 1


def test_engine_applies_its_threads_in_the_stepping_thread(
    demo_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from chatstream_cluster.worker.engine import HFEngine

    engine = HFEngine(demo_model_dir, max_batch=1, threads=1)
    calls: list[tuple[int, int]] = []
    record = lambda n: calls.append((threading.get_ident(), n))  # noqa: E731
    monkeypatch.setattr(torch, "set_num_threads", record)
    idents: list[int] = []

    def step_twice() -> None:
        idents.append(threading.get_ident())
        engine.step()
        engine.step()

    for _ in range(2):
        thread = threading.Thread(target=step_twice)
        thread.start()
        thread.join()
    engine.close()
    assert calls == [(idents[0], 1), (idents[1], 1)]  # once per new stepping thread
