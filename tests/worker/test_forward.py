"""LlamaFastForward against the model's own HF forward, on Llama variants the demo model does
not cover (GQA, q/k/v/o and MLP biases, tied embeddings, a non-default RoPE), over a long
generation; prompts of different lengths together; chunked prefill mixed with decode; the two
KV layouts; what the fast path refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.demo_model import build_demo_tokenizer, demo_suppressed_tokens
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.llama_forward import supports_fast_forward
from chatstream_cluster.worker.engine_api import GenerationRequest


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


def test_long_generation_fast_equals_hf(engines: tuple[HFEngine, HFEngine]) -> None:
    fast, slow = engines
    request = req("grow", "a long reply", temperature=0, max_tokens=300)
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


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(demo_model_dir: str) -> None:
    engine = HFEngine(demo_model_dir, max_batch=4, prefill_chunk_tokens=8)
    whole = HFEngine(demo_model_dir, max_batch=4, prefill_chunk_tokens=4096)
    try:
        long = req("long", "a prompt of some sixty tokens, prefilled in chunks", temperature=0,
                   max_tokens=5)
        n = len(engine.render(long)[0])
        engine.submit(req("run", "x", temperature=0, max_tokens=200))
        while not engine.step():  # until "run" has its first token: it decodes from now on
            pass
        engine.submit(long)
        steps_to_first = 0
        outs: dict = {}
        while "long" not in outs and steps_to_first < 100:
            steps_to_first += 1
            outs = {o.request_id: o for o in engine.step()}
            assert "run" in outs  # the running stream gets a token every step
        assert steps_to_first == -(-n // 8)  # ceil(n / 8) chunks, one per step
        rest = run(engine)
        assert engine.kv.tokens_used == 0
        chunked = outs["long"].text + rest.get("long", "")
        assert chunked == run(whole, long)["long"]
    finally:
        engine.close()
        whole.close()


def test_rows_and_paged_layouts_agree(demo_model_dir: str) -> None:
    requests = [
        req("g", "greedy", temperature=0, max_tokens=30),
        req("s", "seeded sampling", seed=11, top_p=0.9, max_tokens=30),
        req("k", "a longer prompt than the others, in the same batch", seed=2, top_k=5,
            max_tokens=30),
    ]
    texts = []
    for layout in ("rows", "paged"):
        engine = HFEngine(demo_model_dir, max_batch=4, kv_layout=layout, prefill_chunk_tokens=16)
        assert engine.kv.layout == layout
        try:
            texts.append(run(engine, *requests))
        finally:
            engine.close()
    assert texts[0] == texts[1]


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
    # A projection that is not a plain float nn.Linear (a quantized layer's packed weights)
    # must never be concatenated as if it were.
    attn = fast.model.model.layers[1].self_attn

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.data.to(torch.int8),
                                             requires_grad=False)

    saved_proj = attn.k_proj
    try:
        attn.k_proj = PackedLinear(saved_proj)
        assert not supports_fast_forward(fast.model)
    finally:
        attn.k_proj = saved_proj
