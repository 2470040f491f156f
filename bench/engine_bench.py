"""Engine-only benchmark: tokens/s and time to first token, one at a time vs all at once.

`python -m bench.engine_bench` prints a table. `run_engine_bench(..., backend="cb")` runs the
same scenarios on transformers' continuous batching instead of HFEngine, for comparison.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams

PROMPT = [ChatMessage(role="user", content="Tell me a long story about a cat and a dog.")]


def run_engine_bench(
    model: str = "demo",
    new_tokens: int = 128,
    concurrency: tuple[int, ...] = (1, 16),
    device: str = "cpu",
    backend: str = "own",
    cache_dir: str | None = None,
    threads: int = 0,
    dtype: str = "auto",
    sequential_requests: int = 0,
) -> list[dict[str, Any]]:
    """Per concurrency c: c requests one at a time ("sequential") and all at once ("batched").

    `threads`: torch CPU threads; 0 = what a worker would use (`--torch-threads` auto).
    `sequential_requests`: run only this many of the one-at-a-time requests (0 = c); the
    rate is per request, so a few are enough on a slow device.
    """
    threads = threads or _worker_threads(device)
    runner = _OwnRunner(model, device, max(concurrency), cache_dir, threads, dtype)
    if backend == "cb":
        runner = _CBRunner(runner.engine, max(concurrency))
    runner.run(max(concurrency), min(new_tokens, 16))  # warm-up: lazy init, KV rows, kernels
    runner.run(1, new_tokens)  # and one full-length stream: KV growth, batch-1 kernels, clocks
    rows = []
    for c in concurrency:
        modes = ("sequential", "batched") if c > 1 else ("batched",)
        for mode in modes:
            start = time.perf_counter()
            ttfts: list[float] = []
            tokens = 0
            repeats = min(c, sequential_requests or c) if mode == "sequential" else 1
            for _ in range(repeats):
                t, f = runner.run(1 if mode == "sequential" else c, new_tokens)
                tokens += t
                ttfts += f
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "backend": backend,
                    "threads": threads,
                    "mode": mode,
                    "concurrency": c,
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
                    "ttft_p99_ms": round(_percentile(ttfts, 0.99) * 1000, 1),
                }
            )
    runner.close()
    return rows


def _worker_threads(device: str) -> int:
    from chatstream_cluster.shared.settings import WorkerSettings
    from chatstream_cluster.worker.factory import torch_threads

    return torch_threads(WorkerSettings(device=device))


class _OwnRunner:
    def __init__(
        self,
        model: str,
        device: str,
        max_batch: int,
        cache_dir: str | None,
        threads: int = 0,
        dtype: str = "auto",
    ):
        from chatstream_cluster.worker.engine import HFEngine

        self.engine = HFEngine(
            model, device=device, max_batch=max_batch, cache_dir=cache_dir, threads=threads,
            dtype=dtype,
        )

    def run(self, n: int, new_tokens: int) -> tuple[int, list[float]]:
        """Submit n requests at once and step until all finish: (tokens, TTFTs)."""
        from chatstream_cluster.worker.engine_api import GenerationRequest

        sampling = SamplingParams(max_tokens=new_tokens, temperature=0.8, top_p=0.95)
        start = time.perf_counter()
        first: dict[str, float] = {}
        tokens = 0
        for _ in range(n):
            self.engine.submit(GenerationRequest(uuid.uuid4().hex, PROMPT, sampling))
        while self.engine.has_work():
            for out in self.engine.step():
                first.setdefault(out.request_id, time.perf_counter() - start)
                if out.finish_reason:
                    tokens += out.tokens
        return tokens, list(first.values())

    def close(self) -> None:
        self.engine.close()


class _CBRunner:
    """The same scenarios through `model.init_continuous_batching` (its own thread)."""

    def __init__(self, engine: Any, max_batch: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = engine.model
        self.ids = engine.render(_request())[0]
        overrides = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
        config = GenerationConfig(**{**model.generation_config.to_dict(), **overrides})
        cb = ContinuousBatchingConfig(
            num_blocks=max(16, max_batch * 4),
            page_size=64,
            max_batch_tokens=512,
            per_request_processors=True,
        )
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb
        )
        self.manager.start()

    def run(self, n: int, new_tokens: int) -> tuple[int, list[float]]:
        return cb_round(self.manager, self.ids, n, new_tokens)

    def close(self) -> None:
        self.manager.stop(block=True)


def cb_round(manager: Any, prompt_ids: list[int], n: int, new_tokens: int,
             timeout: float = 30) -> tuple[int, list[float]]:
    """`n` requests at once through a started continuous-batching manager, to the end: the
    tokens generated and each request's time to first token (seconds)."""
    start = time.perf_counter()
    for _ in range(n):
        manager.add_request(prompt_ids, request_id=uuid.uuid4().hex, max_new_tokens=new_tokens,
                            streaming=True)
    first: dict[str, float] = {}
    done, tokens = 0, 0
    while done < n:
        out = manager.get_result(timeout=timeout)
        if out is None:
            raise RuntimeError(f"continuous batching produced nothing for {timeout:g} s")
        first.setdefault(out.request_id, time.perf_counter() - start)
        if out.is_finished():
            done += 1
            tokens += len(out.generated_tokens)
    return tokens, list(first.values())


def _request():
    from chatstream_cluster.worker.engine_api import GenerationRequest

    return GenerationRequest("bench", PROMPT, SamplingParams())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table."""
    cols = [
        "backend",
        "threads",
        "mode",
        "concurrency",
        "tokens",
        "tokens_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
    ]
    lines = ["  ".join(f"{c:>13}" for c in cols)]
    for row in rows:
        lines.append("  ".join(f"{row[c]!s:>13}" for c in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--backend", default="own", choices=["own", "cb", "both"])
    parser.add_argument("--threads", type=int, default=0, help="0 = the worker's auto choice")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    levels = tuple(int(c) for c in args.concurrency.split(","))
    backends = ["own", "cb"] if args.backend == "both" else [args.backend]
    results = []
    for name in backends:
        results += run_engine_bench(
            args.model, args.new_tokens, levels, args.device, name, threads=args.threads,
            dtype=args.dtype,
        )
    print(format_table(results))
