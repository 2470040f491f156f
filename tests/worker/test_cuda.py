"""HFEngine on CUDA (skipped without a GPU): greedy text equals the CPU's, `--device cuda:N`
pins GPU N, sampling and seeds work, bf16 by default; CUDA graphs (both forwards) and flex
decode attention give the eager text, the counter-based draw is the same on the GPU, and a
decode step syncs with the host once.

Self-contained (no conftest fixtures, no Redis), so a GPU machine without the cluster's
dependencies runs it with `pytest --noconftest tests/worker/test_cuda.py` (bench/gpu_check.sh).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.demo_model import build_demo_model
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.sampling import BELOW_ONE, draw_uniform, uniform_reference
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


def mixed_requests() -> list[GenerationRequest]:
    """Five at once (graphs pad them to 8), finishing at different steps, greedy and seeded."""
    greedy = [req(f"g{i}", p, temperature=0, max_tokens=20 + 6 * i)
              for i, p in enumerate(PROMPTS)]
    return [*greedy, req("s", "seeded", seed=9, top_p=0.9, max_tokens=24),
            req("k", "top k", seed=4, top_k=5, temperature=0.7, max_tokens=16)]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "models-own-code"])
def test_cuda_graphs_give_the_eager_text(model_dir: str, fast: bool) -> None:
    """float32, so padding to a bucket cannot flip a token: graph replays equal eager."""
    eager = HFEngine(model_dir, device="cuda:0", max_batch=8, dtype="float32",
                     kv_layout="paged", fast_forward=fast)
    graphed = HFEngine(model_dir, device="cuda:0", max_batch=8, dtype="float32",
                       kv_layout="paged", fast_forward=fast, cuda_graphs="on")
    try:
        assert graphed.decode_path == "cuda-graphs", graphed.runner.graphs.reason
        assert graphed.runner.graphs.path == ("fast" if fast else "hf")
        assert run(graphed, *mixed_requests()) == run(eager, *mixed_requests())
        assert graphed.decode_path == "cuda-graphs"  # every first replay matched
        assert len(graphed.runner.graphs.verified) >= 3
    finally:
        eager.close()
        graphed.close()


def test_cuda_graphs_in_bfloat16_stay_on(model_dir: str) -> None:
    """bf16 (the default): every first replay within the self-check's tolerance."""
    engine = HFEngine(model_dir, device="cuda:0", max_batch=8, cuda_graphs="on")
    try:
        texts = run(engine, *mixed_requests())
        assert engine.decode_path == "cuda-graphs", engine.runner.graphs.reason
        assert len(texts["g0"]) == 20 and len(texts["s"]) == 24
    finally:
        engine.close()


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_flex_decode_gives_the_gather_text(model_dir: str, graphs: str) -> None:
    gather = HFEngine(model_dir, device="cuda:0", max_batch=8, dtype="float32",
                      kv_layout="paged")
    flex = HFEngine(model_dir, device="cuda:0", max_batch=8, dtype="float32",
                    kv_layout="paged", decode_attention="flex", cuda_graphs=graphs)
    try:
        assert flex.decode_attention == "flex"  # compiled with Triton, passed its self-check
        assert run(flex, *mixed_requests()) == run(gather, *mixed_requests())
        if graphs == "on":
            assert flex.decode_path == "cuda-graphs", flex.runner.graphs.reason
    finally:
        gather.close()
        flex.close()


def test_the_draw_is_the_same_on_the_gpu() -> None:
    pairs = [(-(2**63), 0), (-1, 7), (0, 2**31), (1, 99), (2**62 + 12345, 4095)]
    keys = torch.tensor([k for k, _ in pairs], dtype=torch.long)
    fed = torch.tensor([p for _, p in pairs], dtype=torch.long)
    expected = draw_uniform(keys, fed)  # the CPU's (numpy) path
    on_gpu = draw_uniform(keys.cuda(), fed.cuda()).cpu()
    assert torch.equal(on_gpu, expected)
    reference = [uniform_reference(k, p + 1) * BELOW_ONE for k, p in pairs]
    assert torch.equal(expected, torch.tensor(reference, dtype=torch.float32))


def test_a_decode_step_syncs_with_the_host_once(model_dir: str) -> None:
    engine = HFEngine(model_dir, device="cuda:0", max_batch=8, cuda_graphs="on")
    try:
        for r in mixed_requests():
            engine.submit(r)
        for _ in range(4):  # admission, prefill, the first replays (checked against eager)
            engine.step()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(8):
                    engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 8, [str(w.message) for w in syncs]  # the .tolist() of each step
        run(engine)
    finally:
        engine.close()
