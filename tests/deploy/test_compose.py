"""Offline checks of the deploy files: no Docker engine, nothing is built or started.

- Every compose file parses and validates against the Compose specification (the schema that
  check-jsonschema ships).
- Every `chatstream` command that a service, a healthcheck or a Dockerfile runs uses only flags
  that the CLI accepts, and every CHATSTREAM_* variable is a settings field.
- The proxy does not buffer streams, each GPU worker owns one distinct GPU, Prometheus scrapes
  every gateway, and the dashboard shows every metric it is meant to.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = [REPO / "docker-compose.yml", DEPLOY / "docker-compose.worker-node.yml"]
DOCKERFILES = [DEPLOY / "gateway.Dockerfile", DEPLOY / "worker.Dockerfile"]
NGINX_CONF = DEPLOY / "nginx.conf"
PROMETHEUS = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "chatstream.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Cluster-wide gauges: every gateway exports the same value, so a query must take max (by
# model: one series per served model), never sum them across gateways.
CLUSTER_GAUGES = [
    "chatstream_queue_depth",
    "chatstream_running",
    "chatstream_capacity",
    "chatstream_workers",
]
DASHBOARD_METRICS = CLUSTER_GAUGES + [
    "chatstream_time_to_first_token_seconds_bucket",
    "chatstream_generated_tokens_total",
    "chatstream_rejected_total",
    "chatstream_requests_total",
]
# CHATSTREAM_* names used by the deploy files that are not settings fields (none so far).
DOCUMENTED_NON_SETTINGS: set[str] = set()


# --- helpers ---------------------------------------------------------------------------------


@functools.cache
def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())  # resolves anchors and `<<` merge keys
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


def all_services() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path.name, name, service)
        for path in COMPOSE_FILES
        for name, service in load_compose(path)["services"].items()
    ]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def shell_words(script: str) -> list[list[str]]:
    """Split a shell snippet into simple commands (on ;, &&, ||, |)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def command_words(value: Any, *, compose: bool) -> list[list[str]]:
    """The simple commands in a compose `command`/healthcheck `test` or a Dockerfile instruction."""
    if value is None:
        return []
    if isinstance(value, str):
        # Compose turns $$ into $ before the container's shell sees it.
        return shell_words(value.replace("$$", "$") if compose else value)
    words = [str(w) for w in value]
    if words and words[0] in ("CMD", "NONE"):
        words = words[1:]
    if words and words[0] == "CMD-SHELL":
        return shell_words(" ".join(words[1:]).replace("$$", "$") if compose else words[1])
    if len(words) >= 3 and words[0] in ("sh", "/bin/sh", "bash") and words[1] == "-c":
        return shell_words(words[2])
    return [words]


