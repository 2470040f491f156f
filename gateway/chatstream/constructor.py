"""ChatStream 0.3.0's constructor arguments, mapped to `ChatStreamCluster`'s (docs/migration.md).

Each argument is kept (renamed to a gateway setting or a default generation param), accepted
and ignored (with the reason), or refused with a TypeError that says what replaces it. Nothing
here blames the workers for what the gateway owns: `client_roles` and `request_handler` are
`ChatStreamCluster` keyword arguments of their own.
"""

from __future__ import annotations

from typing import Any

from chatstream_cluster.shared.settings import GatewaySettings

RENAMED = {"num_of_concurrent_executions": "max_concurrent", "max_queue_size": "max_queue",
           "max_new_tokens": "default_max_tokens"}
PARAMS = {"temperature": "temperature", "top_k": "top_k_value", "top_p": "top_p_value"}
IGNORED = {
    "too_many_request_as_http_error": "a full queue is always HTTP 429",
    "name": "/get_load names each worker by its --worker-id",
    "logger": "the gateway logs to the 'chatstream.gateway' logger",
    "locale": "log messages are in English",
}
_WORKER = "the model runs in the cluster's workers: "
REFUSED = {
    "model": _WORKER + "start `chatstream worker --model <HF id or folder>`",
    "tokenizer": _WORKER + "each worker loads its model's tokenizer (`--model`)",
    "device": _WORKER + "start one `chatstream worker --device cuda:N` per GPU",
    "num_gpus": _WORKER + "start one `chatstream worker --device cuda:N` per GPU",
    "chat_prompt_clazz": _WORKER + "they render prompts with the tokenizer's chat template",
    "context_len": _WORKER + "they use the model's own context length",
    "add_special_tokens": _WORKER + "the chat template places the special tokens",
    "use_mock_response": _WORKER + "start `chatstream worker --model mock`",
    "mock_params": _WORKER + "start `chatstream worker --model mock --mock-tokens-per-s N`",
    "token_sampler": "not supported: workers sample with temperature, top_k and top_p "
                     "(pass those)",
    "repetition_penalty": "not supported: the workers' sampler has no repetition penalty",
    "repetition_penalty_method": "not supported: the workers' sampler has no repetition penalty",
    "seed": "not supported: ChatStream seeded its process's random generator once; workers "
            "sample many requests together (the OpenAI API takes a per-request `seed`)",
    "probe_mode_enabled": "not supported: ChatStream's generation probe is a debugging aid of "
                          "its in-process engine",
}


def from_chatstream_arguments(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings overrides, default generation params) from `ChatStreamCluster`'s keyword
    arguments: ChatStream's names and any GatewaySettings field."""
    refused = sorted(set(given) & set(REFUSED))
    if refused:
        raise TypeError("; ".join(f"{name}: {REFUSED[name]}" for name in refused))
    overrides = {RENAMED.get(k, k): v for k, v in given.items()
                 if k not in IGNORED and k not in PARAMS}
    params = {PARAMS[k]: v for k, v in given.items() if k in PARAMS}
    unknown = sorted(set(overrides) - set(GatewaySettings.model_fields))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; see GatewaySettings for the known ones")
    return overrides, params
