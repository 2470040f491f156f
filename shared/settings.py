"""Settings for every process, read from `CHATSTREAM_*` env vars and mirrored by CLI flags.

Each field is one flag: `max_batch` is `--max-batch` and `CHATSTREAM_MAX_BATCH`. A flag given
on the command line wins over the environment, which wins over the default. Durations are in
seconds.
"""

from __future__ import annotations

import argparse
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from chatstream_cluster.shared.redis_topology import as_cluster_url

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_SESSION_SECRET = "change-me-chatstream-session-secret"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class CommonSettings(BaseSettings):
    """Settings shared by the gateway, the worker and the CLI tools."""

    model_config = SettingsConfigDict(env_prefix="CHATSTREAM_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis:// (rediss:// for TLS; user:password@ for auth), "
        "redis+cluster://host:port,host:port for Redis Cluster, "
        "redis+sentinel://host:port,.../master-name for Sentinel.",
    )
    redis_cluster: bool = Field(
        False, description="Treat a redis:// --redis-url as a Redis Cluster seed (redis+cluster://)."
    )
    queue_partitions: int = Field(
        1, ge=1, le=256,
        description="Job streams, each its own key (its own cluster slot); workers read all of "
        "them. Every gateway and worker must use the same number.",
    )
    key_prefix: str = Field(
        "chatstream", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Prefix of every Redis key."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log format; auto = JSON unless stderr is a terminal."
    )

    @model_validator(mode="after")
    def _cluster_url(self) -> CommonSettings:
        if self.redis_cluster and self.redis_url:
            self.redis_url = as_cluster_url(self.redis_url)
        return self