def chatstream_calls(commands: list[list[str]]) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) for each `chatstream <subcommand> ...` among the commands."""
    calls = []
    for words in commands:
        # The program is the first word after `exec`, `!` and VAR=value assignments.
        i = 0
        while i < len(words) and (words[i] in ("exec", "!") or re.match(r"\w+=", words[i])):
            i += 1
        program = words[i] if i < len(words) else ""
        if (program == "chatstream" or program.endswith("/bin/chatstream")) and i + 1 < len(words):
            flags = [w.split("=", 1)[0] for w in words[i + 2 :] if w.startswith("--")]
            calls.append((words[i + 1], flags))
    return calls


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def dockerfile_commands(path: Path) -> list[list[str]]:
    commands = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "HEALTHCHECK":
            rest = re.sub(r"^(--\S+\s+)*CMD\s+", "", rest)
        elif keyword not in ("RUN", "CMD"):
            continue
        if rest.startswith("["):
            commands += command_words(json.loads(rest), compose=False)
        else:
            commands += shell_words(rest)
    return commands


def usages() -> list[tuple[str, str, list[str]]]:
    """(where, subcommand, flags) for every `chatstream` call in compose files and Dockerfiles."""
    found = []
    for file, name, service in all_services():
        where = f"{file}: {name}"
        found += [
            (where, s, f)
            for s, f in chatstream_calls(command_words(service.get("command"), compose=True))
        ]
        test = (service.get("healthcheck") or {}).get("test")
        found += [
            (f"{where} healthcheck", s, f)
            for s, f in chatstream_calls(command_words(test, compose=True))
        ]
    for path in DOCKERFILES:
        found += [(path.name, s, f) for s, f in chatstream_calls(dockerfile_commands(path))]
    return found


@functools.cache
def cli_help(subcommand: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "chatstream_cluster.cli", subcommand, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"`chatstream {subcommand} --help` failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    )
    return proc.stdout


def nginx_directives(text: str) -> list[tuple[str, str]]:
    """(name, arguments) of every simple directive, comments removed."""
    text = re.sub(r"#[^\n]*", "", text)
    return [(m[1], m[2].strip()) for m in re.finditer(r"(?m)^\s*([a-z_0-9]+)\s+([^;{}]*);", text)]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def gateway_services(compose: dict[str, Any]) -> dict[str, int]:
    """Gateway service name -> the port its `chatstream gateway --port` binds."""
    result = {}
    for name, service in compose["services"].items():
        words = command_words(service.get("command"), compose=True)
        for sub, _ in chatstream_calls(words):
            if sub == "gateway":
                argv = words[0]
                result[name] = int(argv[argv.index("--port") + 1])
    return result


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


# --- 1. the compose files are valid ----------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path) -> None:
    load_compose(path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_compose_spec_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above has teeth: a typo'd key and a bad GPU reservation fail it."""
    broken = tmp_path / "compose.yml"
    broken.write_text(
        "services:\n  w:\n    image: x\n    comand: [a]\n"
        "    deploy: {resources: {reservations: {devices: [{driver: nvidia, device_ids: '0'}]}}}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(broken),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr


# --- 2. the commands and variables match the CLI and the settings ----------------------------


def test_deploy_files_run_the_expected_chatstream_commands() -> None:
    subcommands = {sub for _, sub, _ in usages()}
    assert {"gateway", "worker", "healthcheck"} <= subcommands, subcommands


@pytest.mark.parametrize("subcommand", ["gateway", "worker", "healthcheck"])
def test_every_flag_used_is_accepted_by_the_cli(subcommand: str) -> None:
    used = [(where, flags) for where, sub, flags in usages() if sub == subcommand]
    accepted = set(re.findall(r"--[a-z0-9][a-z0-9-]*", cli_help(subcommand)))
    unknown = [(where, flag) for where, flags in used for flag in flags if flag not in accepted]
    assert not unknown, f"flags `chatstream {subcommand} --help` does not list: {unknown}"


def test_no_other_chatstream_subcommands_are_used() -> None:
    others = {
        (where, sub)
        for where, sub, _ in usages()
        if sub not in ("gateway", "worker", "healthcheck")
    }
    assert not others, f"add a test of their flags too: {others}"


def chatstream_variables() -> dict[str, set[str]]:
    """CHATSTREAM_* name -> where it is used (container env, ${...} interpolation, Dockerfiles)."""
    names: dict[str, set[str]] = {}
    pattern = re.compile(r"\bCHATSTREAM_[A-Z0-9_]+")
    for path in COMPOSE_FILES:
        for name, service in load_compose(path)["services"].items():
            for key in environment_of(service):
                names.setdefault(key, set()).add(f"{path.name}: {name}")
        for match in pattern.findall(path.read_text()):
            names.setdefault(match, set()).add(path.name)
    for path in DOCKERFILES:
        for match in pattern.findall(path.read_text()):
            names.setdefault(match, set()).add(path.name)
    return {k: v for k, v in names.items() if k.startswith("CHATSTREAM_")}


def test_every_chatstream_variable_is_a_settings_field() -> None:
    from chatstream_cluster.shared.settings import GatewaySettings, WorkerSettings

    fields = set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields)
    variables = chatstream_variables()
    assert "CHATSTREAM_REDIS_URL" in variables
    unknown = {
        name: sorted(where)
        for name, where in variables.items()
        if name.removeprefix("CHATSTREAM_").lower() not in fields
        and name not in DOCUMENTED_NON_SETTINGS
    }
    assert not unknown, f"not a GatewaySettings/WorkerSettings field: {unknown}"


def test_non_settings_variables_are_documented() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert all(name in docs for name in DOCUMENTED_NON_SETTINGS)


def test_every_chatstream_service_can_reach_redis() -> None:
    for file, name, service in all_services():
        calls = chatstream_calls(command_words(service.get("command"), compose=True))
        if any(sub in ("gateway", "worker") for sub, _ in calls):
            assert environment_of(service).get("CHATSTREAM_REDIS_URL"), (file, name)


def test_worker_ids_are_distinct_and_match_the_healthcheck() -> None:
    for path in COMPOSE_FILES:
        ids = []
        for name, service in load_compose(path)["services"].items():
            calls = chatstream_calls(command_words(service.get("command"), compose=True))
            if not any(sub == "worker" for sub, _ in calls):
                continue
            worker_id = environment_of(service).get("CHATSTREAM_WORKER_ID")
            assert worker_id, f"{path.name}: {name} needs CHATSTREAM_WORKER_ID for its healthcheck"
            ids.append(worker_id)
            health = chatstream_calls(command_words(service["healthcheck"]["test"], compose=True))
            assert health and "--worker-id" in health[0][1], (path.name, name)
            assert "$$CHATSTREAM_WORKER_ID" in service["healthcheck"]["test"][1], (path.name, name)
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate worker ids {ids}"


