"""Decode attention in place over the paged pool (worker/engine/flex_decode.py) against the
gather path: the same outputs for rows out of order, rows with gaps, sliding windows, soft
caps and a CUDA graph's padding rows; compiled (inductor honours the block list, so a block
missing from it would show) and not; in the engine, the same text, with and without graphs,
and the gather path whenever flex cannot be used."""

from __future__ import annotations

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.engine import HFEngine, attention
from chatstream_cluster.worker.engine.batch import build_batch
from chatstream_cluster.worker.engine.cuda_graphs import EagerReplay
from chatstream_cluster.worker.engine.flex_decode import FlexDecode
from chatstream_cluster.worker.engine.kv_cache import KVShape
from chatstream_cluster.worker.engine.kv_pool import PagedKV
from chatstream_cluster.worker.engine_api import GenerationRequest

CPU = torch.device("cpu")
LENGTHS = [5, 40, 17, 100, 64]  # tokens cached per row
DECODING = [3, 0, 4, 1]  # rows decoding this step, out of order; row 2 does not


def pool() -> PagedKV:
    torch.manual_seed(0)
    kv = PagedKV([KVShape(2, 16)], torch.float32, CPU, max_batch=6, max_len=128, tokens=600)
    for row, length in enumerate(LENGTHS):
        kv.reserve(row, length + 10)
    for cache in (*kv.k, *kv.v):
        cache.normal_()
    return kv


def both(kv: PagedKV, flex: FlexDecode, decodes: list[tuple[int, int, int]],
         window: int | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, flex) outputs for the same queries."""
    q = torch.randn(len(decodes), 4, 16)
    out = []
    for mode in (None, flex):
        kv.flex = mode
        batch = build_batch(decodes, [], [], CPU)
        kv.prepare(batch)
        out.append(attention._decode(kv, 0, q, batch, 0.25, window, softcap))
    return out[0], out[1]


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (20, None), (None, 30.0)])
def test_flex_equals_gather(window: int | None, softcap: float | None) -> None:
    kv = pool()
    decodes = [(row, LENGTHS[row] - 1, 0) for row in DECODING]
    gather, flex = both(kv, FlexDecode(kv, compiled=False), decodes, window, softcap)
    assert torch.allclose(gather, flex, atol=1e-5)


def test_graph_padding_rows_read_only_the_scratch_block() -> None:
    kv = pool()
    pad = [(kv.scratch_row, 0, 0)] * 3  # what a bucket of 8 adds to 5 decodes
    decodes = [(row, LENGTHS[row] - 1, 0) for row in range(5)] + pad
    gather, flex = both(kv, FlexDecode(kv, compiled=False), decodes, None, None)
    assert torch.allclose(gather, flex, atol=1e-5)
    assert torch.isfinite(flex).all()


@pytest.mark.timeout(600)
def test_compiled_flex_reads_every_block_it_needs() -> None:
    """torch.compile's CPU kernel visits only the blocks the mask lists (as Triton does on a
    GPU), so this checks the block lists; the uncompiled reference masks the whole pool."""
    kv = pool()
    flex = FlexDecode(kv, compiled=False)
    flex.attention = torch.compile(flex.attention)
    decodes = [(row, LENGTHS[row] - 1, 0) for row in DECODING]
    gather, compiled = both(kv, flex, decodes, 20, None)
    assert torch.allclose(gather, compiled, atol=1e-5)


def req(rid: str, content: str, **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 20)
    return GenerationRequest(rid, [ChatMessage(role="user", content=content)],
                             SamplingParams(**sampling))


def run(engine: HFEngine) -> dict[str, str]:
    batch = [req("g", "greedy", temperature=0, max_tokens=12),
             req("s", "seeded", seed=5, top_k=20, max_tokens=8),
             req("l", "a longer prompt, more than a block of sixteen tokens", temperature=0,
                 max_tokens=5)]
    for r in batch:
        engine.submit(r)
    texts = {r.request_id: "" for r in batch}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
    return texts


SMALL_POOL = 512 * 4 * 2 * 256 * 4  # 512 tokens of the demo model: uncompiled flex scores all


def test_the_engine_writes_the_same_text_with_flex(demo_model_dir: str) -> None:
    texts = []
    for attention_kind, graphs in (("gather", "off"), ("flex", "off"), ("flex", "on")):
        engine = HFEngine(demo_model_dir, max_batch=4, kv_layout="paged",
                          kv_cache_memory=SMALL_POOL, decode_attention=attention_kind,
                          cuda_graphs=graphs, graph_capture=EagerReplay())
        try:
            assert engine.decode_attention == attention_kind
            if graphs == "on":  # flex reads each sequence's blocks: one KV length
                assert engine.runner.graphs.lengths == [engine.max_context]
            texts.append(run(engine))
        finally:
            engine.close()
    assert texts[0] == texts[1] == texts[2]


def test_flex_falls_back_to_gather(demo_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = HFEngine(demo_model_dir, max_batch=2, kv_layout="rows", decode_attention="flex")
    try:
        assert rows.decode_attention == "gather"  # flex reads the paged pool only
    finally:
        rows.close()
    monkeypatch.setattr(FlexDecode, "attend", lambda self, layer, q, *a: q * 0)  # wrong
    engine = HFEngine(demo_model_dir, max_batch=2, kv_layout="paged",
                      kv_cache_memory=SMALL_POOL, decode_attention="flex")
    try:
        assert engine.decode_attention == "gather"  # its self-check failed
        assert engine.kv.flex is None
    finally:
        engine.close()
