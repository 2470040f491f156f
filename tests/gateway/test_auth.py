"""API keys, the admin key, per-key and per-session caps, and the start-up secret check.

Through real gateway and mock worker processes on a real Redis, plus unit tests of the pure
parts of gateway/auth.py and gateway/security.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from chatstream_cluster.cli import build_parser
from chatstream_cluster.gateway.admission import Admission
from chatstream_cluster.gateway.auth import (
    ADMIN,
    API,
    OPEN,
    KeyChecker,
    classify,
    is_loopback,
    key_id,
)
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.security import startup_error
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_server import free_port
from chatstream_cluster.shared.settings import (
    DEFAULT_SESSION_SECRET,
    GatewaySettings,
    UpSettings,
    settings_from_args,
)
from tests.cluster import ROOT, wait_until

KEYS = ["sk-test-alpha-0123456789", "sk-test-beta-9876543210"]
ADMIN_KEY = "admin-key-for-tests-42"
CHAT = "/v1/chat/completions"
# ChatStream's endpoints (method, path) and the OpenAI ones: all behind the API keys.
API_ENDPOINTS = [
    ("POST", CHAT), ("GET", "/v1/models"),
    ("POST", "/chat_stream"), ("POST", "/clear_context"), ("GET", "/get_prompt"),
    ("POST", "/set_generation_params"), ("GET", "/get_generation_params"),
    ("POST", "/set_feedback"), ("GET", "/get_load"), ("GET", "/get_resource_usage"),
]


def chat_body(content: str = "hi", max_tokens: int = 5, *, stream: bool = False) -> dict:
    return {"model": "mock", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(cluster):  # noqa: ANN001, ANN201
    """A gateway with two API keys and an admin key, and a mock worker."""
    cluster.start_worker("mock", mock_tokens_per_s=500)
    gateway = cluster.start_gateway(api_keys=KEYS, admin_key=ADMIN_KEY)
    cluster.wait_ready(gateway)
    return gateway


# --- API keys -----------------------------------------------------------------------------------
def test_api_endpoints_want_a_key_and_answer_openai_style_401(keyed) -> None:  # noqa: ANN001
    for method, path in API_ENDPOINTS:
        for headers in ({}, bearer("sk-wrong"), {"Authorization": KEYS[0]},
                        {"Authorization": f"Basic {KEYS[0]}"}, bearer(ADMIN_KEY)):
            resp = httpx.request(method, keyed.url + path, headers=headers, json={}, timeout=5)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in error["message"]
            assert resp.headers["www-authenticate"] == "Bearer"
        if not path.startswith("/v1/"):  # ChatStream clients read success/message
            assert resp.json()["success"] is False and resp.json()["message"]
        ok = httpx.request(method, keyed.url + path, headers=bearer(KEYS[1]), json={}, timeout=5)
        assert ok.status_code != 401, (method, path)
    for path in ("/healthz", "/readyz"):  # probes stay open
        assert httpx.get(keyed.url + path, timeout=5).status_code == 200
    assert httpx.get(keyed.url + "/no/such/path", timeout=5).status_code == 401


def test_the_openai_sdk_api_key_works_unchanged(keyed) -> None:  # noqa: ANN001
    for key in KEYS:
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"


def test_keys_never_reach_the_log(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock")
    gateway = cluster.start_gateway(api_keys=KEYS, admin_key=ADMIN_KEY, log_level="debug")
    cluster.wait_ready(gateway)
    httpx.get(gateway.url + "/v1/models", headers=bearer("sk-guess-" + KEYS[0]), timeout=5)
    httpx.post(gateway.url + CHAT, headers=bearer(KEYS[0]), json=chat_body(), timeout=10)
    httpx.get(gateway.url + "/metrics", headers=bearer(ADMIN_KEY + "x"), timeout=5)
    log = gateway.log()
    assert "request refused" in log  # failures are logged, without the key
    for secret in (*KEYS, ADMIN_KEY):
        assert secret not in log


def test_api_key_flag_is_repeatable_and_env_is_comma_separated(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("CHATSTREAM_API_KEYS", raising=False)
    for command, cls in (("gateway", GatewaySettings), ("up", UpSettings)):
        args = build_parser().parse_args([command, "--api-key", "a", "--api-key", "b",
                                          "--admin-key", "adm"])
        settings = settings_from_args(cls, args)
        assert settings.api_keys == ["a", "b"] and settings.admin_key == "adm"
    monkeypatch.setenv("CHATSTREAM_API_KEYS", "k1, k2,,k3")
    assert GatewaySettings().api_keys == ["k1", "k2", "k3"]
    args = build_parser().parse_args(["gateway", "--api-key", "only"])
    assert settings_from_args(GatewaySettings, args).api_keys == ["only"]  # the flag wins


# --- admin key ----------------------------------------------------------------------------------
def test_a_session_is_invisible_to_every_other_key(keyed) -> None:  # noqa: ANN001
    """Key B holding key A's `sid` cookie gets a fresh session of its own on every ChatStream
    endpoint; A's session is never read or changed through B."""
    alice = httpx.Client(base_url=keyed.url, headers=bearer(KEYS[0]), timeout=10)
    turn = alice.post("/chat_stream", json={"user_input": "the secret of alpha"})
    assert turn.status_code == 200, turn.text
    reply_id = turn.headers["x-chatstream-last-generated-message-id"]
    alice.post("/set_generation_params", json={"temperature": 0.3})
    cookie = alice.cookies["sid"]
    alice_sid = cookie.split(".")[0]
    for method, path, body in [
        ("GET", "/get_prompt", None), ("GET", "/get_generation_params", None),
        ("POST", "/set_feedback", {"is_like": False, "message_id": reply_id}),
        ("POST", "/clear_context", None),
        ("POST", "/set_generation_params", {"temperature": 0.9}),
        ("POST", "/chat_stream", {"regenerate": True}),
    ]:
        with httpx.Client(base_url=keyed.url, headers=bearer(KEYS[1]), timeout=10,
                          cookies={"sid": cookie}) as bob:
            resp = bob.request(method, path, json=body)
        seen = resp.json() if resp.headers["content-type"].startswith("application/json") \
            else {}
        assert "the secret of alpha" not in resp.text, (path, resp.text)
        if path == "/get_prompt":
            assert seen["prompt"] is None
        if path == "/get_generation_params":
            assert seen["generation_params"]["temperature"] == 1.0
        if path == "/set_feedback":
            assert resp.status_code == 404 and seen["error"]["code"] == "message_not_found"
        if path == "/chat_stream":
            assert resp.status_code == 400
            assert seen["error"]["code"] == "nothing_to_regenerate"
        given = resp.cookies.get("sid")
        assert given is None or given.split(".")[0] != alice_sid, path
    # Alice's session is as she left it.
    prompt = alice.get("/get_prompt").json()["prompt"]
    assert "the%20secret%20of%20alpha" in prompt
    assert alice.get("/get_generation_params").json()["generation_params"]["temperature"] == 0.3
    alice.close()


