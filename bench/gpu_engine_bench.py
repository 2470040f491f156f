"""The engine benchmark on a GPU with a model of realistic size, built offline from a config.

Builds a Llama from `LlamaConfig` (default: hidden 1024, 24 layers, 16 heads, intermediate
2816, vocab 32000: about 0.37B parameters) with random weights in bf16, saves it with the demo
model's byte-level tokenizer into a local folder, loads it through HFEngine like
`chatstream worker --model PATH --device cuda:0` would, and runs bench/engine_bench.py's
scenarios: 1, 16 and 64 concurrent requests of 128 new tokens, batched and (a few) one at a
time, plus transformers' own `generate()` for one stream as a reference. Prints a table and
writes JSON (`--out`, default $OUT/gpu_bench.json).

The tokenizer knows 259 tokens; the generation config suppresses every other id (and the
non-printable bytes and EOS), so replies are printable and run to max_tokens while the LM
head still has the full 32000 rows.

`--tiny` builds a tiny model and runs on CPU in seconds: it proves the script works anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FULL = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 2816,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


def build_model(folder: Path, shape: dict[str, int], device: str) -> int:
    """Save a random bf16 Llama of `shape` plus the demo tokenizer into `folder`; return its
    parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from chatstream_cluster.worker.demo_model import (
        BOS_ID,
        EOS_ID,
        PAD_ID,
        VOCAB_SIZE,
        build_demo_tokenizer,
        demo_suppressed_tokens,
    )

    config = LlamaConfig(
        **shape, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: seconds, not minutes, on a GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    unknown = list(range(VOCAB_SIZE, shape["vocab_size"]))
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        suppress_tokens=demo_suppressed_tokens() + unknown, do_sample=True,
    )
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return count


def generate_reference(path: str, device: str, new_tokens: int) -> dict[str, Any]:
    """One stream through transformers' `generate()` (same sampling), for comparison."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.engine_bench import PROMPT

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.bfloat16
    ).to(device)
    messages = [m.model_dump() for m in PROMPT]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"].to(device)
    kwargs = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "min_new_tokens": new_tokens}
    model.generate(ids, max_new_tokens=new_tokens, **kwargs)  # warm-up at the measured length
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = out.shape[1] - ids.shape[1]
    del model
    return {
        "backend": "hf-generate", "threads": 0, "mode": "batched", "concurrency": 1,
        "tokens": tokens, "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1), "ttft_p50_ms": None, "ttft_p99_ms": None,
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default cuda:0, or cpu with --tiny")
    parser.add_argument("--concurrency", default=None, help="default 1,16,64 (1,4 with --tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 --tiny)")
    parser.add_argument("--sequential", type=int, default=4,
                        help="one-at-a-time requests measured per concurrency level")
    parser.add_argument("--model-dir", default="", help="build the model here (default: temp)")
    parser.add_argument("--no-reference", action="store_true", help="skip HF generate()")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda:0")
    levels = tuple(int(c) for c in (args.concurrency or ("1,4" if args.tiny else "1,16,64"))
                   .split(","))
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    shape = TINY if args.tiny else FULL
    out = Path(args.out or Path(os.environ.get("OUT", "bench/results")) / "gpu_bench.json")

    import torch

    from bench.engine_bench import format_table, run_engine_bench

    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
        platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_shape": shape,
        "new_tokens": new_tokens,
        "dtype": "bfloat16",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp) / "bench-llama"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        report["parameters"] = build_model(folder, shape, device)
        report["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"built {report['parameters'] / 1e6:.0f}M parameters in {report['build_s']} s "
              f"into {folder}", flush=True)
        t0 = time.perf_counter()
        rows = run_engine_bench(
            model=str(folder), new_tokens=new_tokens, concurrency=levels, device=device,
            dtype="bfloat16", sequential_requests=args.sequential,
        )
        report["engine_s"] = round(time.perf_counter() - t0, 1)
        if device.startswith("cuda"):
            report["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if not args.no_reference:
            rows.append(generate_reference(str(folder), device, new_tokens))
    report["rows"] = rows
    print(format_table(rows), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
