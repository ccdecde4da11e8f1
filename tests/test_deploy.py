"""Docker is not available here: the Dockerfile is linted by hadolint and deploy/'s YAML by
yamllint (both from the test extra), and what no linter knows is checked by hand: the files
they name exist, and the LORASERVE_* variables they set are real config fields."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from loraserve.server.settings import ENV_PREFIX, FILE_ENV, FLAT, env_name

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
CONFIG_ENV = {env_name(name) for name in FLAT} | {FILE_ENV}


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _instructions(keyword: str) -> list[str]:
    return re.findall(rf"^{keyword}\s+(.+)$", DOCKERFILE, re.M)


def test_hadolint_passes_the_dockerfile_at_style_level():
    done = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
                           "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_passes_deploy():
    done = subprocess.run([_tool("yamllint"), "--strict", "-f", "parsable", "deploy", ".yamllint"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_copies_what_exists_sets_real_config_and_runs_unprivileged_with_a_health_check():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [p.strip().removeprefix("**/") for p in lines if p.strip() and not p.startswith("#")]
    for copy in _instructions("COPY"):
        *sources, _ = copy.split()
        assert all((REPO / s).exists() for s in sources), copy
        # .dockerignore keeps none of them out of the build context (a "**/" pattern matches any part).
        assert not [(s, p) for s in sources for part in Path(s).parts for p in ignored if fnmatch(part, p)], copy
    env = dict(re.findall(rf"({ENV_PREFIX}[A-Z_]+)=(\S+)", DOCKERFILE))
    assert env and set(env) <= CONFIG_ENV, set(env) - CONFIG_ENV
    assert env[f"{ENV_PREFIX}HOST"] == "0.0.0.0"
    assert _instructions("USER")[-1].split(":")[0] not in ("root", "0") and _instructions("HEALTHCHECK")


def test_compose_names_shipped_files_real_config_and_the_image_paths():
    deploy, services = REPO / "deploy", COMPOSE["services"]
    app = services["loraserve"]
    assert (deploy / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in services[name]["volumes"]:
            assert (deploy / volume.split(":")[0]).exists(), volume
    set_here = {k for k in app["environment"] if k.startswith(ENV_PREFIX)}
    assert set_here <= CONFIG_ENV, set_here - CONFIG_ENV
    image_env = dict(re.findall(rf"({ENV_PREFIX}[A-Z_]+)=(\S+)", DOCKERFILE))
    mounts = {re.search(r":(/[^:]+)(?::ro|:rw)?$", v).group(1) for v in app["volumes"]}
    assert {image_env[f"{ENV_PREFIX}MODEL_PATH"], image_env[f"{ENV_PREFIX}ADAPTERS_DIR"]} <= mounts
    prometheus = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    assert all((deploy / "prometheus" / f).exists() for f in prometheus["rule_files"])


def test_compose_wires_traces_metrics_alerts_and_dashboards_to_each_other():
    deploy, services = REPO / "deploy", COMPOSE["services"]
    app, jaeger = services["loraserve"], services["jaeger"]
    assert "jaeger" in app["depends_on"]
    host, port = re.fullmatch(r"http://([^:]+):(\d+)", app["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
    assert host == "jaeger" and any(p.split(":")[-1] == port for p in jaeger["ports"])
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]) == "true"
    prometheus = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == ["loraserve:9464"] and "9464:9464" in app["ports"]
    assert app["environment"][f"{ENV_PREFIX}METRICS_HOST"] == "0.0.0.0"
    managers = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert managers == ["alertmanager:9093"] and "9093:9093" in services["alertmanager"]["ports"]
    source = yaml.safe_load((deploy / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and source["datasources"][0]["isDefault"]
    provider = yaml.safe_load((deploy / "grafana" / "provisioning" / "dashboards" / "loraserve.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert f"./grafana/loraserve.json:{dashboards}/loraserve.json:ro" in services["grafana"]["volumes"]
