"""Rendering a request into prompt token ids, with the model's chat template.

Runs in the thread that submits a request (the worker loop calls `submit` through
`asyncio.to_thread`), never on the engine thread, which does only model work.
"""

from __future__ import annotations

from typing import Any

from chatstream_cluster.worker.engine_api import GenerationRequest

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def render(tokenizer: Any, request: GenerationRequest) -> tuple[list[int], str]:
    """Prompt token ids (resume text appended) and the rendered prompt text."""
    messages = [m.model_dump() for m in request.messages]
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=template
    )
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, chat_template=template
    )
    if not isinstance(ids, list):  # a BatchEncoding in transformers 5.x
        ids = ids["input_ids"]
    ids = list(ids)
    if request.resume_text:
        ids += tokenizer.encode(request.resume_text, add_special_tokens=False)
    return ids, text
