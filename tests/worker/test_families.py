"""Greedy parity per model family: the engine's text equals `model.generate(do_sample=False)`
for prompts shorter and longer than the sliding window, alone and in a batch of mixed lengths,
on both KV layouts, with prompts prefilled in chunks. Tiny random models (tests/worker/
families.py); the README's "Supported models" table must be the one these tests cover."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.worker.engine import HFEngine
from chatstream_cluster.worker.engine.prompt import render
from chatstream_cluster.worker.engine_api import GenerationRequest
from tests.worker.families import FAMILIES, WINDOW, Family, build, readme_table

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 20
PROMPTS = {
    "short": "hi",  # with the chat template: under the window
    "long": "a prompt well past the sliding window of these tiny models " * 2,
    "mid": "a medium prompt",
}


def req(rid: str, content: str) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    return GenerationRequest(rid, [ChatMessage(role="user", content=content)], sampling)


def run(engine: HFEngine, requests: list[GenerationRequest]) -> dict[str, str]:
    for r in requests:
        engine.submit(r)
    texts = {r.request_id: "" for r in requests}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            texts[out.request_id] += out.text
    return texts


def reference(folder: str) -> dict[str, str]:
    """transformers' own greedy generation (its own attention and masks), prompt by prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = {}
    for name, content in PROMPTS.items():
        ids = render(tokenizer, req(name, content))[0]
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
        texts[name] = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    return texts


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {f.name: build(f, tmp_path_factory.mktemp(f.name.replace("-", ""))) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_greedy_parity_with_generate(family: Family, folders: dict[str, str]) -> None:
    folder = folders[family.name]
    expected = reference(folder)
    assert all(len(t) == NEW_TOKENS for t in expected.values())  # printable: a char a token
    for layout in ("rows", "paged"):
        engine = HFEngine(folder, max_batch=4, kv_layout=layout, prefill_chunk_tokens=24)
        try:
            assert len(engine.render(req("s", PROMPTS["short"]))[0]) < WINDOW
            assert len(engine.render(req("l", PROMPTS["long"]))[0]) > 3 * WINDOW
            alone = {}
            for name, text in PROMPTS.items():
                alone.update(run(engine, [req(name, text)]))
            batched = run(engine, [req(name, text) for name, text in PROMPTS.items()])
        finally:
            engine.close()
        assert alone == expected, f"{family.name} ({layout}) alone"
        assert batched == expected, f"{family.name} ({layout}) batched"


def test_readme_lists_the_verified_families() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_table() in readme, (
        "README.md's Supported models table is out of date: paste `python -m "
        "tests.worker.families`"
    )
