"""The engine on a GPU: four model shapes, eager and as CUDA graphs, against transformers' own
continuous batching. `bash bench/gpu_check.sh` runs it (with the CUDA tests) in one prepared
run; `--tiny` runs tiny versions of the same architectures on a CPU in seconds (the graphs
through cuda_graphs.EagerReplay), which checks the script, not the speed.

Each model is built from its config with random bf16 weights and the demo's byte tokenizer
(no download; the generation config suppresses every id the tokenizer lacks, so replies are
printable and run to max_tokens), saved to a temporary folder and served by HFEngine as
`chatstream worker --model PATH --device cuda:0 --cuda-graphs on` would. Per model:

- start-up: load, self-check and graph capture time, which forward runs it (fast / hf) and
  which decode path (cuda-graphs / eager, and why);
- 1, 16 and 64 concurrent requests x 128 new tokens (temperature 0.8, top-p 0.95), with the
  graphs and with them switched off (the same engine): tokens/s, ms per step split into
  forward / sampling / host (worker/engine/step_timer.py: device time from CUDA events),
  TTFT p50;
- greedy parity: 16 greedy requests of different prompts, graph text against eager text
  (identical replies, and the shortest common prefix);
- peak GPU memory (and the KV cache's share of it);
- transformers' continuous batching (`init_continuous_batching`: paged attention, CUDA
  graphs where it can) at the same loads and sampling: tokens/s and TTFT p50.

A table on stdout; JSON in `--out` (default $OUT/gpu_check.json), rewritten after each model,
so a run cut short by its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import measure, save_with_demo_tokenizer
from chatstream_cluster.shared.schemas import SamplingParams

COMMON = {"max_position_embeddings": 4096}
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-374m": ("LlamaConfig", {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32000,
        "tie_word_embeddings": False}),
    "qwen2.5-0.5b": ("Qwen2Config", {
        "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "tie_word_embeddings": True}),
    "llama-3.2-1b": ("LlamaConfig", {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
        "tie_word_embeddings": True}),
    "qwen3-0.6b": ("Qwen3Config", {  # q/k norms: the model's own code (HFForward)
        "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
        "vocab_size": 151936, "tie_word_embeddings": True}),
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}
PARITY_PROMPTS = [f"Parity prompt {i}: tell me about the number {i * 7}." for i in range(16)]


def shape_of(name: str, tiny: bool) -> tuple[str, dict[str, Any]]:
    config_class, shape = SHAPES[name]
    if tiny:
        shape = {**TINY, **({"head_dim": 16} if "head_dim" in shape else {}),
                 "tie_word_embeddings": shape["tie_word_embeddings"]}
    return config_class, {**COMMON, **shape}


def build_model(name: str, folder: Path, device: str, tiny: bool) -> int:
    """Save the random bf16 model `name` with the demo tokenizer into `folder`; parameters."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from chatstream_cluster.worker.demo_model import BOS_ID, EOS_ID, PAD_ID

    config_class, shape = shape_of(name, tiny)
    config = getattr(transformers, config_class)(
        **shape, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: seconds, not minutes, on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    save_with_demo_tokenizer(model, folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    _free(device)
    return count


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def check_engine(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """HFEngine with graphs, then with them off: loads, parity, memory (see the docstring)."""
    import torch

    from chatstream_cluster.worker.engine import HFEngine
    from chatstream_cluster.worker.engine.cuda_graphs import EagerReplay

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    started = time.perf_counter()
    engine = HFEngine(
        path, device=args.device, max_batch=max(args.levels), dtype="bfloat16",
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_layout="paged", cuda_graphs="on", decode_attention=args.decode_attention,
        graph_capture=None if cuda else EagerReplay(),
    )
    graphs = engine.runner.graphs
    result: dict[str, Any] = {
        "start_s": round(time.perf_counter() - started, 1),
        "forward": engine.runner.path, "decode_attention": engine.decode_attention,
        "decode_path": engine.decode_path,
        "graphs": len(graphs.graphs) if graphs else 0,
        "capture_s": round(graphs.capture_s, 2) if graphs else None,
        "graphs_off_reason": graphs.reason if graphs and graphs.reason else None,
        "kv_tokens": engine.kv.tokens_total,
        "kv_gib": round(sum(t.numel() * t.element_size() for t in (*engine.kv.k, *engine.kv.v))
                        / 2**30, 2),
        "runs": [],
    }
    captured = graphs is not None and graphs.enabled
    modes = ["graphs", "eager"] if captured else ["eager"]
    try:
        for mode in modes:  # warm-up: first replays (checked against eager), kernels, clocks
            _set_graphs(graphs, mode == "graphs")
            for streams in args.levels:
                measure(engine, streams, 16)
        for mode in modes:
            _set_graphs(graphs, mode == "graphs")
            for streams in args.levels:
                run = measure(engine, streams, args.new_tokens)
                del run["texts"]
                result["runs"].append({"backend": f"engine-{mode}", **run})
        if captured:
            result["parity"] = _parity(engine, graphs, args)
        result["decode_path_after"] = engine.decode_path  # a failed replay check turns it off
        if cuda:
            result["peak_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
    finally:
        engine.close()
        _free(args.device)
    return result


def _set_graphs(graphs: Any, on: bool) -> None:
    if graphs is not None and not graphs.reason:  # a model whose graphs failed stays eager
        graphs.enabled = on


def _parity(engine: Any, graphs: Any, args: argparse.Namespace) -> dict[str, Any]:
    """16 greedy requests of different prompts, with graphs and without."""
    greedy = SamplingParams(max_tokens=args.parity_tokens, temperature=0)
    texts = {}
    for mode in ("graphs", "eager"):
        _set_graphs(graphs, mode == "graphs")
        texts[mode] = measure(engine, len(PARITY_PROMPTS), 0, greedy, PARITY_PROMPTS)["texts"]
    _set_graphs(graphs, True)
    pairs = list(zip(texts["graphs"], texts["eager"], strict=True))
    common = [next((i for i, (a, b) in enumerate(zip(g, e, strict=False)) if a != b),
                   min(len(g), len(e))) for g, e in pairs]
    return {"requests": len(pairs), "identical": sum(g == e for g, e in pairs),
            "tokens": args.parity_tokens, "shortest_common_prefix": min(common)}


def check_cb(path: str, args: argparse.Namespace, prompt_ids: list[int]) -> list[dict[str, Any]]:
    """transformers' continuous batching at the same loads; rows with "error" if it fails."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chatstream_cluster.worker.demo_model import EOS_ID, PAD_ID

    cuda = args.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.bfloat16).to(args.device).eval()
    manager = None
    try:
        config = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95,
                                  max_new_tokens=args.new_tokens, eos_token_id=EOS_ID,
                                  pad_token_id=PAD_ID)
        kwargs: dict[str, Any] = {"generation_config": config}
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
            wanted = {"use_cuda_graph": cuda, "max_memory_percent": 0.5,
                      "max_requests_per_batch": max(args.levels)}
            if not cuda:
                wanted.update(num_blocks=max(16, 4 * max(args.levels)), page_size=64,
                              max_batch_tokens=512)
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                **{k: v for k, v in wanted.items() if k in fields})
        except ImportError:  # an older transformers: its defaults
            pass
        manager = model.init_continuous_batching(**kwargs)
        if hasattr(manager, "warmup"):
            manager.warmup()
        manager.start()
        attention = getattr(model.config, "_attn_implementation", None)
        for streams in args.levels:  # warm-up at every load (graphs of each size)
            _cb_round(manager, prompt_ids, streams, 16)
        rows = []
        for streams in args.levels:
            row = _cb_round(manager, prompt_ids, streams, args.new_tokens)
            rows.append({"backend": "transformers-cb", "attention": attention, **row})
        return rows
    except Exception as exc:  # noqa: BLE001 - the baseline is reported, never fatal
        return [{"backend": "transformers-cb", "error": f"{type(exc).__name__}: {exc}"[:300]}]
    finally:
        if manager is not None:
            try:
                manager.stop(block=True, timeout=30)
            except Exception:  # noqa: BLE001
                pass
        del model
        _free(args.device)


def _cb_round(manager: Any, prompt_ids: list[int], streams: int, new_tokens: int,
              ) -> dict[str, Any]:
    from bench.engine_bench import cb_round

    start = time.perf_counter()
    tokens, first = cb_round(manager, prompt_ids, streams, new_tokens, timeout=60)
    seconds = time.perf_counter() - start
    return {"streams": streams, "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(1000 * statistics.median(first), 1)}


COLUMNS = ["model", "backend", "streams", "tokens_per_s", "step_ms", "forward_ms",
           "sampling_ms", "host_ms", "ttft_p50_ms"]


def table(report: dict[str, Any]) -> str:
    rows = []
    notes = []
    for name, model in report["models"].items():
        engine = model.get("engine", {})
        for run in engine.get("runs", []) + model.get("cb", []):
            rows.append({"model": name, **run})
        if engine:
            parity = engine.get("parity", {})
            notes.append(
                f"{name}: {model.get('parameters', 0) / 1e6:.0f}M params, forward "
                f"{engine.get('forward')}, decode {engine.get('decode_path')} -> "
                f"{engine.get('decode_path_after')} ({engine.get('graphs')} graphs, capture "
                f"{engine.get('capture_s')} s{', off: ' + engine['graphs_off_reason'] if engine.get('graphs_off_reason') else ''}), "  # noqa: E501
                f"start {engine.get('start_s')} s, peak {engine.get('peak_gib')} GiB (KV "
                f"{engine.get('kv_gib')} GiB); greedy parity {parity.get('identical')}/"
                f"{parity.get('requests')} identical, common prefix >= "
                f"{parity.get('shortest_common_prefix')} of {parity.get('tokens')}")
        if model.get("error"):
            notes.append(f"{name}: ERROR {model['error']}")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS} \
        if rows else {c: len(c) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    for r in rows:
        cells = [str(r.get(c, r.get("error", "") if c == "tokens_per_s" else "")) for c in COLUMNS]
        lines.append("  ".join(v.ljust(widths[c]) for v, c in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines + [""] + notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default cuda:0, or cpu with --tiny")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--levels", default=None, help="concurrent requests; default 1,16,64")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 --tiny)")
    parser.add_argument("--parity-tokens", type=int, default=None, help="default 64 (8 --tiny)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--decode-attention", default="gather", choices=["gather", "flex"])
    parser.add_argument("--no-cb", action="store_true", help="skip transformers' baseline")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds: start no model after this much time (0: no limit)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda:0")
    args.levels = [int(x) for x in (args.levels or ("1,4" if args.tiny else "1,16,64"))
                   .split(",")]
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    args.parity_tokens = args.parity_tokens or (8 if args.tiny else 64)
    out = Path(args.out or Path(os.environ.get("OUT", "bench/results")) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else
        platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "tiny": args.tiny,
        "new_tokens": args.new_tokens, "levels": args.levels,
        "sampling": {"temperature": 0.8, "top_p": 0.95}, "dtype": "bfloat16",
        "max_model_len": args.max_model_len, "decode_attention": args.decode_attention,
        "models": {},
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if args.deadline and time.perf_counter() - began > args.deadline:
                report["models"][name] = {"error": "skipped: out of time"}
                continue
            entry: dict[str, Any] = {"shape": shape_of(name, args.tiny)[1]}
            report["models"][name] = entry
            folder = Path(tmp) / name
            try:
                t0 = time.perf_counter()
                entry["parameters"] = build_model(name, folder, args.device, args.tiny)
                entry["build_s"] = round(time.perf_counter() - t0, 1)
                print(f"== {name}: {entry['parameters'] / 1e6:.0f}M parameters, built in "
                      f"{entry['build_s']} s", flush=True)
                entry["engine"] = check_engine(str(folder), args)
                if not args.no_cb:
                    entry["cb"] = check_cb(str(folder), args, _prompt_ids(str(folder)))
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next model
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
            out.write_text(json.dumps(report, indent=2))
            print(table({"models": {name: entry}}), flush=True)
    report["seconds"] = round(time.perf_counter() - began, 1)
    out.write_text(json.dumps(report, indent=2))
    print("\n== all models\n" + table(report))
    print(f"wrote {out}")
    failed = [n for n, m in report["models"].items() if m.get("error")]
    return 1 if failed else 0


def _prompt_ids(path: str) -> list[int]:
    """The engine benchmark's prompt, rendered by the model's chat template."""
    from transformers import AutoTokenizer

    from bench.engine_bench import PROMPT

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages = [m.model_dump() for m in PROMPT]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


if __name__ == "__main__":
    sys.exit(main())
