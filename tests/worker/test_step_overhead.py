"""The engine step without per-sequence work (issue 16), checked on a CPU: a decode step reads
the device once (one `.tolist()`, no tensor made from a list), its inputs keep their addresses
in the step buffers, the pinned buffer is not rewritten under a pending copy, StepTimer splits
the step, CUDA graphs stay off by default, and bench/gpu_check.py runs end to end (--tiny)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.batch import StepBuffers
from chatstream_cluster.worker.engine.step_timer import StepTimer
from chatstream_cluster.worker.engine_api import GenerationRequest
from chatstream_cluster.worker.factory import make_engine

# What copies a tensor's values to Python. (`.numpy()` is left out: the sampler's CPU-only
# paths take zero-copy numpy views; on CUDA they run as torch ops.)
READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


def req(rid: str, **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 40)
    return GenerationRequest(rid, [ChatMessage(role="user", content=f"prompt {rid}")],
                             SamplingParams(**sampling))


def mixed() -> list[GenerationRequest]:
    return [req("g", temperature=0), req("s", seed=5, top_p=0.9),
            req("k", top_k=4, temperature=0.7), req("u", temperature=1.0)]


@pytest.fixture(scope="module")
def engine(demo_model_dir: str) -> Iterator[HFEngine]:
    eng = HFEngine(demo_model_dir, max_batch=4)
    yield eng
    eng.close()


def decoding(engine: HFEngine) -> None:
    """Submit four requests and step until all four decode (prompts prefilled)."""
    for r in mixed():
        engine.submit(r)
    for _ in range(100):
        engine.step()
        if sum(s.prefilled for s in engine.scheduler.running) == 4:
            return
    raise AssertionError("the prompts were not prefilled in 100 steps")


def finish(engine: HFEngine) -> None:
    while engine.has_work():
        engine.step()


def test_a_decode_step_reads_the_device_once(engine: HFEngine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value that leaves the tensors in a decode step does so through the sampled
    tokens' one `.tolist()` (on CUDA: the step's one host sync), and no tensor is built from a
    Python list (on CUDA: a synchronous copy each)."""
    decoding(engine)
    calls: Counter[str] = Counter()

    def counted(name: str, real):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
    for _ in range(6):
        engine.step()
    monkeypatch.undo()
    assert calls == Counter(tolist=6), calls
    finish(engine)


def test_step_inputs_keep_their_addresses(engine: HFEngine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's input tensors are views of the buffers allocated once (what a CUDA graph
    replays over), step after step, as the batch shrinks."""
    buffers = engine.runner.buffers
    assert buffers is not None
    seen: list[tuple[int, int, int]] = []
    real = engine.runner.forward

    def forward(batch):  # noqa: ANN001, ANN202
        seen.append((batch.input_ids.data_ptr(), batch.positions.data_ptr(),
                     batch.token_rows.data_ptr()))
        return real(batch)

    monkeypatch.setattr(engine.runner, "forward", forward)
    for r in [req("a", max_tokens=3), req("b", max_tokens=9), req("c", max_tokens=6)]:
        engine.submit(r)
    finish(engine)
    dev = buffers.dev
    expected = (dev[0].data_ptr(), dev[1].data_ptr(), dev[2].data_ptr())
    assert len(seen) >= 9 and set(seen) == {expected}


class PendingCopy:
    """A CUDA event stand-in whose copy has not run yet."""

    def __init__(self, order: list[str]):
        self.order = order

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        self.order.append("waited")


def test_the_pinned_buffer_waits_for_a_pending_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    buffers = StepBuffers(8, torch.device("cpu"))
    order: list[str] = []
    buffers.copied = PendingCopy(order)
    real = buffers._fill

    class Fill:  # records the first write into the host buffer
        def __setitem__(self, key, value) -> None:  # noqa: ANN001
            order.append("filled")
            real[key] = value

    monkeypatch.setattr(buffers, "_fill", Fill())
    assert buffers.load([5, 6], [0, 1], [0, 0], None)
    assert order[0] == "waited" and order.count("waited") == 1
    assert buffers.host[0, :2].tolist() == [5, 6]


def test_step_timer_splits_every_step_with_a_forward(engine: HFEngine) -> None:
    timer = StepTimer(engine.device)
    engine.timer = timer
    steps = 0
    try:
        for r in mixed():
            engine.submit(r)
        while engine.has_work():
            engine.step()
            steps += 1
    finally:
        engine.timer = None
    split = timer.summary()
    assert 0 < split["steps"] <= steps
    assert split["forward_ms"] > 0 and split["sampling_ms"] > 0
    total = split["forward_ms"] + split["sampling_ms"] + split["host_ms"]
    assert total == pytest.approx(split["step_ms"], abs=0.01)


def test_cuda_graphs_are_off_by_default(demo_model_dir: str) -> None:
    settings = WorkerSettings(model=demo_model_dir, max_batch=2)
    assert (settings.cuda_graphs, settings.decode_attention) == ("off", "gather")
    engine = make_engine(settings)
    try:
        assert isinstance(engine, HFEngine)
        assert engine.decode_path == "eager" and engine.runner.graphs is None
        assert engine.decode_attention == "gather"
    finally:
        engine.close()


def test_the_gpu_check_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/gpu_check.py --tiny: the script a GPU owner runs, end to end on a CPU (graphs
    through EagerReplay): both decode paths measured, greedy parity, JSON written."""
    from bench import gpu_check

    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(sys, "argv", [
        "gpu_check", "--tiny", "--models", "qwen3-0.6b", "--levels", "1,2", "--new-tokens",
        "4", "--parity-tokens", "3", "--no-cb", "--out", str(out)])
    assert gpu_check.main() == 0
    model = json.loads(out.read_text())["models"]["qwen3-0.6b"]
    engine = model["engine"]
    assert engine["forward"] == "hf" and engine["decode_path_after"] == "cuda-graphs"
    assert [(r["backend"], r["streams"]) for r in engine["runs"]] == [
        ("engine-graphs", 1), ("engine-graphs", 2), ("engine-eager", 1), ("engine-eager", 2)]
    assert all(r["tokens"] == 4 * r["streams"] and r["forward_ms"] > 0 for r in engine["runs"])
    parity = engine["parity"]
    assert parity["identical"] == parity["requests"] == 16
