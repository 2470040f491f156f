"""The model families the engine is verified on: tiny configs with random weights, and the
README's "Supported models" table rendered from them.

`python -m tests.worker.families` prints the table; tests/worker/test_families.py checks the
greedy parity of each family and that README.md carries exactly this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

WINDOW = 32  # sliding window of the families that have one: prompts go past it
VOCAB = 300  # the demo tokenizer's 259 ids fit
IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "vocab_size": VOCAB, "initializer_range": 0.2, **IDS}


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    model_class: str
    kwargs: dict[str, Any]
    attention: str  # what the README says about its attention

    def config(self) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(**self.kwargs)


FAMILIES = [
    Family("Llama", "LlamaConfig", "LlamaForCausalLM", SMALL, "full"),
    Family("Qwen2", "Qwen2Config", "Qwen2ForCausalLM",
           {**SMALL, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
           "full + sliding window (`use_sliding_window`, layers past `max_window_layers`)"),
    Family("Qwen3", "Qwen3Config", "Qwen3ForCausalLM",
           {**SMALL, "head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW,
            "max_window_layers": 1},
           "full + sliding window, q/k norms"),
    Family("Mistral", "MistralConfig", "MistralForCausalLM",
           {**SMALL, "sliding_window": WINDOW}, "sliding window on every layer"),
    Family("Gemma-2", "Gemma2Config", "Gemma2ForCausalLM",
           {**SMALL, "head_dim": 16, "sliding_window": WINDOW},
           "sliding and full layers alternating, logit soft-capping"),
    Family("GPT-2", "GPT2Config", "GPT2LMHeadModel",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": VOCAB,
            "initializer_range": 0.2, **IDS},
           "full, learned positions"),
    Family("Phi-3", "Phi3Config", "Phi3ForCausalLM",
           {**SMALL, "sliding_window": WINDOW}, "sliding window, fused qkv/gate-up weights"),
]


def build(family: Family, folder: Path) -> str:
    """Save a tiny random model of `family` with the demo tokenizer into `folder`."""
    import torch
    import transformers

    from chatstream_cluster.worker.demo_model import build_demo_tokenizer, demo_suppressed_tokens

    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(family.config()).eval()
    model.generation_config = transformers.GenerationConfig(
        # Printable bytes only (ids past the tokenizer's 259 too), so text == ids.
        **IDS, suppress_tokens=demo_suppressed_tokens() + list(range(259, VOCAB))
    )
    model.save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return str(folder)


def engine_path(family: Family) -> str:
    """Which forward the engine takes for the family."""
    import transformers

    from chatstream_cluster.worker.engine.llama_forward import supports_fast_forward

    model = getattr(transformers, family.model_class)(family.config())
    return "fast path" if supports_fast_forward(model) else "model's own code"


def readme_table() -> str:
    """The "Supported models" table of README.md."""
    lines = [
        "| family | transformers class | attention | engine path | verified |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in FAMILIES:
        lines.append(
            f"| {f.name} | `{f.model_class}` | {f.attention} | {engine_path(f)} | greedy parity "
            "with `generate()`, alone and batched, both KV layouts |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
