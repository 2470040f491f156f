"""HFEngine on CUDA (skipped without a GPU): greedy text equals the CPU's, `--device cuda:N`
pins GPU N, sampling and seeds work, bf16 by default.

Self-contained (no conftest fixtures, no Redis), so a GPU machine without the cluster's
dependencies runs it with `pytest --noconftest tests/worker/test_cuda.py` (bench/gpu_check.sh).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.demo_model import build_demo_model
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine_api import GenerationRequest
from chatstream_cluster.worker.factory import make_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["hello", "the same prompt", "a third, longer prompt for the batch"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_demo_model(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def cuda_engine(model_dir: str) -> Iterator[HFEngine]:
    engine = HFEngine(model_dir, device="cuda:0", max_batch=8)
    yield engine
    engine.close()


def req(rid: str, content: str, **sampling) -> GenerationRequest:
    return GenerationRequest(
        rid, [ChatMessage(role="user", content=content)], SamplingParams(**sampling)
    )


def run(engine: HFEngine, *requests: GenerationRequest) -> dict[str, str]:
    for r in requests:
        engine.submit(r)
    texts = {r.request_id: "" for r in requests}
    finished: dict[str, int] = {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
            if out.finish_reason:
                finished[out.request_id] = out.tokens
    assert set(finished) == set(texts)
    return texts


def greedy(engine: HFEngine) -> dict[str, str]:
    return run(engine, *[req(p, p, temperature=0, max_tokens=24) for p in PROMPTS])


def test_greedy_on_cuda_float32_equals_cpu(model_dir: str) -> None:
    cpu = HFEngine(model_dir, device="cpu", max_batch=8)
    gpu = HFEngine(model_dir, device="cuda:0", max_batch=8, dtype="float32")
    try:
        assert gpu.fast_forward and gpu.model.dtype == torch.float32
        assert greedy(gpu) == greedy(cpu)
    finally:
        cpu.close()
        gpu.close()


def test_bfloat16_by_default_and_printable(cuda_engine: HFEngine) -> None:
    assert cuda_engine.model.dtype == torch.bfloat16 and cuda_engine.fast_forward
    texts = greedy(cuda_engine)
    for text in texts.values():
        assert len(text) == 24 and all(c.isprintable() or c == "\n" for c in text)
    assert greedy(cuda_engine) == texts  # deterministic


def test_per_request_sampling_and_seeds_in_one_batch(cuda_engine: HFEngine) -> None:
    res = run(
        cuda_engine,
        req("s1", "seed", seed=42, max_tokens=20, top_p=0.9),
        req("s2", "seed", seed=42, max_tokens=20, top_p=0.9),
        req("k", "top k", top_k=3, temperature=0.7, max_tokens=20),
        req("g", "greedy", temperature=0, max_tokens=7),
    )
    assert res["s1"] == res["s2"] and len(res["s1"]) == 20
    assert len(res["g"]) == 7


@pytest.mark.parametrize("index", range(torch.cuda.device_count() or 1))
def test_device_index_pins_that_gpu(model_dir: str, index: int) -> None:
    engine = HFEngine(model_dir, device=f"cuda:{index}", max_batch=2)
    try:
        device = torch.device("cuda", index)
        assert {p.device for p in engine.model.parameters()} == {device}
        assert torch.cuda.current_device() == index
        run(engine, req("r", "pinned", max_tokens=4))
        assert {t.device for t in (*engine.kv.k, *engine.kv.v)} == {device}
        assert engine.kv.block_tables.device == device
    finally:
        engine.close()


def test_kv_cache_is_paged_and_sized_from_device_memory(model_dir: str) -> None:
    engine = HFEngine(model_dir, device="cuda:0", max_batch=4, gpu_memory_utilization=0.3)
    try:
        assert engine.kv.layout == "paged"
        free, total = torch.cuda.mem_get_info(0)
        kv_bytes = sum(t.numel() * t.element_size() for t in (*engine.kv.k, *engine.kv.v))
        assert 0 < kv_bytes <= 0.3 * total
        assert engine.max_context == 2048  # the demo's context fits
        texts = run(engine, req("a", "paged", temperature=0, max_tokens=8))
        assert len(texts["a"]) == 8
    finally:
        engine.close()


def test_worker_settings_device_reach_the_engine(model_dir: str) -> None:
    engine = make_engine(WorkerSettings(model=model_dir, device="cuda:0", max_batch=2))
    try:
        assert isinstance(engine, HFEngine) and engine.threads == 0  # torch's default on CUDA
        assert {p.device for p in engine.model.parameters()} == {torch.device("cuda", 0)}
    finally:
        engine.close()
