"""Start-up checks: serve a model only where the engine is known to compute it right.

1. `check_supported` refuses what the engine cannot run correctly, with the reason: quantized
   checkpoints (no parity test covers them; the fast path would also concatenate packed
   weights as if they were plain), models whose attention does not go through transformers'
   `AttentionInterface`, layer types other than full and sliding attention (linear, chunked
   attention...), attention sinks, encoder-decoders.
2. `probe` runs the model's own forward (its own attention and masks, no engine code) over a
   probe prompt: the reference logits, and each layer's KV shape for sizing the cache.
3. `self_check` runs the same prompt through the engine (two prefill chunks, then decodes)
   and compares every position's logits with the reference; for the model's own code it
   also checks that every layer wrote the cache and used the window its config declares.
   The probe is longer than the shortest sliding window (up to 4,096 + 8 tokens), so a
   window applied wrong shows here rather than in a user's text.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from chatstream_cluster.worker.engine.batch import build_batch
from chatstream_cluster.worker.engine.hf_forward import HFForward
from chatstream_cluster.worker.engine.hf_model import is_quantized, layer_windows
from chatstream_cluster.worker.engine.kv_cache import KVShape
from chatstream_cluster.worker.engine_api import UnsupportedModel

__all__ = ["UnsupportedModel", "check_supported", "probe", "probe_ids", "self_check"]

log = logging.getLogger("chatstream.worker")

LAYER_TYPES = ("full_attention", "sliding_attention")
PROBE_MIN = 24
PROBE_MAX = 4096 + 8
# Largest |engine - reference| logit difference, relative to the largest |reference| logit.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}


def check_supported(model: Any) -> None:
    config = model.config
    if is_quantized(model):
        method = getattr(getattr(config, "quantization_config", None), "quant_method", None)
        raise UnsupportedModel(
            f"quantized checkpoints are not supported (quantization: {method or 'unknown'}): "
            "no parity test covers them, so they are refused rather than risk wrong text; "
            "serve the unquantized weights"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel("encoder-decoder models are not supported")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    unknown = sorted(set(getattr(text, "layer_types", None) or []) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModel(
            f"layer types {unknown} are not supported (only {list(LAYER_TYPES)}): the engine's "
            "KV cache and masks cover full and sliding-window attention"
        )
    if any(hasattr(module, "sinks") for module in model.modules()):
        raise UnsupportedModel("attention sinks are not supported by the engine's attention")
    if not model._can_set_attn_implementation():
        raise UnsupportedModel(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface, so the engine cannot give its layers their KV cache and masks"
        )


def probe_ids(model: Any, model_ctx: int) -> list[int]:
    """A deterministic prompt longer than the shortest sliding window (where affordable)."""
    windows = [w for w in layer_windows(model.config) if w]
    length = max(PROBE_MIN, min(windows) + 8 if windows else 0)
    if windows and min(windows) + 8 > PROBE_MAX:
        log.warning("self-check prompt is shorter than the sliding window",
                    extra={"window": min(windows)})
    length = min(length, PROBE_MAX, model_ctx)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


@torch.inference_mode()
def probe(model: Any, ids: list[int]) -> tuple[list[KVShape], torch.Tensor]:
    """(each layer's KV shape, reference logits [len, vocab] in float32) from the model's own
    forward; refuses a model whose cache does not hold keys and values for every layer."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None) or []
    count = model.config.get_text_config().num_hidden_layers
    shapes = []
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            break
        shapes.append(KVShape(int(keys.shape[1]), int(keys.shape[3])))
    if len(shapes) != count:
        raise UnsupportedModel(
            f"the model cached keys and values for {len(shapes)} of its {count} layers "
            "(shared or missing KV layers are not supported)"
        )
    return shapes, out.logits[0].float()


@torch.inference_mode()
def self_check(runner: Any, kv: Any, model: Any, ids: list[int], reference: torch.Tensor) -> None:
    """Compare the engine's logits for `ids` with the model's own; raise UnsupportedModel."""
    length = len(ids)
    decodes = min(3, length - 2)
    a, b = (length - decodes) // 2, length - decodes
    kv.reserve(0, length)
    got = []
    try:
        for start, end in ((0, a), (a, b)):
            batch = build_batch([], [(0, start, ids[start:end])], [True], runner.device)
            batch.sample_index = torch.arange(end - start, device=runner.device)
            got.append(runner.run_batch(batch).float())
            _check_layers(runner, model)
        for pos in range(b, length):
            batch = build_batch([(0, pos, ids[pos])], [], [], runner.device)
            got.append(runner.run_batch(batch).float())
    finally:
        kv.release(0)
    logits = torch.cat(got)
    error = float((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    limit = TOLERANCE.get(next(model.parameters()).dtype, 0.1)
    log.info("engine self-check", extra={"tokens": length, "relative_error": round(error, 6),
                                         "fast_path": runner.fast})
    if not error <= limit:
        raise UnsupportedModel(
            f"the engine's logits differ from the model's own forward by {error:.3g} (relative; "
            f"allowed {limit}) on a {length}-token self-check: this architecture is not "
            "computed correctly by the engine, so it is refused"
        )


def _check_layers(runner: Any, model: Any) -> None:
    if not isinstance(runner.forward_impl, HFForward):
        return
    ctx = runner.forward_impl.last
    count = model.config.get_text_config().num_hidden_layers
    expected = layer_windows(model.config)
    if ctx.written != set(range(count)) or set(ctx.attended) != set(range(count)):
        raise UnsupportedModel(
            "the model's layers did not all write the KV cache and attend through it "
            f"(wrote {sorted(ctx.written)}, attended {sorted(ctx.attended)} of {count})"
        )
    for layer, (window, _softcap) in sorted(ctx.attended.items()):
        if window != expected[layer]:
            raise UnsupportedModel(
                f"layer {layer} attends with window {window} but its config declares "
                f"{expected[layer]}: the engine would mask it wrong"
            )
