"""The metrics, alert rules and dashboard against the real thing: Debian's `prometheus` package
(`promtool` lints the live /metrics and checks and unit-tests the rules; a real Prometheus
scrapes a live server under traffic and evaluates the rules and every dashboard expression).
Skipped, with the reason, where the binaries are absent; .ci/run installs them."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import PROMPT, REPO, ServerThread, room_for_one_in_ram
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "loraserve.json"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus; "
                                                             ".ci/run installs it)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package "
                                                                 "prometheus; .ci/run installs it)")
# What Grafana puts in for its variables, so an expression can be evaluated outside it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$adapter": ".*"}


def promtool(*args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, timeout=60)
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, out
    return out


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def ask(stub, adapter: str) -> None:
    stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=4), timeout=60)


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", ())]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    return exprs


def metric_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, labelled metrics with no sample yet included."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names |= {name} if kind != "histogram" else {f"{name}_{s}" for s in ("bucket", "sum", "count")}
    return names


@needs_promtool
def test_live_metrics_pass_promtool_lint(server):
    with server.channel() as ch:
        ask(inference_pb2_grpc.InferenceServiceStub(ch), "legal")
    exposition = scrape(server.server.metrics_port)
    assert 'adapter="legal"' in exposition
    assert promtool("check", "metrics", stdin=exposition.encode()).strip() == ""


@needs_promtool
def test_rules_config_and_rule_unit_tests_pass_promtool():
    assert "SUCCESS" in promtool("check", "config", str(RULES.parent / "prometheus.yml"))
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    assert "SUCCESS" in promtool("test", "rules", str(RULES.parent / "rules_test.yml"))


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("requests by adapter", "hit ratio", "latency", "memory breakdown", "load vs generation",
                   "evictions per hour", "thrash", "queue depth and running rows", "device time", "tokens"):
        assert wanted in titles, wanted
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]


@needs_promtool
def test_every_dashboard_expression_parses_and_names_real_series(server, tmp_path):
    """promtool has no PromQL checker of its own, so each expression becomes a recording rule."""
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                        for i, e in enumerate(dashboard_exprs())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    known = metric_names(scrape(server.server.metrics_port))
    known |= {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    alerts = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for expr in dashboard_exprs() + alerts:
        for name in re.findall(r"\b(?:loraserve[_:][a-z0-9_:]+|process_[a-z_]+)", expr):
            assert name in known, f"{name} in {expr!r} is no metric the server exposes nor a recorded rule"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusAPI:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        try:
            return json.loads(urllib.request.urlopen(url, timeout=5).read())
        except urllib.error.HTTPError as err:  # bad_data answers 400 with a JSON body
            return json.loads(err.read())

    def query(self, expr: str) -> list[dict]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.base}/-/ready", timeout=2).status == 200
        except OSError:
            return False


def eventually(check, timeout_s: float = 20.0, what: str = ""):
    """Poll `check` until it returns something truthy, or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"not within {timeout_s} s: {what}"
            return got
        time.sleep(0.25)


@needs_prometheus
def test_a_real_prometheus_scrapes_a_live_server_evaluates_the_rules_and_fires_thrash(demo_dir, tmp_path):
    # One adapter per tier and two adapter labels: rotating three adapters reads each from disk
    # every time (thrash, limit 1) and the third adapter is counted as _other.
    srv = ServerThread(room_for_one_in_ram(demo_dir, thrash_limit=1, max_loras=1, metrics_adapter_labels=2))
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "loraserve",
                                  "static_configs": [{"targets": [f"127.0.0.1:{srv.server.metrics_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                   "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    api = PrometheusAPI(port)
    try:
        eventually(api.ready, what="prometheus ready")
        # Counters must have a sample from before the traffic, or their rates have no increase to see.
        eventually(lambda: api.query('up{job="loraserve"} == 1'), what="a first scrape")
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            for adapter in ("legal", "medical", "support") * 2:
                ask(stub, adapter)
            with pytest.raises(grpc.RpcError):
                ask(stub, "ghost")

        def adapters_seen():
            series = api.query("sum by (adapter) (loraserve_requests_total)")
            return {s["metric"]["adapter"] for s in series} if len(series) == 4 else None

        assert eventually(adapters_seen, what="per-adapter series") == {"legal", "medical", "_other", "-"}
        for histogram in ("time_to_first_token", "request_duration", "adapter_load"):
            assert api.query(f'{"loraserve_" + histogram + "_seconds_count"}{{adapter="legal"}}'), histogram

        def hit_ratio():  # NaN (0/0) until two scrapes a request apart are inside the rule's window
            ratios = [float(s["value"][1]) for s in api.query('loraserve:cache_hit_ratio:rate5m{tier="vram"}')]
            return [r for r in ratios if not math.isnan(r)]

        assert eventually(hit_ratio, what="hit-ratio rule") == [0.0]  # every request read its adapter from disk

        def thrash_alert():
            alerts = api.get("/api/v1/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "LoraServeAdapterThrashing"
                    and a["state"] == "firing"]

        firing = eventually(thrash_alert, what="LoraServeAdapterThrashing firing")
        assert firing[0]["labels"]["severity"] == "warning" and firing[0]["labels"]["job"] == "loraserve"
        rules = api.get("/api/v1/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        for expr in dashboard_exprs():
            api.query(expr)  # each evaluates on the live series
        assert api.query('sum by (device, component) (loraserve_memory_bytes)')
        assert api.query('sum by (client) (loraserve_device_seconds_total{phase="decode"}) > 0')
    finally:
        prometheus.terminate()
        _, stderr = prometheus.communicate(timeout=30)
        srv.stop()
    assert b"level=error" not in stderr, stderr.decode()[-2000:]