def test_admin_key_and_api_keys_are_separate(keyed) -> None:  # noqa: ANN001
    for path in ("/admin/status", "/metrics"):
        assert httpx.get(keyed.url + path, headers=bearer(KEYS[0]), timeout=5).status_code == 401
        assert httpx.get(keyed.url + path, headers=bearer(ADMIN_KEY), timeout=5).status_code == 200
    assert httpx.get(keyed.url + "/v1/models", headers=bearer(ADMIN_KEY),
                     timeout=5).status_code == 401


def test_without_an_admin_key_admin_endpoints_answer_local_clients_only(cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway()
    for path in ("/admin/status", "/metrics"):
        assert httpx.get(gateway.url + path, timeout=5).status_code == 200  # from 127.0.0.1
        # Through a proxy the client may be anyone: refused, with what to do about it.
        for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
            resp = httpx.get(gateway.url + path, headers={header: "127.0.0.1"}, timeout=5)
            assert resp.status_code == 403, (path, header)
            error = resp.json()["error"]
            assert error["code"] == "admin_key_required"
            assert error["type"] == "permission_error"
            assert "--admin-key" in error["message"]


def _scope(path: str, client: str = "127.0.0.1", headers: dict[str, str] | None = None) -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "path": path, "client": (client, 50000), "headers": raw}


