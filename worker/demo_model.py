"""The `--model demo` model: a tiny random Llama plus a byte-level tokenizer, built in code.

Nothing is downloaded. The first call builds the model with a fixed seed and saves it (model,
tokenizer with a chat template, generation config) into `<cache_dir>/demo-llama-v1/`; later
calls reuse that folder. It runs the real transformers code path with random weights.

Printable replies: the generation config's `suppress_tokens` masks every byte token that is not
printable ASCII, space or newline, the special tokens `<s>`/`<pad>`, and EOS `</s>` itself, so a
demo reply is always printable and runs until `max_tokens` (or a stop string). Engines that
honour `generation_config.suppress_tokens` (ours does) get this behaviour for free.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "demo-llama-v1"
DEMO_SEED = 1234
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Byte b is token id b; the special tokens follow.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

PRINTABLE_BYTES = frozenset(range(0x20, 0x7F)) | {0x0A}


def default_cache_dir() -> str:
    """Where the demo model lives when no cache dir is configured."""
    return os.path.join(os.path.expanduser("~"), ".cache", "chatstream")


def build_demo_model(cache_dir: str | None = None) -> str:
    """Return the folder of the demo model, building it on first use (atomic, idempotent)."""
    root = Path(cache_dir or default_cache_dir())
    target = root / DEMO_NAME
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
    try:
        _build_into(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is equivalent to ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def build_demo_tokenizer():
    """A byte-level tokenizer: token id b is byte b, then <s>, </s>, <pad>; with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of bytes, GPT-2 style
    byte_to_char = bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    assert fast.convert_tokens_to_ids([BOS, EOS, PAD]) == [BOS_ID, EOS_ID, PAD_ID]
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(DEMO_SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        suppress_tokens=demo_suppressed_tokens(),
        do_sample=True,
        temperature=1.0,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def demo_suppressed_tokens() -> list[int]:
    """Token ids the demo model never generates: non-printable bytes, specials and EOS."""
    return [b for b in range(256) if b not in PRINTABLE_BYTES] + [BOS_ID, EOS_ID, PAD_ID]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}