class WorkerSettings(CommonSettings):
    """Settings of one worker process (one per GPU)."""

    model: str = Field(
        "demo", description="demo (tiny local Llama), mock (no torch), or an HF model id / folder."
    )
    served_model_name: str = Field(
        "",
        description="The name clients ask for in `model` (and the model's queue, capacity and "
        "metrics label); empty = --model as given. Workers with the same name serve one model "
        "together.",
    )
    device: str = Field("cpu", description="cpu, cuda, or cuda:N (pins GPU N).")
    max_batch: int = Field(16, ge=1, le=4096, description="Most sequences generated together.")
    mock_tokens_per_s: float = Field(
        0.0, ge=0, description="Speed of --model mock per sequence; 0 = as fast as it can."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Model dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    model_cache_dir: str = Field(
        "", description="Folder for the built demo model; empty = ~/.cache/chatstream."
    )
    torch_threads: int = Field(
        0, ge=0, le=1024,
        description="Threads for torch's CPU math; 0 = auto: the CPU cores minus one (at least "
        "1) on --device cpu, leaving a core for the worker's I/O, Redis and the gateway.",
    )
    kv_cache_memory: int = Field(
        0, ge=0,
        description="Bytes of KV cache, allocated once at start; 0 = auto: on CUDA what "
        "--gpu-memory-utilization leaves after the model and a profiled step, on CPU enough "
        "for --max-batch sequences of --max-model-len tokens, at most 512 MiB.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1.0,
        description="On CUDA with --kv-cache-memory 0: the share of the device's memory the "
        "worker may use (model, activations and KV cache).",
    )
    max_model_len: int = Field(
        0, ge=0,
        description="Longest sequence (prompt + reply) in tokens; 0 = the model's context, "
        "clamped to what the KV cache holds. A longer prompt is a 400; a reply stops there.",
    )
    prefill_chunk_tokens: int = Field(
        0, ge=0,
        description="Most prompt tokens prefilled per engine step, mixed with that step's "
        "decodes, so a long prompt never stalls running streams; 0 = auto (256 on CPU, 2048 "
        "on CUDA).",
    )
    kv_layout: Literal["auto", "paged", "rows"] = Field(
        "auto",
        description="KV cache layout: paged blocks, or rows in virtual memory (CPU, Linux); "
        "auto = rows on CPU, paged elsewhere.",
    )
    cuda_graphs: Literal["on", "off"] = Field(
        "off",
        description="On CUDA with the paged KV layout: capture the decode step as CUDA graphs "
        "at start-up (one per batch-size and KV-length bucket) and replay them; a model whose "
        "capture fails or whose first replay differs from the eager forward runs eagerly. Off "
        "until verified on a GPU (bench/gpu_check.sh).",
    )
    decode_attention: Literal["gather", "flex"] = Field(
        "gather",
        description="Decode attention over the paged KV cache: gather (the step's blocks up to "
        "its longest sequence, then SDPA) or flex (PyTorch flex_attention reading each "
        "sequence's own blocks in place; compiled with Triton on CUDA, slow on CPU).",
    )
    stream_interval: float = Field(
        0.02, ge=0, le=1.0,
        description="Seconds a sequence's new text may wait to be sent with the next tokens "
        "(first and last tokens go at once); 0 = publish after every engine step.",
    )
    worker_id: str = Field("", description="Worker id in the registry; empty = host-pid-random.")
    heartbeat_interval: float = Field(1.0, gt=0, description="Seconds between heartbeats.")
    worker_ttl: float = Field(5.0, gt=0, description="A worker silent this long is dead.")
    job_claim_idle: float = Field(
        5.0, gt=0, description="A job untouched this long is taken over from its dead worker."
    )
    no_subscriber_timeout: float = Field(
        1.5, gt=0,
        description="Stop generating a sequence whose tokens reach no gateway for this long; "
        "it is parked, resumable for the gateways' --resume-window.",
    )
    drain_timeout: float = Field(
        30.0, ge=0,
        description="On SIGTERM, finish in-flight jobs for at most this long, then leave the "
        "rest to other workers; 0 = at once.",
    )
    event_stream_ttl: float = Field(
        300.0, gt=0,
        description="Lifetime of a finished or parked job's event stream (replay and resume); "
        "keep it above the gateways' --resume-window.",
    )


class GatewaySettings(CommonSettings):
    """Settings of one stateless gateway process."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 = any free port).")
    max_concurrent: int = Field(
        0,
        ge=0,
        description="Cap on running generations of each served model, cluster-wide; 0 = the "
        "sum of that model's live workers' --max-batch.",
    )
    max_queue: int = Field(
        64, ge=0,
        description="Most requests waiting for a permit, per served model, cluster-wide.",
    )
    queue_timeout: float = Field(60.0, gt=0, description="Most seconds a request waits in line.")
    permit_lease: float = Field(
        15.0, gt=0, le=300, description="A permit not refreshed this long is freed (crash)."
    )
    no_worker_timeout: float = Field(
        3.0, gt=0,
        description="Seconds a request for a model with no live worker waits for one before "
        "answering 503 (without --cold-start-timeout).",
    )
    cold_start_timeout: float = Field(
        0.0, ge=0, le=3600,
        description="Scale from zero: a request for a known model with no live worker waits in "
        "that model's line (within --max-queue) for this long while a worker starts, instead "
        "of 503 after --no-worker-timeout; streams get SSE comments meanwhile. Also keeps "
        "/readyz ready with no worker. 0 = off.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Served model names this cluster serves even while no worker of them runs "
        "(scale from zero); models whose workers ran within a day are known anyway "
        "(repeatable; env: comma-separated CHATSTREAM_MODELS).",
    )
    default_model: str = Field(
        "",
        description="Model of the ChatStream endpoints (their requests name none); empty = the "
        "one model the cluster knows.",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request has none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413).")
    max_messages: int = Field(256, ge=1, description="Most messages in one request.")
    max_message_chars: int = Field(100_000, ge=1, description="Longest message content.")
    max_stop: int = Field(4, ge=0, description="Most stop strings.")
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API key required on /v1/* and ChatStream endpoints (repeatable; env: "
        "comma-separated CHATSTREAM_API_KEYS).",
    )
    admin_key: str = Field("", description="Key protecting /admin/* and /metrics.")
    max_concurrent_per_key: int = Field(0, ge=0, description="Cap per API key; 0 = none.")
    client_roles_file: str = Field(
        "",
        description="JSON file with ChatStream's client_roles (which ChatStream APIs browsers "
        "and programs may call; docs/chatstream-api.md); empty = no role layer.",
    )
    session_secret: str = Field(
        DEFAULT_SESSION_SECRET, description="Secret that signs the sid cookie."
    )
    allow_default_secret: bool = Field(
        False, description="Start with the default session secret on a non-loopback address."
    )
    session_ttl: float = Field(7 * 24 * 3600.0, gt=0, description="Sliding lifetime of a session.")
    cookie_secure: bool = Field(False, description="Mark the sid cookie Secure (HTTPS only).")
    drain_timeout: float = Field(
        30.0, ge=0,
        description="On SIGTERM, let open streams finish for at most this long, then close "
        "them; 0 = at once.",
    )
    resume_window: float = Field(
        30.0, gt=0, le=3600,
        description="A stream whose client or gateway went away stays resumable "
        "(Last-Event-ID) for this long; its generation stops at once and continues on resume.",
    )
    ui: bool = Field(
        True, description="Serve the chat page at / (and /chatstream.js); --no-ui turns it off."
    )
    ui_title: str = Field("ChatStream Cluster", description="Title of the chat page.")
    ui_welcome_message: str = Field(
        "", description="First message the chat page shows (not sent to the model)."
    )
    ops_page: bool = Field(
        True, description="Serve the ops page at /admin (its figures want --admin-key, like "
        "/admin/status); --no-ops-page turns it off.",
    )
    shutdown_grace: float = Field(
        5.0, ge=0, le=600,
        description="On SIGTERM, /readyz answers 503 for this long while the gateway still "
        "accepts and serves (so a load balancer drains it); then it closes and drains.",
    )
    # --- the HTTP layer (gateway/http_limits.py) ---
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Longest request header (name + value); longer: 431."
    )
    max_head_bytes: int = Field(
        64 * 1024, ge=4096, description="Most bytes of request line plus headers; more: 431."
    )
    max_url_bytes: int = Field(8 * 1024, ge=256, description="Longest request target (URL); 414.")
    header_timeout: float = Field(
        10.0, gt=0,
        description="Seconds a client has for its request line and headers, from connecting or "
        "from the request's first byte; then 408 and the connection is closed.",
    )
    body_timeout: float = Field(
        30.0, gt=0,
        description="Seconds a client has to send the request body after its headers; then 408 "
        "and the connection is closed.",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open."
    )
    max_connections: int = Field(
        10_000, ge=1,
        description="Open connections per gateway process; more are answered 503 and closed. "
        "The open-files limit is raised to fit at start-up (or this is lowered to fit it).",
    )
    redis_timeout: float = Field(
        0.8, gt=0, le=60,
        description="Seconds one Redis command may take before the request answers 503; a "
        "request waits for at most two in a row when Redis stops answering. A reply that a busy "
        "event loop reads late does not count (shared/redis_reads.py).",
    )
    # --- what clients may store in Redis ---
    max_sessions_per_key: int = Field(
        10_000, ge=1,
        description="ChatStream sessions per API key (all clients count as one key when no keys "
        "are set); a new session beyond it deletes that key's least recently used session.",
    )
    max_feedback_bytes: int = Field(
        64 * 1024, ge=0, description="Largest /set_feedback form_data, as JSON (413)."
    )
    max_feedback_depth: int = Field(
        16, ge=1, le=200, description="Deepest nesting of /set_feedback form_data (400)."
    )
    feedback_max_entries: int = Field(
        10_000, ge=1, description="The feedback stream keeps about this many newest entries."
    )
    feedback_retention: float = Field(
        30 * 24 * 3600.0, gt=0,
        description="Seconds a feedback entry stays in the stream (export it before: "
        "`chatstream feedback`).",
    )

    @field_validator("api_keys", "models", mode="before")
    @classmethod
    def _keys_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)


class UpSettings(GatewaySettings, WorkerSettings):
    """Settings of `chatstream up`: every gateway and worker setting plus the local cluster's."""

    @field_validator("worker", mode="before")
    @classmethod
    def _workers_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    redis_url: str = Field("", description="Redis URL; empty = start an embedded Redis.")
    workers: str = Field(
        "auto", pattern=r"^(auto|[0-9]+)$",
        description="Workers of --model: auto (one per visible CUDA device, else one) or a "
        "number.",
    )
    worker: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MODEL[:N]: start N workers (default 1) of MODEL, served under that name; "
        "repeat for several models side by side. Replaces --model/--workers (env: "
        "comma-separated CHATSTREAM_WORKER).",
    )
    data_dir: str = Field(".chatstream", description="Folder for the embedded Redis's data.")
    redis_maxmemory: str = Field(
        "2gb", pattern=r"^[0-9]+(b|kb|mb|gb)?$",
        description="maxmemory of the embedded Redis (policy noeviction: nothing is ever "
        "evicted, writes past it fail with 503); 0 = no limit.",
    )
    shutdown_grace: float = Field(
        0.0, ge=0, le=600,
        description="On SIGTERM, /readyz answers 503 for this long before the gateway closes; "
        "0 here, as no load balancer stands in front of `up`.",
    )


