"""The worker's generation engine over a transformers model (nano-vllm's seams):

- `engine.py`: HFEngine, the glue that implements worker/engine_api.py;
- `sequence.py`: one request's state; `scheduler.py`: admission by KV budget, chunked
  prefill mixed with decode;
- `kv_cache.py` (with `kv_pool.py`, paged blocks, and `kv_rows.py`, CPU rows): the KV cache,
  sized once at start (`sizing.py`);
- `runner.py`: one forward per step, `llama_forward.py` as the fast path and `hf_forward.py`
  (the model's own code) for any other architecture, both over `attention.py`;
- `model_check.py`: refuse at start what the engine cannot compute right;
- `sampling.py`, `detokenizer.py`, `prompt.py`, `hf_model.py`; `faults.py` (tests only).

`HFEngine` is imported lazily, so `--model mock` never imports torch through this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HFEngine"]


def __getattr__(name: str) -> Any:
    if name == "HFEngine":
        from chatstream_cluster.worker.engine.engine import HFEngine

        return HFEngine
    raise AttributeError(name)
