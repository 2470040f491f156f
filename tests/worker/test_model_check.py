"""Start-up refusals: what the engine cannot compute right is refused with the reason, never
served wrong (quantized checkpoints, unknown layer types, a layer whose window differs from
its config, logits that differ from the model's own forward)."""

from __future__ import annotations

import pytest
import torch

from chatstream_cluster.worker.engine.kv_cache import make_kv_cache
from chatstream_cluster.worker.engine.model_check import (
    UnsupportedModel,
    check_supported,
    probe,
    probe_ids,
    self_check,
)
from chatstream_cluster.worker.engine.runner import Runner
from tests.worker.families import FAMILIES


def tiny(name: str):  # noqa: ANN201
    import transformers

    family = next(f for f in FAMILIES if f.name == name)
    torch.manual_seed(0)
    return getattr(transformers, family.model_class)(family.config()).eval()


def checked(model, fast: bool = False) -> None:  # noqa: ANN001
    """What HFEngine does at start: probe, size a cache, self-check."""
    check_supported(model)
    ids = probe_ids(model, 256)
    shapes, reference = probe(model, ids)
    kv = make_kv_cache("paged", shapes, torch.float32, torch.device("cpu"), 2, 256, 1 << 20)
    runner = Runner(model, kv, 256, fast=fast)
    self_check(runner, kv, model, ids, reference)


def test_a_quantized_checkpoint_is_refused() -> None:
    model = tiny("Llama")
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(UnsupportedModel, match="quantized checkpoints are not supported"):
        check_supported(model)


def test_unknown_layer_types_are_refused() -> None:
    model = tiny("Qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        check_supported(model)


@pytest.mark.parametrize("fast", [False, True])
def test_a_sliding_model_passes_its_self_check(fast: bool) -> None:
    checked(tiny("Mistral"), fast)
    checked(tiny("Gemma-2"))


def test_a_layer_that_hides_its_window_is_refused() -> None:
    model = tiny("Gemma-2")
    model.model.layers[0].self_attn.sliding_window = None  # its config says sliding
    with pytest.raises(UnsupportedModel, match="layer 0 attends with window None"):
        checked(model)


def test_logits_that_differ_from_the_model_are_refused(monkeypatch) -> None:  # noqa: ANN001
    from chatstream_cluster.worker.engine import attention

    real = attention._prefill

    def off_by_one(q, k, v, start, scale, window, softcap):  # noqa: ANN001, ANN202
        return real(q, k, v, start, scale * 1.5, window, softcap)

    monkeypatch.setattr(attention, "_prefill", off_by_one)
    with pytest.raises(UnsupportedModel, match="differ from the model's own forward"):
        checked(tiny("Llama"))
