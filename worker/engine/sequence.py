"""One request's state inside the engine, from submit to its last output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatstream_cluster.worker.engine_api import GenerationRequest, StepOutput


@dataclass
class Sequence:
    """A request and its generation state.

    `prompt_ids` are rendered and tokenized before the sequence reaches the engine thread
    (`HFEngine.submit` runs in the caller's thread). `computed` counts the tokens whose keys and
    values are in the KV cache; the prompt is prefilled in chunks until `computed ==
    len(prompt_ids)`, then each step feeds `last_token` (sampled, not yet in the cache).
    """

    request: GenerationRequest
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str | None = None
    early: StepOutput | None = None  # set when the request ends before it runs (an error)
    row: int = -1  # the KV row (slot in the running batch) while running
    reserved: int = 0  # KV tokens reserved for it: prompt + what it may still generate
    computed: int = 0
    last_token: int = -1
    tokens: int = 0  # completion tokens so far, resume included
    detok: Any = None
    pending: str = ""  # text held back (a possible stop-string prefix)
    key: int = 0  # the sampling draw's key (sampling.seed_key: from the seed, else random)
    sent_first: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prefilled(self) -> bool:
        """True once the whole prompt is in the KV cache (the sequence decodes)."""
        return self.computed >= len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens of the sequence so far: prompt plus those generated in this attempt."""
        return len(self.prompt_ids) + self.tokens - self.request.resume_tokens
