"""The KV cache's budget: sized once, admission only for what fits (the rest waits in the
engine), a 400 for what never fits, memory handed back when a sequence ends; and the start-up
refusals for settings or models the engine cannot serve."""

from __future__ import annotations

import psutil
import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.kv_cache import KVShape
from chatstream_cluster.worker.engine.kv_pool import PagedKV
from chatstream_cluster.worker.engine.kv_rows import MappedRowsKV
from chatstream_cluster.worker.engine.model_check import UnsupportedModel
from chatstream_cluster.worker.engine_api import GenerationRequest

DEMO_TOKEN_BYTES = 4 * 2 * 256 * 4  # layers x (k, v) x hidden x float32


def req(rid: str, content: str = "hello", **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 40)
    return GenerationRequest(rid, [ChatMessage(role="user", content=content)],
                             SamplingParams(**sampling))


@pytest.mark.parametrize("layout", ["rows", "paged"])
def test_requests_wait_for_kv_and_run_when_it_frees(demo_model_dir: str, layout: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=4, kv_layout=layout,
                      kv_cache_memory=130 * DEMO_TOKEN_BYTES)
    try:
        assert engine.kv.tokens_total == 128  # whole pages / blocks of 16 tokens
        new = 64 - len(engine.render(req("p"))[0])  # each reserves 64 tokens: two fit at once
        for i in range(3):
            engine.submit(req(f"r{i}", max_tokens=new))
        finished, most_running, waited = [], 0, False
        while engine.has_work():
            for out in engine.step():
                if out.finish_reason:
                    assert out.finish_reason == "length" and out.tokens == new
                    finished.append(out.request_id)
            most_running = max(most_running, engine.running)
            load = engine.load()
            assert load.kv_tokens_used <= load.kv_tokens_total == 128
            waited = waited or (load.waiting == 1 and load.kv_tokens_used == 128)
        assert most_running == 2 and waited
        assert sorted(finished) == ["r0", "r1", "r2"] and finished[-1] == "r2"
        assert engine.load().kv_tokens_used == 0
    finally:
        engine.close()


def test_default_max_model_len_is_clamped_to_the_cache(demo_model_dir: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=2, kv_cache_memory=100 * DEMO_TOKEN_BYTES)
    try:
        assert engine.max_context == 96  # the model's 2048 does not fit; whole pages
        engine.submit(req("long", "x" * 150))
        engine.submit(req("ok", max_tokens=200))
        outs = {}
        while engine.has_work():
            outs.update({o.request_id: o for o in engine.step() if o.finish_reason})
        error = outs["long"].error
        assert error.code == "context_length_exceeded" and error.status == 400
        assert error.message == (
            f"prompt is {outs['long'].prompt_tokens} tokens but the model's context is 96 tokens"
        )
        assert outs["ok"].finish_reason == "length"  # stops where the context ends
        assert outs["ok"].prompt_tokens + outs["ok"].tokens == 96
    finally:
        engine.close()


def test_settings_that_cannot_be_served_are_refused_at_start(demo_model_dir: str) -> None:
    with pytest.raises(UnsupportedModel, match="longer than the model's context"):
        HFEngine(demo_model_dir, max_model_len=4096)
    with pytest.raises(UnsupportedModel, match="--max-model-len 1024 needs"):
        HFEngine(demo_model_dir, max_model_len=1024, kv_cache_memory=200 * DEMO_TOKEN_BYTES)


def test_rows_layout_hands_pages_back_when_a_sequence_ends() -> None:
    shapes = [KVShape(8, 128)] * 2
    kv = MappedRowsKV(shapes, torch.float32, max_batch=4, max_len=4096, tokens=16384)
    process = psutil.Process()
    try:
        before = process.memory_info().rss
        kv.reserve(1, 4096)
        for cache in (*kv.k, *kv.v):
            cache[1].fill_(1.0)  # write a whole row: 4 x 16 MiB
        grown = process.memory_info().rss - before
        assert grown > 50 * 2**20
        kv.release(1)
        assert process.memory_info().rss - before < grown / 4
        assert float(kv.k[0][1].abs().sum()) == 0.0  # the pages were dropped
        assert kv.tokens_used == 0
    finally:
        kv.close()


def test_paged_blocks_come_back_and_tables_stay_put() -> None:
    kv = PagedKV([KVShape(2, 8)], torch.float32, torch.device("cpu"), max_batch=3,
                 max_len=64, tokens=96)
    table = kv.block_tables
    pool = kv.k[0].data_ptr()
    assert kv.tokens_total == 96 and kv.num_blocks == 8  # 6 blocks of 16 + null + scratch
    kv.reserve(0, 40)  # 3 blocks
    kv.reserve(1, 48)  # 3 blocks
    assert kv.tokens_used == 96 and not kv.fits(1)
    assert set(table[0, :3].tolist()).isdisjoint(table[1, :3].tolist())
    assert 0 not in table[0, :3].tolist() and table[0, 3:].tolist() == [0]
    blocks_of_1 = table[1].tolist()
    kv.release(0)
    kv.move_row(1, 0, 48)
    assert table[0].tolist() == blocks_of_1 and table[1].tolist() == [0, 0, 0, 0]
    assert kv.fits(48) and not kv.fits(49)
    assert kv.block_tables is table and kv.k[0].data_ptr() == pool  # nothing moved
    # Who holds each block, and where in its table: what flex decode reads the pool by.
    owner, index = kv.block_owner.tolist(), kv.block_index.tolist()
    assert [owner[b] for b in blocks_of_1[:3]] == [0, 0, 0]
    assert [index[b] for b in blocks_of_1[:3]] == [0, 1, 2]
    assert owner.count(-1) == 8 - 3 - 1  # the free blocks and the null block
    assert owner[kv.scratch_block] == kv.scratch_row == 3  # padding rows write there
    assert table[kv.scratch_row].tolist() == [kv.scratch_block] * 4


def test_cuda_budget_is_what_utilization_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's rule, with the device's numbers faked: total x utilization, minus the profiled
    peak (weights and activations) and what torch does not account for."""
    from chatstream_cluster.worker.engine import sizing

    gib = 2**30
    fake = {
        "empty_cache": lambda: None, "reset_peak_memory_stats": lambda d: None,
        "synchronize": lambda d: None, "max_memory_allocated": lambda d: 6 * gib,
        "mem_get_info": lambda d: (70 * gib, 80 * gib), "memory_reserved": lambda d: 8 * gib,
    }
    for name, func in fake.items():
        monkeypatch.setattr(torch.cuda, name, func)
    profiled = []
    budget = sizing.cuda_budget(torch.device("cuda", 0), 0.9, lambda: profiled.append(1))
    assert profiled == [1]
    assert budget == int(80 * gib * 0.9) - 6 * gib - 2 * gib  # 2 GiB used outside torch