# --- CLI mirroring ---------------------------------------------------------------------------

_FLAG_NAMES = {"api_keys": "--api-key"}


def flag_name(field: str) -> str:
    """The CLI flag that mirrors a settings field."""
    return _FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_list(typing.get_args(annotation)[0])
    return origin is list


def _literal_choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    """Add one flag per settings field; unset flags stay out of the parsed namespace."""
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        env = f"CHATSTREAM_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env {env}; default {default!r}]"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(annotation):
            kwargs["action"] = "append"
        else:
            choices = _literal_choices(annotation)
            if choices:
                kwargs["choices"] = choices
            elif annotation in (int, float):
                kwargs["type"] = annotation
        parser.add_argument(flag_name(name), help=help_text, **kwargs)


def settings_from_args(cls: type[BaseSettings], args: argparse.Namespace) -> Any:
    """Build settings from env vars, overridden by the flags present in `args`."""
    overrides = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    return cls(**overrides)


def fields_of(cls: type[BaseSettings], settings: BaseSettings) -> dict[str, Any]:
    """The values of `settings` that `cls` also has (to pass `up` settings on to a child)."""
    return {k: getattr(settings, k) for k in cls.model_fields if hasattr(settings, k)}


__all__ = [
    "CommonSettings",
    "GatewaySettings",
    "UpSettings",
    "WorkerSettings",
    "add_settings_arguments",
    "fields_of",
    "flag_name",
    "settings_from_args",
]