def test_gateway_image_installs_the_base_only_and_the_worker_image_the_worker_extra() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    base = " ".join(pyproject["project"]["dependencies"])
    assert "torch" not in base and "transformers" not in base
    extras = pyproject["project"]["optional-dependencies"]
    assert any(r.startswith("torch") for r in extras["worker"])
    gateway = (DEPLOY / "gateway.Dockerfile").read_text()
    installs = [line for line in gateway.splitlines() if "pip install" in line]
    assert installs == ["RUN pip install /src && rm -rf /src"], installs
    assert '! python -c "import torch"' in gateway
    worker = (DEPLOY / "worker.Dockerfile").read_text()
    assert 'uv pip install "/src[worker]"' in worker


# --- 3. the proxy, the GPUs, Prometheus and Grafana ------------------------------------------


def test_nginx_streams_without_buffering() -> None:
    directives = nginx_directives(NGINX_CONF.read_text())
    values: dict[str, list[str]] = {}
    for name, args in directives:
        values.setdefault(name, []).append(args)
    assert values["proxy_buffering"] == ["off"]
    assert values["proxy_cache"] == ["off"]
    assert values["proxy_http_version"] == ["1.1"]
    assert 'Connection ""' in values["proxy_set_header"]
    assert "X-Accel-Buffering" in values["proxy_pass_header"]
    assert min(seconds(v) for v in values["proxy_read_timeout"]) >= 3600
    assert min(seconds(v) for v in values["proxy_send_timeout"]) >= 3600
    assert values["proxy_pass"] == ["http://chatstream_gateways"]


def test_nginx_balances_over_every_gateway_service() -> None:
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    upstream = re.search(r"upstream\s+chatstream_gateways\s*\{(.*?)\}", text, re.S)
    assert upstream
    servers = {m[1]: int(m[2]) for m in re.finditer(r"server\s+([\w.-]+):(\d+)", upstream[1])}
    gateways = gateway_services(load_compose(REPO / "docker-compose.yml"))
    assert set(gateways) >= {"gateway-1", "gateway-2"}
    assert servers == gateways


def test_each_gpu_worker_reserves_one_distinct_gpu() -> None:
    for path in COMPOSE_FILES:
        seen: dict[str, str] = {}
        for name, service in load_compose(path)["services"].items():
            devices = gpu_devices(service)
            words = command_words(service.get("command"), compose=True)
            calls = chatstream_calls(words)
            is_gpu_worker = any(
                sub == "worker" and "--device" in flags for sub, flags in calls
            ) and "cuda" in " ".join(words[0])
            if not devices:
                assert not is_gpu_worker, f"{path.name}: {name} runs on CUDA without a GPU"
                continue
            assert is_gpu_worker, f"{path.name}: {name} reserves a GPU but is no CUDA worker"
            assert len(devices) == 1, (path.name, name)
            device = devices[0]
            assert device["driver"] == "nvidia", (path.name, name)
            assert "gpu" in device["capabilities"], (path.name, name)
            assert "count" not in device, (path.name, name)
            assert len(device["device_ids"]) == 1, (path.name, name)
            gpu = str(device["device_ids"][0])
            assert gpu not in seen, f"{path.name}: {name} and {seen[gpu]} both reserve GPU {gpu}"
            seen[gpu] = name
            # The reservation hides every other GPU: the one left is cuda:0 inside.
            argv = words[0]
            assert argv[argv.index("--device") + 1] == "cuda:0", (path.name, name)
        assert len(seen) >= 2, f"{path.name}: expected a worker per GPU, found {seen}"


def test_prometheus_scrapes_every_gateway_with_the_admin_key() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    compose = load_compose(REPO / "docker-compose.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["chatstream-gateway"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{port}" for name, port in gateway_services(compose).items()}
    assert {"gateway-1:8000", "gateway-2:8000"} <= targets
    assert job.get("metrics_path", "/metrics") == "/metrics"
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    secret = Path(auth["credentials_file"])
    assert secret.parent == Path("/run/secrets")
    assert secret.name in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"][secret.name] == {"environment": "CHATSTREAM_ADMIN_KEY"}
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def dashboard_expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in dashboard_expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in dashboard_expressions(v)]
    return []


