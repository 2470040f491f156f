"""Prefill stall benchmark: do running streams keep their pace while a long prompt arrives?

The demo model on CPU through the engine alone (the Engine protocol, so it runs on any
version of the engine): 8 streams decode; once they are steady, one 2,000-token prompt is
submitted. Reported, per round:

- `gap_median_ms`: the 8 streams' median inter-token gap before the long prompt (steady);
- `gap_p99_ms` / `gap_max_ms`: their gaps while the long prompt waits for its first token
  (from its submit to its first token), and `gap_p99_x` = gap_p99_ms / gap_median_ms
  (goal: under 3);
- `ttft_ms`: the long prompt's time to first token there, `lone_ttft_ms` the same prompt's
  on an idle engine, and `ttft_x` their ratio (goal: within 1.5).

`python -m bench --scenarios stall` prints it; `python -m bench.stall [CHUNK]` too, CHUNK being
a fixed `--prefill-chunk-tokens` to compare with the adaptive default.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams

STREAMS = 8
LONG_TOKENS = 2000
WARM_STEPS = 40


def run_stall_bench(
    model: str = "demo", rounds: int = 3, threads: int = 0, chunk: int = 0
) -> list[dict[str, Any]]:
    """`rounds` measurements with one engine (after a warm-up round); `chunk`: a fixed
    `--prefill-chunk-tokens` (0 = the engine's default)."""
    from bench.engine_bench import _worker_threads
    from chatstream_cluster.worker.engine import HFEngine

    threads = threads or _worker_threads("cpu")
    extra = {"prefill_chunk_tokens": chunk} if chunk else {}
    engine = HFEngine(model, device="cpu", max_batch=16, threads=threads, **extra)
    try:
        long_prompt = _long_prompt(engine)
        _one_round(engine, long_prompt)  # warm-up: lazy init, first long prefill
        rows = []
        for _ in range(rounds):
            lone = _lone_ttft(engine, long_prompt)
            row = _one_round(engine, long_prompt)
            row["lone_ttft_ms"] = round(lone * 1000, 1)
            row["ttft_x"] = round(row["ttft_ms"] / row["lone_ttft_ms"], 2)
            rows.append({"scenario": "stall", "threads": threads, "chunk": chunk or "auto", **row})
        return rows
    finally:
        engine.close()


def _request(content: str, max_tokens: int) -> Any:
    from chatstream_cluster.worker.engine_api import GenerationRequest

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95)
    return GenerationRequest(uuid.uuid4().hex, [ChatMessage(role="user", content=content)],
                             sampling)


def _long_prompt(engine: Any) -> str:
    """Content whose rendered prompt is LONG_TOKENS tokens (the demo: a byte per token)."""
    base = len(engine.render(_request("", 1))[0])
    text = "the quick brown fox jumps over the lazy dog. " * 100
    return text[: LONG_TOKENS - base]


def _drain(engine: Any) -> None:
    while engine.has_work():
        engine.step()


def _lone_ttft(engine: Any, content: str) -> float:
    request = _request(content, 4)
    start = time.perf_counter()
    engine.submit(request)
    first = None
    while engine.has_work():
        for out in engine.step():
            if out.request_id == request.request_id and first is None:
                first = time.perf_counter() - start
    return first


def _one_round(engine: Any, content: str) -> dict[str, Any]:
    streams = [_request(f"stream {i}: tell me a story", 2000) for i in range(STREAMS)]
    ids = {r.request_id for r in streams}
    for r in streams:
        engine.submit(r)
    last: dict[str, float] = {}
    steady: list[float] = []
    while len(last) < STREAMS:  # until every stream has its first token
        now_outs = engine.step()
        now = time.perf_counter()
        for out in now_outs:
            last[out.request_id] = now
    for _ in range(WARM_STEPS):
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id in ids:
                steady.append(now - last[out.request_id])
                last[out.request_id] = now
    long = _request(content, 4)
    submitted = time.perf_counter()
    engine.submit(long)
    window: list[float] = []
    ttft = None
    while ttft is None:
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id == long.request_id:
                ttft = now - submitted
            elif out.request_id in ids:
                window.append(now - last[out.request_id])
                last[out.request_id] = now
    for r in streams:
        engine.cancel(r.request_id)
    _drain(engine)
    median = statistics.median(steady)
    p99 = _percentile(window, 0.99)
    return {
        "gap_median_ms": round(median * 1000, 1),
        "gap_p99_ms": round(p99 * 1000, 1),
        "gap_max_ms": round(max(window) * 1000, 1),
        "gap_p99_x": round(p99 / median, 2),
        "ttft_ms": round(ttft * 1000, 1),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    import sys

    from bench.__main__ import format_rows

    print(format_rows(run_stall_bench(chunk=int(sys.argv[1]) if len(sys.argv) > 1 else 0)))
