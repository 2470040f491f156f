"""The demo model: built in code, saved once, loaded offline, printable output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_cluster.worker.demo_model import DEMO_NAME, EOS_ID, build_demo_model


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_demo_model(str(tmp_path_factory.getbasetemp() / "models"))


def test_builds_into_cache_dir_and_is_reused(demo_path: str) -> None:
    path = Path(demo_path)
    assert path.name == DEMO_NAME
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(str(path.parent)) == demo_path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_loads_offline_with_chat_template(demo_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(demo_path, local_files_only=True)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 2048
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s><|user|>\nhi\n<|assistant|>\n"
    sample = "héllo 日本語 🎉"
    assert tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) == sample
    assert EOS_ID in model.generation_config.suppress_tokens


def test_generates_printable_text(demo_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(demo_path, local_files_only=True)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=40, do_sample=True)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(out[0]) - ids.shape[1] == 40  # EOS is masked: replies run to max tokens
    assert text and all(c.isprintable() or c == "\n" for c in text)
