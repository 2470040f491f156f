"""Redis with a password and over TLS (`rediss://`), and key names from hostile input.

The password tests run a real password-protected redis-server. The bundled redis-server has no
TLS, so the TLS test puts a TLS-terminating proxy (like stunnel, or a cloud Redis's TLS
endpoint) in front of it, with a self-signed certificate that the clients verify; it is skipped
when no `openssl` command is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError

from chatstream_cluster.gateway.dispatcher import Dispatcher
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.generation import ResumePoint
from chatstream_cluster.gateway.resume import parse_last_event_id
from chatstream_cluster.gateway.security import redis_error
from chatstream_cluster.shared.keys import Keys, UnsafeIdError, safe_id
from chatstream_cluster.shared.redis_client import (
    make_pubsub_redis,
    make_redis,
    redact_url,
    tls_defaults,
)
from chatstream_cluster.shared.redis_server import RedisServer, free_port
from tests.cluster import ROOT, Cluster, wait_until

PASSWORD = "pw-for-tests-7f3a"
CHAT = "/v1/chat/completions"


def chat(url: str) -> httpx.Response:
    return httpx.post(url + CHAT, timeout=15, json={
        "model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


@pytest.fixture(scope="module")
def protected(tmp_path_factory) -> Iterator[RedisServer]:  # noqa: ANN001
    server = RedisServer(tmp_path_factory.mktemp("redis-pw"), appendonly=False,
                         password=PASSWORD).start()
    yield server
    server.stop()


# --- password ----------------------------------------------------------------------------------
def test_gateway_and_worker_work_through_a_password(protected, key_prefix, tmp_path) -> None:  # noqa: ANN001
    assert PASSWORD in protected.url
    procs = Cluster(protected.url, key_prefix, tmp_path)
    try:
        worker = procs.start_worker("mock")
        gateway = procs.start_gateway()
        procs.wait_ready(gateway)
        reply = chat(gateway.url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(gateway.url + "/admin/status", timeout=5).json()["workers"]
        for proc in (gateway, worker):
            assert PASSWORD not in proc.log()
    finally:
        procs.stop()


def _gateway(url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
    env.update(CHATSTREAM_REDIS_URL=url, CHATSTREAM_PORT=str(free_port()))
    return subprocess.run([sys.executable, "-m", "chatstream_cluster.cli", "gateway"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_a_wrong_or_missing_password_stops_the_gateway_with_a_clear_error(  # noqa: ANN001
    protected, tmp_path
) -> None:
    wrong = protected.url.replace(PASSWORD, "not-the-password")
    missing = f"redis://127.0.0.1:{protected.port}/0"
    for url in (wrong, missing):
        result = _gateway(url, tmp_path)
        assert result.returncode == 2, result
        assert f"Redis at {redact_url(url)} refused the credentials" in result.stderr
        assert "redis://:PASSWORD@host" in result.stderr  # says how to fix it
        assert "not-the-password" not in result.stderr + result.stdout
    assert redis_error(wrong) and redis_error(protected.url) is None
    assert redis_error(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5) is None  # not yet up
    assert redis_error("http://example.com") and "invalid --redis-url" in redis_error("http://x")


def test_a_worker_with_a_wrong_password_logs_why(protected, key_prefix, tmp_path) -> None:  # noqa: ANN001
    procs = Cluster(protected.url.replace(PASSWORD, "nope-nope"), key_prefix, tmp_path)
    try:
        worker = procs.start_worker("mock")
        wait_until(lambda: "invalid username-password pair" in worker.log(), 15,
                   what="the worker's log line")
        assert "nope-nope" not in worker.log()
        # It retries (the password may be fixed in Redis) and, before it ever connected,
        # does not stop on SIGTERM: kill it rather than wait for procs.stop()'s grace period.
        worker.kill()
    finally:
        procs.stop()


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:s3cret@h:6380/1") == "rediss://user:***@h:6380/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


# --- TLS ---------------------------------------------------------------------------------------
async def test_rediss_urls_build_ssl_connection_pools() -> None:
    for client in (make_redis("rediss://:pw@redis.example.com:6380/2?ssl_cert_reqs=required"),
                   make_pubsub_redis("rediss://redis.example.com:6380/0")):
        pool = client.connection_pool
        assert issubclass(pool.connection_class, aioredis.SSLConnection)
        connection = pool.make_connection()
        assert connection.ssl_context.cert_reqs == ssl.CERT_REQUIRED
        assert (connection.host, connection.port) == ("redis.example.com", 6380)
        await client.aclose()


async def test_rediss_urls_verify_certificates_and_host_names_whatever_redis_py_defaults() -> None:
    """Our own settings, not redis-py's defaults (which check host names only from 6.0): every
    pool we build for rediss:// asks for both; the URL's query still overrides them."""
    url = "rediss://redis.example.com:6380/0"
    dispatcher = Dispatcher(url, Keys("p"), "gw")
    pools = [make_redis(url).connection_pool, make_pubsub_redis(url).connection_pool,
             dispatcher._pool]  # noqa: SLF001
    for pool in pools:
        assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
        assert pool.connection_kwargs["ssl_check_hostname"] is True
        await pool.aclose()
    assert tls_defaults("redis://h:6379/0") == {}
    off = make_redis(url + "?ssl_cert_reqs=none")
    assert off.connection_pool.connection_kwargs["ssl_check_hostname"] is False
    assert off.connection_pool.make_connection().ssl_context.get().verify_mode == ssl.CERT_NONE
    await off.aclose()
    no_host = make_redis(url + "?ssl_check_hostname=false").connection_pool.connection_kwargs
    assert (no_host["ssl_cert_reqs"], no_host["ssl_check_hostname"]) == ("required", False)
    plain = make_redis("redis://:pw@h:6379/0")
    plain_class = plain.connection_pool.connection_class
    assert issubclass(plain_class, aioredis.Connection)
    assert not issubclass(plain_class, aioredis.SSLConnection)
    assert plain.connection_pool.connection_kwargs["password"] == "pw"
    await plain.aclose()
    ca = make_redis("rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false")
    kwargs = ca.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["ssl_check_hostname"] is False
    await ca.aclose()


