"""Offline checks of the Kubernetes manifests in deploy/kubernetes/: no cluster, no kubectl.

- Every resource the kustomization lists exists, and every manifest there is listed.
- Every built-in object validates against the Kubernetes OpenAPI schemas that the PyPI package
  `kubernetes-validate` ships (strict: unknown fields fail), for the oldest and the newest
  Kubernetes version checked here.
- Every KEDA ScaledObject validates against KEDA's own CRD schema, vendored in
  tests/deploy/vendor/keda/ (keda.sh_scaledobjects.yaml and its LICENSE, Apache-2.0, from
  github.com/kedacore/keda at tag v2.20.2, commit 68a5b5028f35b22d50597c69819ab32c4e92f21a),
  with unknown fields refused as `kubectl apply --validate=strict` does, and its Prometheus
  trigger names only the metadata KEDA's Prometheus scaler reads.
- What the deployment relies on holds: one GPU per worker pod, probes through
  `chatstream healthcheck`, a termination grace longer than the drain, a ScaledObject per
  model on that model's figures (min 0) whose threshold is the worker's batch, every served
  model known to the gateways (scale from zero), a gateway HPA on CPU and a PDB, Redis with a
  persistent volume, Prometheus scraping the gateways with the admin key, and every secret
  key the manifests need written by the docs' `secrets.env` step.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.docs import code_facts
from tests.docs.markdown_doc import read_doc

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KEDA_CRD = Path(__file__).parent / "vendor" / "keda" / "keda.sh_scaledobjects.yaml"
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
PROMETHEUS_TRIGGER_KEYS = {  # KEDA v2.20 pkg/scalers/prometheus_scaler.go, triggerMetadata
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
    "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
    "identityOwner",
}


# --- reading the manifests -------------------------------------------------------------------
@functools.cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@functools.cache
def objects() -> list[tuple[str, dict[str, Any]]]:
    """(file, object) for every object of every resource the kustomization lists."""
    found = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                found.append((name, doc))
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for _, obj in objects() if obj["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in of_kind(kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom source."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def worker_deployments() -> list[dict[str, Any]]:
    return [d for d in of_kind("Deployment")
            if container(d).get("command", [])[:2] == ["chatstream", "worker"]]


def gateway_deployment() -> dict[str, Any]:
    (gateway,) = [d for d in of_kind("Deployment")
                  if container(d).get("command", [])[:2] == ["chatstream", "gateway"]]
    return gateway


def seconds(value: str) -> float:
    return float(value)


# --- the kustomization -------------------------------------------------------------------------
def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kustomization()["namespace"] == "chatstream"
    (secrets,) = kustomization()["secretGenerator"]
    assert secrets["envs"] == ["secrets.env"]
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "deploy/kubernetes/secrets.env" in ignored  # secrets are written, never committed


# --- schemas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_objects_match_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, obj in objects():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    kinds = {obj["kind"] for _, obj in objects()}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ConfigMap", "ScaledObject"} <= kinds
    assert checked == len(objects()) - len(of_kind("ScaledObject"))


def test_the_kubernetes_schema_check_has_teeth() -> None:
    broken = copy.deepcopy(gateway_deployment())
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(gateway_deployment())
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever it lists the known ones and does not
    say otherwise (the API server prunes unknown fields silently: a misspelled field would be a
    quiet no-op, so `kubectl --validate=strict` and this check refuse it)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.cache
def scaled_object_validator() -> jsonschema.Validator:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (served,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = _closed(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{served['name']}"}
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def scaled_object_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}"
            for e in scaled_object_validator().iter_errors(obj)]


def test_scaled_objects_match_the_keda_crd() -> None:
    scaled = of_kind("ScaledObject")
    assert len(scaled) == len(worker_deployments()) >= 2
    for obj in scaled:
        assert scaled_object_errors(obj) == [], obj["metadata"]["name"]
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            keys = set(trigger["metadata"])
            assert {"serverAddress", "query", "threshold"} <= keys
            assert keys <= PROMETHEUS_TRIGGER_KEYS, keys - PROMETHEUS_TRIGGER_KEYS


def test_the_keda_schema_check_has_teeth() -> None:
    good = of_kind("ScaledObject")[0]
    for change in (
        lambda o: o["spec"].update(minReplicaCount="zero"),
        lambda o: o["spec"].update(minReplicas=0),  # the HPA's name, not KEDA's
        lambda o: o["spec"].pop("scaleTargetRef"),
        lambda o: o["spec"]["triggers"][0].pop("type"),
        lambda o: o.update(apiVersion="keda.sh/v1"),
    ):
        broken = copy.deepcopy(good)
        change(broken)
        assert scaled_object_errors(broken), broken


# --- what the deployment relies on ---------------------------------------------------------------
def healthcheck_commands(c: dict[str, Any]) -> dict[str, str]:
    probes = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c.get(probe, {}).get("exec", {}).get("command", [])
        probes[probe] = " ".join(command)
    return probes


def test_each_worker_has_one_gpu_probes_and_a_drain_within_its_grace() -> None:
    for deployment in worker_deployments():
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]
        c = container(deployment)
        assert "replicas" not in spec, f"{name}: KEDA owns the replica count"
        for part in ("requests", "limits"):
            assert c["resources"][part]["nvidia.com/gpu"] == 1, name
        assert c["command"][2:] == ["--device", "cuda:0"], name
        env = env_of(c)
        assert env["CHATSTREAM_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        for probe, command in healthcheck_commands(c).items():
            assert 'chatstream healthcheck --worker-id "$CHATSTREAM_WORKER_ID"' in command, (
                name, probe)
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > seconds(env["CHATSTREAM_DRAIN_TIMEOUT"]) + 10, name


def test_each_model_scales_on_its_own_figures_from_zero() -> None:
    gateway_env = env_of(container(gateway_deployment()))
    declared = gateway_env["CHATSTREAM_MODELS"].split(",")
    served = []
    prometheus = named("Service", "chatstream-prometheus")
    address = f"http://{prometheus['metadata']['name']}:{prometheus['spec']['ports'][0]['port']}"
    metrics = code_facts.metric_names()
    for deployment in worker_deployments():
        env = env_of(container(deployment))
        model = env["CHATSTREAM_SERVED_MODEL_NAME"]
        served.append(model)
        (scaled,) = [s for s in of_kind("ScaledObject")
                     if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert scaled["spec"]["minReplicaCount"] == 0
        assert scaled["spec"]["maxReplicaCount"] >= 1
        (trigger,) = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        assert meta["serverAddress"] == address
        assert float(meta["threshold"]) == float(env["CHATSTREAM_MAX_BATCH"])  # per worker
        assert float(meta["activationThreshold"]) == 0  # one waiting request wakes it
        query = meta["query"]
        assert re.findall(r'\{model="([^"]+)"\}', query) == [model, model]
        assert set(re.findall(r"\bchatstream_[a-z_]+", query)) == {
            "chatstream_queue_depth", "chatstream_running"}
        assert all(m in metrics for m in re.findall(r"\bchatstream_[a-z_]+", query))
        assert re.fullmatch(r"max\(chatstream_queue_depth\{[^}]*\}\) \+ "
                            r"max\(chatstream_running\{[^}]*\}\)", query)
    assert sorted(served) == sorted(declared)  # known to the gateways with no worker running
    assert gateway_env["CHATSTREAM_DEFAULT_MODEL"] in declared
    assert float(gateway_env["CHATSTREAM_COLD_START_TIMEOUT"]) > 0


def test_gateways_scale_on_cpu_keep_one_up_and_drain_within_their_grace() -> None:
    gateway = gateway_deployment()
    name = gateway["metadata"]["name"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    c = container(gateway)
    env = env_of(c)
    assert "cpu" in c["resources"]["requests"]  # the HPA's utilisation needs a request
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": name}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > seconds(env["CHATSTREAM_SHUTDOWN_GRACE"]) + seconds(
        env["CHATSTREAM_DRAIN_TIMEOUT"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "chatstream healthcheck --url" in " ".join(c["livenessProbe"]["exec"]["command"])
    for service in ("chatstream-gateway", "chatstream-gateway-headless"):
        assert named("Service", service)["spec"]["selector"].items() <= labels.items()


def test_redis_keeps_its_data_and_everyone_finds_it() -> None:
    redis = named("StatefulSet", "chatstream-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "--appendonly yes" in " ".join(container(redis)["command"])
    assert named("Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    assert named("Service", "chatstream-redis")["spec"]["ports"][0]["port"] == 6379
    for deployment in [gateway_deployment(), *worker_deployments()]:
        env = [e["name"] for e in container(deployment)["env"]]
        assert env.index("REDIS_PASSWORD") < env.index("CHATSTREAM_REDIS_URL")  # $(...) order
        url = env_of(container(deployment))["CHATSTREAM_REDIS_URL"]
        assert url == "redis://:$(REDIS_PASSWORD)@chatstream-redis:6379/0"


def test_prometheus_scrapes_every_gateway_with_the_admin_key() -> None:
    config = yaml.safe_load(named("ConfigMap", "chatstream-prometheus")["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["authorization"]["credentials_file"] == "/etc/chatstream/admin-key"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["chatstream-gateway-headless"] and sd["port"] == 8000
    prometheus = named("Deployment", "chatstream-prometheus")
    volumes = {v["name"]: v for v in prometheus["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(prometheus)["volumeMounts"]}
    assert mounts["admin-key"] == "/etc/chatstream"
    assert volumes["admin-key"]["secret"]["items"] == [
        {"key": "CHATSTREAM_ADMIN_KEY", "path": "admin-key"}]


def secret_keys_needed() -> set[str]:
    """The keys of chatstream-secrets that the manifests read (and may not be left out)."""
    needed = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if ref and ref["name"] == "chatstream-secrets" and not ref.get("optional"):
                needed.add(ref["key"])
            secret = node.get("secret")
            if isinstance(secret, dict) and secret.get("secretName") == "chatstream-secrets":
                needed.update(item["key"] for item in secret.get("items", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, obj in objects():
        walk(obj)
    return needed


def test_the_docs_write_every_secret_the_manifests_read() -> None:
    blocks = [f.code for f in read_doc(REPO / "docs" / "deploy.md").fences
              if "secrets.env" in f.code and "<<" in f.code]
    assert blocks, "docs/deploy.md has no block that writes deploy/kubernetes/secrets.env"
    written = set(re.findall(r"(?m)^([A-Z_]+)=", blocks[0]))
    needed = secret_keys_needed()
    assert needed >= {"REDIS_PASSWORD", "CHATSTREAM_ADMIN_KEY", "CHATSTREAM_SESSION_SECRET"}
    assert needed <= written, needed - written
