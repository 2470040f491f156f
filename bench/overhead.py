"""Engine overhead: where a step's time goes, with a model whose forward is cheap (~1 ms).

`python -m bench --scenarios overhead`: a tiny Llama built from a config (hidden 64, 2 layers,
the demo's byte tokenizer; random weights, no download) in HFEngine as a worker runs it, at 1,
16 and 64 concurrent requests of 128 new tokens (temperature 0.8, top-p 0.95). The engine's
StepTimer (worker/engine/step_timer.py) splits each step into forward, sampling and host (the
rest: scheduling, building the batch, detokenizing, outputs). `overhead_pct` is everything
but the forward, in percent of the step: the engine's own cost per step, which must stay
small next to a forward for a GPU's fast forwards to turn into tokens/s.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from chatstream_cluster.shared.schemas import SamplingParams

TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
}


def build_tiny(folder: Path, shape: dict[str, int] | None = None) -> str:
    """Save a random Llama of `shape` (default TINY) with the demo tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatstream_cluster.worker.demo_model import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    config = LlamaConfig(**(shape or TINY), vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    save_with_demo_tokenizer(LlamaForCausalLM(config).eval(), folder)
    return str(folder)


def save_with_demo_tokenizer(model: Any, folder: Path) -> None:
    """Save `model` with the demo's byte tokenizer and a generation config that suppresses
    every id the tokenizer lacks (and its non-printable bytes), so replies are printable and
    run to max_tokens whatever the model's vocabulary size."""
    from transformers import GenerationConfig

    from chatstream_cluster.worker.demo_model import (
        BOS_ID,
        EOS_ID,
        PAD_ID,
        VOCAB_SIZE,
        build_demo_tokenizer,
        demo_suppressed_tokens,
    )

    vocab = model.config.vocab_size
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        suppress_tokens=demo_suppressed_tokens() + list(range(VOCAB_SIZE, vocab)),
    )
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)


def measure(engine: Any, streams: int, new_tokens: int,
            sampling: SamplingParams | None = None,
            prompts: list[str] | None = None) -> dict[str, Any]:
    """Run `streams` requests at once to the end: tokens/s, TTFT p50 and the step split over
    all their steps; `texts` (request id -> text) for parity checks. Default sampling:
    temperature 0.8, top-p 0.95; `prompts` (cycled) default to bench.engine_bench's."""
    from bench.engine_bench import PROMPT
    from chatstream_cluster.shared.schemas import ChatMessage
    from chatstream_cluster.worker.engine.step_timer import StepTimer
    from chatstream_cluster.worker.engine_api import GenerationRequest

    sampling = sampling or SamplingParams(max_tokens=new_tokens, temperature=0.8, top_p=0.95)
    timer = StepTimer(engine.device)
    engine.timer = timer
    texts: dict[str, str] = {}
    first: dict[str, float] = {}
    tokens = 0
    start = time.perf_counter()
    try:
        for i in range(streams):
            rid = f"{uuid.uuid4().hex[:8]}-{i}"
            messages = ([ChatMessage(role="user", content=prompts[i % len(prompts)])]
                        if prompts else PROMPT)
            engine.submit(GenerationRequest(rid, messages, sampling))
            texts[rid] = ""
        while engine.has_work():
            for out in engine.step():
                first.setdefault(out.request_id, time.perf_counter() - start)
                texts[out.request_id] += out.text
                if out.finish_reason:
                    tokens += out.tokens
    finally:
        engine.timer = None
    seconds = time.perf_counter() - start
    split = timer.summary()
    overhead = 100 * (1 - split["forward_ms"] / split["step_ms"]) if split["step_ms"] else 0
    return {"streams": streams, "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(1000 * statistics.median(first.values()), 1), **split,
            "overhead_pct": round(overhead, 1), "texts": list(texts.values())}


def run_overhead_bench(new_tokens: int = 128, levels: tuple[int, ...] = (1, 16, 64),
                       rounds: int = 3, model: str = "") -> list[dict[str, Any]]:
    """Per concurrency level, the round with the median step time."""
    from bench.engine_bench import _worker_threads
    from chatstream_cluster.worker.engine import HFEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = model or build_tiny(Path(tmp) / "tiny-llama")
        engine = HFEngine(path, max_batch=max(levels), threads=_worker_threads("cpu"))
        try:
            measure(engine, max(levels), 16)  # warm-up: lazy init, kernels, KV pages
            rows = []
            for streams in levels:
                runs = sorted((measure(engine, streams, new_tokens) for _ in range(rounds)),
                              key=lambda r: r["step_ms"])
                median = runs[len(runs) // 2]
                del median["texts"]
                rows.append({"scenario": "overhead", **median})
            return rows
        finally:
            engine.close()


if __name__ == "__main__":
    from bench.__main__ import format_rows

    print(format_rows(run_overhead_bench()))