class TLSProxy:
    """Terminates TLS on a loopback port and forwards the bytes to a plain Redis port."""

    def __init__(self, target_port: int, certfile: Path, keyfile: Path) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certfile, keyfile)
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TLSProxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        # Failed handshakes (the test's unverified client) are expected: keep them quiet.
        self._loop.set_exception_handler(lambda _loop, _context: None)
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:  # noqa: ANN001
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_gateway_and_worker_work_over_tls_with_a_verified_certificate(  # noqa: ANN001
    protected, certificate, key_prefix, tmp_path
) -> None:
    cert, key = certificate
    with TLSProxy(protected.port, cert, key) as proxy:
        url = f"rediss://:{PASSWORD}@localhost:{proxy.port}/0?ssl_ca_certs={cert}"
        assert redis_error(url) is None
        procs = Cluster(url, key_prefix, tmp_path)
        try:
            procs.start_worker("mock")
            gateway = procs.start_gateway()
            procs.wait_ready(gateway)
            async with httpx.AsyncClient(timeout=15) as client:
                reply = await client.post(gateway.url + CHAT, json={
                    "model": "mock", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            assert proxy.handshakes >= 3  # gateway pool, gateway pub/sub, worker
        finally:
            procs.stop()
        # Certificates are verified by default: without the CA the self-signed one is refused,
        # and so is the right certificate under another host name (it names only localhost).
        unverified = make_redis(url.split("?")[0])
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await unverified.ping()
        await unverified.aclose()
        by_ip = url.replace("@localhost:", "@127.0.0.1:")
        wrong_host = make_redis(by_ip)
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await wrong_host.ping()
        await wrong_host.aclose()
        assert "refused the credentials" not in (redis_error(by_ip) or "")  # only a warning
        unchecked = make_redis(by_ip + "&ssl_check_hostname=false")  # the URL may opt out
        assert await unchecked.ping()
        await unchecked.aclose()


# --- key names from hostile input --------------------------------------------------------------
HOSTILE = ["", "a b", "x}:{y", "../../etc", "sid\r\nFLUSHALL", "*", "ü", "a" * 129, "k:\x00",
           "{job}"]


def test_hostile_ids_never_become_key_names() -> None:
    keys = Keys("p")
    builders = [keys.job_meta, keys.job_events, keys.session, keys.session_lock, keys.worker,
                keys.gateway_channel, keys.sem_holders]
    for hostile in HOSTILE:
        for build in builders:
            with pytest.raises(UnsafeIdError):
                build(hostile)
    with pytest.raises(UnsafeIdError):
        Keys("bad prefix")
    assert safe_id("0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"


def test_hostile_last_event_ids_are_rejected_before_any_key() -> None:
    good = "0123456789abcdef0123456789abcdef"
    assert parse_last_event_id(f"{good}:7") == ResumePoint(good, 7)
    assert parse_last_event_id("") is None  # no header: not a resume
    for hostile in (*HOSTILE[1:], f"{good}:-1", f"{good}:1:2", f"../{good}:1", f"{good}x:1",
                    f"{good}:99999999999", f"{good.upper()}:1", f"{good}:1\r\nX: y"):
        with pytest.raises(APIError) as info:
            parse_last_event_id(hostile)
        assert info.value.status == 400


def test_hostile_last_event_id_and_sid_through_a_gateway(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock")
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}], "stream": True}
    for hostile in ("../../x:1", "a" * 32 + ":1}", "*:1"):
        resp = httpx.post(gateway.url + CHAT, json=body, headers={"Last-Event-ID": hostile},
                          timeout=5)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_last_event_id"
    # A forged or garbage sid cookie is not a session id: the gateway starts a new session.
    for sid in ("../../x", "x}:{y", "a" * 500, "abc.def.ghi"):
        resp = httpx.get(gateway.url + "/get_generation_params", cookies={"sid": sid}, timeout=5)
        assert resp.status_code == 200, resp.text
        assert resp.cookies.get("sid") not in (None, sid)
