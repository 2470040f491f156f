"""Loading a transformers causal LM for HFEngine, and reading its limits.

`--model` is `demo` (built in code, see worker/demo_model.py), a local folder, or an HF model
id. A local folder (or `HF_HUB_OFFLINE=1`) never touches the network.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def load_model(
    model: str, device: torch.device, dtype: str = "auto", cache_dir: str | None = None
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) for a `--model` value."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model
    if model == "demo":
        from chatstream_cluster.worker.demo_model import build_demo_model

        path = build_demo_model(cache_dir)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.path.isdir(path)
    kwargs: dict[str, Any] = {"local_files_only": offline}
    if cache_dir and model != "demo":
        kwargs["cache_dir"] = cache_dir
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), **kwargs)
    lm = lm.to(device)
    lm.eval()
    return lm, tokenizer


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto = bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def max_context(config: Any, tokenizer: Any) -> int:
    """The model's context length: config first, then the tokenizer, else 2048."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for value in (
        getattr(text_config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return 2048


def is_quantized(model: Any) -> bool:
    """True for a quantized checkpoint (bitsandbytes, GPTQ, AWQ, torchao, ...)."""
    config = getattr(model, "config", None)
    return bool(
        getattr(model, "hf_quantizer", None)
        or getattr(model, "is_quantized", False)
        or getattr(config, "quantization_config", None)
    )


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from the config as transformers
    reads it: `layer_types` where the config has them, else `sliding_window` on every layer
    (Mistral, Phi-3) unless `use_sliding_window` is off."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    if window and getattr(config, "use_sliding_window", True):
        return [window] * config.num_hidden_layers
    return [None] * config.num_hidden_layers


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a sequence (generation config and tokenizer)."""
    eos: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos.update(int(v) for v in value)
    return frozenset(eos)