def test_admin_rule_by_client_address() -> None:
    checker = KeyChecker(GatewaySettings())
    for local in ("127.0.0.1", "127.8.9.10", "::1"):
        assert checker.denial(_scope("/admin/status", local)) is None
    for remote in ("10.0.0.7", "192.168.1.2", "2001:db8::1", "0.0.0.0", ""):
        denial = checker.denial(_scope("/metrics", remote))
        assert isinstance(denial, APIError) and denial.status == 403, remote
    keyed = KeyChecker(GatewaySettings(admin_key=ADMIN_KEY))
    assert keyed.denial(_scope("/metrics", "10.0.0.7", bearer(ADMIN_KEY))) is None
    assert keyed.denial(_scope("/metrics", "127.0.0.1")).status == 401  # a key set: always


def test_paths_are_classified_default_deny() -> None:
    assert {classify(p) for p in ("/healthz", "/readyz", "/healthz/", "/openapi.json")} == {OPEN}
    # The browser pages hold no data: the ops page's figures come from /admin/* endpoints.
    assert {classify(p) for p in ("/", "/chatstream.js", "/ui/style.css", "/admin",
                                  "/admin/")} == {OPEN}
    assert {classify(p) for p in ("/admin/status", "/admin/history", "/admin/x/y", "/metrics",
                                  "/metrics/")} == {ADMIN}
    assert {classify(p) for p in ("/v1/chat/completions", "/chat_stream", "/x", "/ui",
                                  "/adminx", "/healthzz", "/v1/../admin/status",
                                  "//admin/status", "/METRICS")} == {API}
    # /v1/../admin/status is not normalised by the router either: it is a 404 behind the keys.


def test_api_key_check_records_the_key_id_not_the_key() -> None:
    checker = KeyChecker(GatewaySettings(api_keys=KEYS))
    scope = _scope("/v1/models", headers=bearer(KEYS[1]))
    assert checker.denial(scope) is None
    assert scope["state"]["api_key_id"] == key_id(KEYS[1]) != key_id(KEYS[0])
    assert len(key_id(KEYS[1])) == 16 and KEYS[1] not in json.dumps(scope["state"])
    assert checker.denial(_scope("/v1/models", headers=bearer(""))).status == 401
    assert checker.denial(_scope("/v1/models", headers=bearer(KEYS[1] + " "))) is None  # trimmed
    padded = KeyChecker(GatewaySettings(api_keys=[" padded-key\n"], admin_key=" adm "))
    assert padded.denial(_scope("/v1/models", headers=bearer("padded-key"))) is None
    assert padded.denial(_scope("/metrics", "10.0.0.1", bearer("adm"))) is None
    open_checker = KeyChecker(GatewaySettings())
    assert open_checker.denial(_scope("/v1/models")) is None


# --- per-key and per-session caps ---------------------------------------------------------------
async def test_per_key_cap_answers_429_and_frees_the_permit_when_done(cluster, redis) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=50, max_batch=8)
    gateway = cluster.start_gateway(api_keys=KEYS, max_concurrent_per_key=1, permit_lease=1.5)
    cluster.wait_ready(gateway)
    holders = Keys(cluster.key_prefix).sem_holders(f"key-{key_id(KEYS[0])}")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as client:
        body = chat_body("long", 400, stream=True)
        async with client.stream("POST", CHAT, json=body, headers=bearer(KEYS[0])) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()
            assert (await anext(lines)).startswith("id:")
            second = await client.post(CHAT, json=chat_body(), headers=bearer(KEYS[0]))
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "per_key_limit"
            assert second.json()["error"]["type"] == "rate_limit_error"
            assert second.headers["retry-after"] == "1"
            other = await client.post(CHAT, json=chat_body(), headers=bearer(KEYS[1]))
            assert other.status_code == 200, other.text  # the cap is per key
            # The gateway refreshes the key's permit like the global one (lease 1.5 s).
            (permit, expiry), = await redis.zrange(holders, 0, -1, withscores=True)
            deadline = time.monotonic() + 5
            while (await redis.zscore(holders, permit) or 0) <= expiry:
                assert time.monotonic() < deadline, "the per-key permit was not refreshed"
                await _pause()
            await lines.aclose()
        for _ in range(100):  # released in cleanup, shortly after the client left
            if await redis.zcard(holders) == 0:
                break
            await _pause()
        assert await redis.zcard(holders) == 0
        again = await client.post(CHAT, json=chat_body(), headers=bearer(KEYS[0]))
        assert again.status_code == 200, again.text
        metrics = (await client.get("/metrics")).text
    assert 'chatstream_rejected_total{model="mock",reason="per_key_limit"} 1.0' in metrics