def test_dashboard_shows_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = dashboard_expressions(dashboard)
    missing = [m for m in DASHBOARD_METRICS if not any(m in e for e in expressions)]
    assert not missing, missing
    assert any("histogram_quantile(0.5," in e for e in expressions)
    assert any("histogram_quantile(0.99," in e for e in expressions)
    assert any(re.search(r"rate\(chatstream_generated_tokens_total\[", e) for e in expressions)
    assert any(re.search(r"rate\(chatstream_rejected_total\[", e) for e in expressions)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_takes_max_of_cluster_gauges_never_sum() -> None:
    for expr in dashboard_expressions(json.loads(DASHBOARD.read_text())):
        for gauge in CLUSTER_GAUGES:
            for m in re.finditer(rf"(\w+)\s*(?:by\s*\([^)]*\)\s*)?\(\s*{gauge}\b", expr):
                assert m[1] == "max", f"{gauge} must be aggregated with max: {expr}"
            if re.search(rf"\b{gauge}\b", expr):  # per model (or over all of them)
                assert re.search(rf"max\s*(by\s*\(\s*(model)?\s*\)\s*)?\(\s*{gauge}\b", expr), expr


def test_grafana_provisioning_matches_the_dashboard_and_the_mounts() -> None:
    compose = load_compose(REPO / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    datasources = [
        ds
        for f in (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    uids = {ds["uid"] for ds in datasources if ds["type"] == "prometheus"}
    assert {ds["url"] for ds in datasources} == {"http://prometheus:9090"}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
    providers = [
        p
        for f in (GRAFANA_PROVISIONING / "dashboards").glob("*.yml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_images_run_as_non_root_with_a_healthcheck() -> None:
    for path in DOCKERFILES:
        instructions = dockerfile_instructions(path)
        users = [rest for keyword, rest in instructions if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), path.name
        assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions), path.name
    gateway = (DEPLOY / "gateway.Dockerfile").read_text()
    worker = (DEPLOY / "worker.Dockerfile").read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim\b", gateway)
    installs = [
        rest
        for keyword, rest in dockerfile_instructions(DEPLOY / "gateway.Dockerfile")
        if keyword == "RUN" and "pip install" in rest
    ]
    assert installs and not any(re.search(r"torch|transformers", rest) for rest in installs)
    assert re.search(r"(?m)^ARG CUDA_BASE=nvidia/cuda:\S+", worker)
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", worker)


# --- Redis Cluster and Sentinel variants (override files of docker-compose.yml) ---------------

REDIS_VARIANTS = {
    DEPLOY / "docker-compose.redis-cluster.yml": "cluster",
    DEPLOY / "docker-compose.redis-sentinel.yml": "sentinel",
}


def compose_merge(base: Any, override: Any) -> Any:
    """What `docker compose -f base -f override` sees, closely enough to validate it: mappings
    merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = compose_merge(base.get(key), value) if key in base else value
        return out
    return override


def interpolate_defaults(value: str) -> str:
    """${VAR:-default} -> default, ${VAR} and ${VAR:?msg} -> "" (no .env here)."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m[1] or "", value)


def merged_variant(path: Path) -> dict[str, Any]:
    return compose_merge(load_compose(REPO / "docker-compose.yml"), load_compose(path))


@pytest.mark.parametrize("path", REDIS_VARIANTS, ids=lambda p: p.name)
def test_redis_variant_matches_the_compose_spec_alone_and_merged(
    path: Path, tmp_path: Path
) -> None:
    merged = tmp_path / "merged.yml"
    merged.write_text(yaml.safe_dump(merged_variant(path)))
    for file in (path, merged):
        proc = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
             "vendor.compose-spec", str(file)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, (file.name, proc.stdout + proc.stderr)


@pytest.mark.parametrize("path", REDIS_VARIANTS, ids=lambda p: p.name)
def test_redis_variant_points_every_process_at_its_redis(path: Path) -> None:
    from chatstream_cluster.shared.redis_topology import parse_redis_url
    from chatstream_cluster.shared.settings import GatewaySettings, WorkerSettings

    compose = merged_variant(path)
    services = compose["services"]
    hostnames = {svc.get("hostname", name) for name, svc in services.items()} | set(services)
    processes = 0
    for name, service in services.items():
        calls = chatstream_calls(command_words(service.get("command"), compose=True))
        if not any(sub in ("gateway", "worker") for sub, _ in calls):
            continue
        processes += 1
        env = environment_of(service)
        topology = parse_redis_url(interpolate_defaults(env["CHATSTREAM_REDIS_URL"]))
        assert topology.kind == REDIS_VARIANTS[path], (path.name, name)
        assert {host for host, _ in topology.hosts} <= hostnames, (path.name, name)
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, (path.name, name, dependency)
        settings = {k.removeprefix("CHATSTREAM_").lower(): v for k, v in env.items()
                    if k.startswith("CHATSTREAM_")}
        fields = set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields)
        assert set(settings) <= fields, (path.name, name, set(settings) - fields)
    assert processes >= 5, f"{path.name}: gateways and workers not all overridden"
    for name, service in load_compose(path)["services"].items():
        assert name in services and (service.get("image") or services[name].get("image")), name
