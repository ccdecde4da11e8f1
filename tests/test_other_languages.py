"""Clients in other languages from the repository's proto/ directory alone: a Node client
(tests/node/call.js: @grpc/grpc-js and @grpc/proto-loader), buf's lint, and buf.gen.yaml's
TypeScript stubs (ts-proto). npm packages are installed once into var/cache/node. Skipped,
saying why, where node or npm is missing or the registry cannot be reached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import PROMPT, REPO
from test_contract_v2 import QUESTION

pytestmark = pytest.mark.slow

PACKAGES = {"@grpc/grpc-js": "1.14.7", "@grpc/proto-loader": "0.8.1", "ts-proto": "2.18.0"}
BUF = "@bufbuild/buf@1.75.0"
CACHE = REPO / "var" / "cache" / "node"


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    modules = CACHE / "node_modules"
    if not all((modules / name / "package.json").exists() for name in PACKAGES):
        CACHE.mkdir(parents=True, exist_ok=True)
        # Saved into CACHE/package.json: a later install there keeps what an earlier one added.
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE),
                               *(f"{name}@{version}" for name, version in PACKAGES.items())],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm could not install {', '.join(PACKAGES)}: {done.stderr[-500:]}")
    return modules


def buf(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.pathsep.join(filter(None, [path, os.environ.get("PATH")]))}
    done = subprocess.run(["npx", "--yes", BUF, *args], cwd=REPO / "proto", capture_output=True, text=True,
                          timeout=300, env=env)
    if done.returncode != 0 and "npm error" in done.stderr:
        pytest.skip(f"npx could not fetch {BUF}: {done.stderr[-500:]}")
    return done


def test_node_calls_generate_and_stream_and_decodes_error_info(node_modules, server, stub):
    from loraserve.v1 import inference_pb2 as pb

    done = subprocess.run(["node", str(REPO / "tests" / "node" / "call.js"), str(REPO / "proto"), server.target,
                           PROMPT, QUESTION], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NODE_PATH": str(node_modules)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=8), timeout=60)
    assert out["generate"].pop("load_source") in ("LOAD_SOURCE_DISK", "LOAD_SOURCE_RAM", "LOAD_SOURCE_VRAM")
    assert out["generate"] == {"text": expected.text, "adapter": "legal", "version": "1", "output_tokens": 8,
                               "finish_reason": "FINISH_REASON_LENGTH"}
    assert out["stream"]["text"] == expected.text and out["stream"]["messages"] > 1
    assert (out["stream"]["finish_reason"], out["stream"]["adapter"]) == ("FINISH_REASON_LENGTH", "legal")
    assert out["error"] == {"code": 5, "status_code": 5, "reason": "ADAPTER_NOT_FOUND", "domain": "loraserve.v1",
                            "metadata": out["error"]["metadata"]}
    assert out["error"]["metadata"].get("adapter_id") == "ghost"
    assert out["models"] == {"base": server.server.registry.base.model_id, "max_context": 512,
                             "has_chat_template": True, "adapters": ["legal@1", "medical@1", "support@1"]}
    assert out["chat"] == expected.text  # the demo's template renders QUESTION as PROMPT


def test_buf_lints_the_contract(node_modules):
    done = buf("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_gen_yaml_typescript_stubs_build(node_modules, tmp_path):
    """buf.gen.yaml's TypeScript entry, as written there, run alone (Go and Java need toolchains this
    machine lacks): grpc-js clients for both services and the google/rpc messages."""
    template = yaml.safe_load((REPO / "proto" / "buf.gen.yaml").read_text())
    template["plugins"] = [dict(p, out=str(tmp_path / "ts")) for p in template["plugins"]
                           if p.get("local") == "protoc-gen-ts_proto"]
    assert len(template["plugins"]) == 1
    done = buf("generate", "--template", json.dumps(template), path=str(node_modules / ".bin"))
    assert done.returncode == 0, done.stdout + done.stderr
    inference = (tmp_path / "ts" / "loraserve" / "v1" / "inference.ts").read_text()
    assert "export const InferenceServiceService" in inference and "export const InferenceServiceClient" in inference
    assert "export const AdapterAdminServiceClient" in (tmp_path / "ts" / "loraserve" / "v1" / "admin.ts").read_text()
    assert "export const ErrorInfo" in (tmp_path / "ts" / "google" / "rpc" / "error_details.ts").read_text()