async def _pause() -> None:
    await asyncio.sleep(0.05)


async def test_per_key_permits_are_built_only_for_a_capped_key(redis_url, key_prefix) -> None:  # noqa: ANN001
    client = aioredis.Redis.from_url(redis_url)
    try:
        uncapped = Admission(client, GatewaySettings(max_concurrent_per_key=0), None,
                             Keys(key_prefix))
        assert uncapped.extra_permits("abc") == []
        settings = GatewaySettings(max_concurrent_per_key=2)
        admission = Admission(client, settings, None, Keys(key_prefix))
        assert admission.extra_permits(None) == []  # keys off: no key id, no cap
        (permit,) = admission.extra_permits("abc")
        assert permit.semaphore.name == "key-abc" and permit.capacity == 2
        await admission.acquire_extra(permit, "job-1", "mock")
        await admission.acquire_extra(permit, "job-2", "mock")
        with pytest.raises(APIError) as info:
            await admission.acquire_extra(permit, "job-3", "mock")
        assert (info.value.status, info.value.code) == (429, "per_key_limit")
        (other,) = admission.extra_permits("def")
        await admission.acquire_extra(other, "job-4", "mock")  # another key: not affected
        await admission.release_extra(permit, "job-1")
        await admission.release_extra(permit, "job-1")  # idempotent
        await admission.acquire_extra(permit, "job-3", "mock")
        for job in ("job-2", "job-3"):
            await admission.release_extra(permit, job)
        await admission.release_extra(other, "job-4")
        assert admission.extra_held == {}
        assert await permit.semaphore.counts() == (0, 0)
    finally:
        await client.aclose()


# --- the start-up check -------------------------------------------------------------------------
def test_startup_error_only_off_loopback_with_the_default_secret() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert startup_error(GatewaySettings(host=host)) is None, host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "gateway.example.com"):
        error = startup_error(GatewaySettings(host=host))
        assert error and "--session-secret" in error and "--allow-default-secret" in error
        assert startup_error(GatewaySettings(host=host, allow_default_secret=True)) is None
        assert startup_error(GatewaySettings(host=host, session_secret="s" * 32)) is None
    assert is_loopback("127.0.0.1") and not is_loopback("0.0.0.0") and not is_loopback(None)
    # `--api-key "$UNSET"` would otherwise leave the API open without a word.
    assert "empty" in startup_error(GatewaySettings(api_keys=["k", " "]))


def _clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
    return {**env, **values}


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatstream_cluster.cli", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_gateway_and_up_refuse_the_default_secret_on_0_0_0_0(tmp_path) -> None:  # noqa: ANN001
    port = free_port()
    env = _clean_env(CHATSTREAM_REDIS_URL="redis://127.0.0.1:1/0")
    result = _run_cli(["gateway", "--host", "0.0.0.0", "--port", str(port)], env)
    assert result.returncode == 2, result
    assert "default session secret" in result.stderr and "--session-secret" in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout

    data_dir = tmp_path / "up-data"
    result = _run_cli(["up", "--host", "0.0.0.0", "--port", str(port), "--model", "mock",
                       "--data-dir", str(data_dir)], env)
    assert result.returncode == 2, result
    assert "default session secret" in result.stderr
    assert not data_dir.exists()  # refused before starting Redis or any child


@pytest.mark.parametrize("how", ["allow", "secret"])
def test_gateway_on_0_0_0_0_starts_when_told_or_given_a_secret(how, redis_url, tmp_path) -> None:  # noqa: ANN001
    port = free_port("0.0.0.0")
    extra = ["--allow-default-secret"] if how == "allow" else []
    env = _clean_env(CHATSTREAM_REDIS_URL=redis_url, CHATSTREAM_LOG_FORMAT="json")
    if how == "secret":
        env["CHATSTREAM_SESSION_SECRET"] = "a-real-secret-" + "x" * 24
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatstream_cluster.cli", "gateway", "--host", "0.0.0.0",
             "--port", str(port), *extra],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:  # loopback traffic only
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 30, what="the gateway on 0.0.0.0")
    finally:
        process.terminate()
        process.wait(15)
    text = log_path.read_text()
    assert "no --api-key" in text  # warned: open to the network
    assert ("default session secret is in use" in text) == (how == "allow")
    assert DEFAULT_SESSION_SECRET not in text
