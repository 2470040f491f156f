"""Every Redis key and channel name of the cluster, built under one configurable prefix.

No key is built from unchecked input: ids that reach a key name must match `SAFE_ID`, and a
served model's name (any text, e.g. `Qwen/Qwen2.5-7B-Instruct`) reaches one only as its
`model_tag`. Per-job keys share a hash tag (`{job_id}`) so a job's keys stay in one Redis
Cluster slot; a model's job streams are one key each (partitions spread over slots).
"""

from __future__ import annotations

import hashlib
import re

SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
JOBS_GROUP = "workers"
_PLAIN_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class UnsafeIdError(ValueError):
    """An id that may not be part of a Redis key name."""


def safe_id(value: str) -> str:
    """Return `value` if it may appear in a key name, else raise UnsafeIdError."""
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise UnsafeIdError(f"unsafe id for a Redis key: {value!r}")
    return value


def model_tag(name: str) -> str:
    """The key-safe form of a served model name: the name itself when it is plain
    (`[A-Za-z0-9_.-]`, at most 64 characters), else a readable part plus a digest of the whole
    name (`Qwen_Qwen2.5-7B-Instruct-3f9c0a1b2c`), so two names never share a tag."""
    if _PLAIN_TAG.match(name):
        return name
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    digest = hashlib.blake2b(name.encode(), digest_size=5).hexdigest()
    return f"{readable}-{digest}"


class Keys:
    """Key and channel names under `prefix`."""

    def __init__(self, prefix: str = "chatstream") -> None:
        self.prefix = safe_id(prefix)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- job queue -------------------------------------------------------------------------
    def job_stream(self, model: str, partition: int = 0) -> str:
        """Partition `partition` of served model `model`'s job queue (`--queue-partitions`),
        a stream read by that model's workers' consumer group. Each partition is its own key,
        so on a cluster each lives in its own slot."""
        base = ("model", model_tag(model), "jobs")
        return self._k(*base) if partition == 0 else self._k(*base, f"p{int(partition)}")

    @property
    def models(self) -> str:
        """Hash: served model name -> when a worker of it last heartbeated (ms, Redis clock);
        the models the gateways know (shared/models.py)."""
        return self._k("models")

    @property
    def queue_partitions(self) -> str:
        """String: the partition count the processes sharing this prefix agreed on."""
        return self._k("jobs", "partitions")

    @property
    def dead_letter(self) -> str:
        """Stream of job entries that could not be decoded or ran out of attempts."""
        return self._k("jobs", "dead")

    def job_meta(self, job_id: str) -> str:
        """Hash: attempt (the fence), status, cancel flag, owner worker."""
        return self._k("job", "{" + safe_id(job_id) + "}", "meta")

    def job_events(self, job_id: str) -> str:
        """Short-lived stream of a job's token events, entry id = `<seq>-0`."""
        return self._k("job", "{" + safe_id(job_id) + "}", "events")

    # --- pub/sub ---------------------------------------------------------------------------
    def gateway_channel(self, gateway_id: str) -> str:
        """Channel one gateway process subscribes to; workers publish its jobs' events there."""
        return self._k("gw", safe_id(gateway_id))

    def job_channel(self, job_id: str, gateway_id: str) -> str:
        """Sharded channel of one job for one gateway on a Redis Cluster: in the job's slot (so
        the fenced publish can SPUBLISH to it), one per gateway (so the job's meta can name the
        gateway relaying it now, as `gateway_channel` does on one node)."""
        return self._k("job", "{" + safe_id(job_id) + "}", "ch", safe_id(gateway_id))

    @property
    def control_channel(self) -> str:
        """Broadcast channel from gateways to workers (cancel)."""
        return self._k("control")

    # --- registries ------------------------------------------------------------------------
    @property
    def workers(self) -> str:
        """Sorted set: worker id -> heartbeat expiry (ms, Redis clock)."""
        return self._k("workers")

    def worker(self, worker_id: str) -> str:
        """Hash describing one worker; expires when its heartbeats stop."""
        return self._k("worker", safe_id(worker_id))

    @property
    def gateways(self) -> str:
        """Sorted set: gateway id -> heartbeat expiry (ms, Redis clock)."""
        return self._k("gateways")

    def gateway(self, gateway_id: str) -> str:
        """Hash describing one gateway (its admission settings); expires with its heartbeats."""
        return self._k("gateway", safe_id(gateway_id))

    # --- semaphore -------------------------------------------------------------------------
    @staticmethod
    def model_semaphore(model: str) -> str:
        """Name of the semaphore that caps served model `model`'s running generations."""
        return "model-" + model_tag(model)

    def sem_holders(self, name: str) -> str:
        """Sorted set: permit id -> lease expiry (ms)."""
        return self._k("sem", "{" + safe_id(name) + "}", "holders")

    def sem_waiters(self, name: str) -> str:
        """Sorted set: permit id -> FIFO ticket."""
        return self._k("sem", "{" + safe_id(name) + "}", "waiters")

    def sem_waiter_heartbeats(self, name: str) -> str:
        """Sorted set: permit id -> waiter heartbeat expiry (ms)."""
        return self._k("sem", "{" + safe_id(name) + "}", "waiter_hb")

    def sem_ticket(self, name: str) -> str:
        """Counter handing out FIFO tickets."""
        return self._k("sem", "{" + safe_id(name) + "}", "ticket")

    # --- sessions, feedback -----------------------------------------------------------------
    def session(self, session_id: str) -> str:
        """Hash of one ChatStream session (history, params, timestamps)."""
        return self._k("session", safe_id(session_id))

    def session_lock(self, session_id: str) -> str:
        """Key held while one turn of the session runs."""
        return self._k("session", safe_id(session_id), "lock")

    def session_index(self, owner: str) -> str:
        """Sorted set: session id -> last use (ms) of one API key's sessions (`owner` is the
        key's id, `anon` without keys); bounds how many sessions a key keeps."""
        return self._k("sessions", safe_id(owner))

    @property
    def feedback(self) -> str:
        """Stream of /set_feedback entries."""
        return self._k("feedback")

    def stats_bucket(self, bucket: int) -> str:
        """Hash of what all gateways served in one time bucket (shared/ops_stats.py)."""
        return self._k("stats", str(int(bucket)))
