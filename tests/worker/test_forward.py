"""LlamaFastForward against the model's own HF forward, on Llama variants the demo model does
not cover (GQA, q/k/v/o and MLP biases, tied embeddings, a non-default RoPE), across KV cache
growth; batched prefill of prompts of different lengths; the per-step prefill budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker import engine as engine_module
from chatstream_cluster.worker.demo_model import build_demo_tokenizer, demo_suppressed_tokens
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine_api import GenerationRequest
from chatstream_cluster.worker.llama_forward import supports_fast_forward


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("variant")
    config = LlamaConfig(
        vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, max_position_embeddings=512, bos_token_id=256,
        eos_token_id=257, pad_token_id=258,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    )
    torch.manual_seed(7)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so a forward that drops one is caught
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
        suppress_tokens=demo_suppressed_tokens(),
    )
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def engines(variant_dir: str) -> Iterator[tuple[HFEngine, HFEngine]]:
    fast = HFEngine(variant_dir, max_batch=4)
    slow = HFEngine(variant_dir, max_batch=4, fast_forward=False)
    yield fast, slow
    fast.close()
    slow.close()


def req(rid: str, content: str, **sampling) -> GenerationRequest:
    return GenerationRequest(
        rid, [ChatMessage(role="user", content=content)], SamplingParams(**sampling)
    )


def run(engine: HFEngine, *requests: GenerationRequest) -> dict[str, str]:
    for r in requests:
        engine.submit(r)
    texts = {r.request_id: "" for r in requests}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    return texts


def test_variant_takes_the_fast_path(engines: tuple[HFEngine, HFEngine], variant_dir) -> None:  # noqa: ANN001
    fast, slow = engines
    assert fast.fast_forward and not slow.fast_forward
    assert Path(variant_dir, "config.json").is_file()


def test_fast_forward_matches_hf_forward_on_a_variant(
    engines: tuple[HFEngine, HFEngine],
) -> None:
    fast, slow = engines
    requests = [
        req("short", "hi", temperature=0, max_tokens=40),
        req("long", "a much longer prompt than the others, " * 3, temperature=0, max_tokens=40),
        req("seeded", "seeded sampling", seed=5, top_k=20, top_p=0.9, max_tokens=40),
    ]
    assert run(fast, *requests) == run(slow, *requests)


def test_generation_across_kv_cache_growth(engines: tuple[HFEngine, HFEngine]) -> None:
    fast, slow = engines
    request = req("grow", "grow the cache", temperature=0, max_tokens=300)  # past 256 columns
    a, b = run(fast, request)["grow"], run(slow, request)["grow"]
    assert len(a) == 300 and a == b


def test_batched_prefill_of_mixed_lengths_equals_one_at_a_time(demo_model_dir: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=4)
    try:
        prompts = ["x", "a medium prompt", "a considerably longer prompt than the other two"]
        alone = {}
        for i, p in enumerate(prompts):
            alone.update(run(engine, req(f"p{i}", p, temperature=0, max_tokens=20)))
        together = run(engine, *[
            req(f"p{i}", p, temperature=0, max_tokens=20) for i, p in enumerate(prompts)
        ])
    finally:
        engine.close()
    assert together == alone


def test_prefill_budget_splits_admission_across_steps(demo_model_dir: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=4)
    try:
        one = len(engine.render(req("r", "same length"))[0])
        assert engine.prefill_budget == engine_module.PREFILL_BUDGET["cpu"]
        engine.prefill_budget = 2 * one
        for i in range(4):
            engine.submit(req(f"r{i}", "same length", max_tokens=3))
        first = {o.request_id for o in engine.step()}
        assert first == {"r0", "r1"} and engine.running == 2 and engine.waiting == 2
        second = {o.request_id for o in engine.step()}
        assert second == {"r0", "r1", "r2", "r3"} and engine.running == 4
        # A prompt over the budget on its own is still admitted (one per step at least).
        engine.prefill_budget = 1
        run(engine)
        engine.submit(req("big", "a prompt longer than the budget", max_tokens=2))
        assert [o.request_id for o in engine.step()] == ["big"]
        run(engine)
    finally:
        engine.close()


def test_supports_fast_forward_rejects_other_shapes(engines: tuple[HFEngine, HFEngine]) -> None:
    fast, _ = engines
    assert supports_fast_forward(fast.model)
    config = fast.model.config
    saved = config.model_type
    try:
        config.model_type = "gpt2"
        assert not supports_fast_forward(fast.model)
    finally:
        config.model_type = saved
