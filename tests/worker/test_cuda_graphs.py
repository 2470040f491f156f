"""CUDA-graph decode (worker/engine/cuda_graphs.py) without a GPU: the buckets, and the whole
machinery around the graphs (padding to a bucket, the scratch row, static batches, the first
replay's check, the fallbacks) run through `EagerReplay`, which replays a "captured" step by
running it again on the same static batch. tests/worker/test_cuda.py checks real graphs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.cuda_graphs import (
    EagerReplay,
    batch_buckets,
    length_buckets,
    smallest_at_least,
)
from chatstream_cluster.worker.engine_api import GenerationRequest

LONG = "a prompt that runs past the first KV-length bucket of 256 tokens. " * 4


def req(rid: str, content: str, **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 24)
    return GenerationRequest(rid, [ChatMessage(role="user", content=content)],
                             SamplingParams(**sampling))


def requests() -> list[GenerationRequest]:
    """Three at once (padded to 4), finishing at different steps (buckets 2 and 1 follow),
    one of them past 256 tokens of context, greedy and seeded."""
    return [
        req("g", "greedy", temperature=0, max_tokens=30),
        req("s", "seeded", seed=3, top_p=0.9, max_tokens=12),
        req("l", LONG, temperature=0, max_tokens=20),
    ]


def run(engine: HFEngine, batch: list[GenerationRequest]) -> dict[str, str]:
    for r in batch:
        engine.submit(r)
    texts = {r.request_id: "" for r in batch}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None
            texts[out.request_id] += out.text
    return texts


@pytest.fixture(scope="module")
def expected(demo_model_dir: str) -> dict[str, str]:
    engine = HFEngine(demo_model_dir, max_batch=4, kv_layout="paged")
    try:
        return run(engine, requests())
    finally:
        engine.close()


def graph_engine(path: str, capture=None, **kwargs) -> HFEngine:  # noqa: ANN001
    return HFEngine(path, max_batch=4, kv_layout="paged", cuda_graphs="on",
                    graph_capture=capture or EagerReplay(), **kwargs)


@pytest.fixture(scope="module")
def graphed(demo_model_dir: str) -> Iterator[HFEngine]:
    engine = graph_engine(demo_model_dir)
    yield engine
    engine.close()


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(300) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 300]
    assert batch_buckets(3) == [1, 2, 3] and batch_buckets(1) == [1]
    assert length_buckets(2048, 16) == [256, 512, 1024, 2048]
    assert length_buckets(1000, 16) == [256, 512, 1008] and length_buckets(100, 16) == [112]
    assert smallest_at_least([1, 2, 4], 3) == 4 and smallest_at_least([1, 2, 4], 5) is None


def test_graph_replays_give_the_eager_text(graphed: HFEngine, expected: dict[str, str]) -> None:
    graphs = graphed.runner.graphs
    capture = graphs.capture
    assert graphed.decode_path == "cuda-graphs" and graphs.path == "fast"
    assert capture.captured == 3 * 4  # batch buckets 1, 2, 4 x KV lengths 256 ... 2048
    assert run(graphed, requests()) == expected
    # Padded (3 -> 4, then 2 and 1 as sequences finish), in two KV-length buckets (the long
    # prompt needs 512; "g", the last alone, 256).
    assert {(4, 512), (2, 512), (1, 256)} <= graphs.verified
    assert capture.replays >= 25 and graphed.decode_path == "cuda-graphs"  # ~ every decode


def test_padding_rows_write_only_the_scratch_block(graphed: HFEngine) -> None:
    kv = graphed.kv
    for cache in (*kv.k, *kv.v):
        cache.zero_()
    run(graphed, [req("a", "x", temperature=0, max_tokens=6),
                  req("b", "y", temperature=0, max_tokens=6),
                  req("c", "z", temperature=0, max_tokens=6)])  # padded to 4 every step
    block = kv.block_size
    scratch = kv.scratch_block * block
    for cache in kv.k:
        assert cache[scratch].abs().sum() > 0  # the padding row's keys went there
        assert cache[scratch + 1 : scratch + block].abs().sum() == 0  # position 0 only
        assert cache[:block].abs().sum() == 0  # the null block stays zero


def test_the_models_own_code_is_captured_too(demo_model_dir: str,
                                              expected: dict[str, str]) -> None:
    engine = graph_engine(demo_model_dir, fast_forward=False)
    try:
        assert engine.runner.graphs.path == "hf" and engine.decode_path == "cuda-graphs"
        assert run(engine, requests()) == expected
        assert engine.runner.graphs.verified
    finally:
        engine.close()


def test_a_failed_capture_falls_back_to_eager(demo_model_dir: str, expected: dict[str, str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    def failing(step):  # noqa: ANN001, ANN202
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="chatstream.worker"):
        engine = graph_engine(demo_model_dir, capture=failing)
    try:
        assert engine.decode_path == "eager"
        assert "capture failed" in engine.runner.graphs.reason
        assert any("CUDA graphs off" in r.message for r in caplog.records)
        assert run(engine, requests()) == expected
    finally:
        engine.close()


def test_a_replay_that_differs_from_eager_falls_back(demo_model_dir: str,
                                                     expected: dict[str, str]) -> None:
    def wrong(step):  # noqa: ANN001, ANN202
        step()
        return lambda: step() * 0.5  # logits off: a graph that captured stale inputs

    engine = graph_engine(demo_model_dir, capture=wrong)
    try:
        assert engine.decode_path == "cuda-graphs"
        assert run(engine, requests()) == expected  # the failed replay's step used eager
        assert engine.decode_path == "eager" and "differs from the eager" in \
            engine.runner.graphs.reason
    finally:
        engine.close()


def test_graphs_need_cuda_and_the_paged_layout(demo_model_dir: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=2, cuda_graphs="on")  # CPU, no capture given
    try:
        assert engine.decode_path == "eager" and engine.runner.graphs is None
        assert torch.device("cpu") == engine.device
    finally:
        engine.close()
