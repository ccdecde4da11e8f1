"""The client distribution alone: its wheel built from pyclient/, installed into a fresh venv
(no system site-packages, no PYTHONPATH: torch cannot be imported there), calls the live test
server with the typed client and the `loraserve-client` script and decodes an ErrorInfo with
grpcio-status. Dependencies come from the package index; no index, no test (skipped, saying so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import PROMPT, REPO

pytestmark = pytest.mark.slow

CALLS = r"""
import json, sys
import grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from loraserve.clients import LoraServeClient, RequestFailed
from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb, inference_pb2_grpc

target, prompt = sys.argv[1], sys.argv[2]
out = {}
with LoraServeClient(target, timeout=60) as c:
    r = c.generate("legal", prompt, max_new_tokens=8)
    out["generate"] = [r.text, r.adapter_id, r.adapter_version, r.output_tokens]
    pieces = list(c.stream("legal", prompt, max_new_tokens=8))
    out["stream"] = ["".join(p for p in pieces if isinstance(p, str)), pieces[-1].text]
    try:
        c.generate("ghost", prompt)
    except RequestFailed as exc:
        out["typed_error"] = [exc.code.name, exc.reason]
with grpc.insecure_channel(target) as ch:
    try:
        inference_pb2_grpc.InferenceServiceStub(ch).Generate(
            pb.GenerateRequest(adapter_id="ghost", prompt=prompt), metadata=((ROUTING_HEADER, "ghost"),), timeout=60)
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)
        info = error_details_pb2.ErrorInfo()
        unpacked = [d.Unpack(info) for d in status.details]
        out["error_info"] = [err.code().name, any(unpacked), info.reason, info.domain]
out["modules"] = sorted(m for m in ("torch", "transformers", *(f"loraserve.{room}" for room in
                        ("server", "scheduler", "runner", "registry", "tools"))) if m in sys.modules)
out["files"] = [sys.modules["loraserve.clients"].__file__, sys.modules["loraserve"].__file__]
print(json.dumps(out))
"""


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("client-venv")
    # The wheel is built here, without the index (the running venv's setuptools), so a failure
    # to build is a failure; only the dependencies' download may skip.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                  REPO / "pyclient"])
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp / "dist").glob("loraserve_client-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"loraserve/v1/inference.proto", "loraserve/v1/admin.proto", "loraserve/v1/inference_pb2.py",
            "loraserve/contract.py", "loraserve/clients/client.py", "loraserve/clients/cli.py"} <= names, names
    assert {n.split("/")[0] for n in names} == {"loraserve", wheel.name.split("-py3")[0] + ".dist-info"}, names
    assert not any(n.split("/")[1] in ("server", "scheduler", "runner", "registry", "tools") for n in names)
    try:
        venv.create(tmp / "venv", with_pip=True, system_site_packages=False)
    except Exception as exc:  # no ensurepip on this Python, etc.
        pytest.skip(f"cannot create a venv here: {exc}")
    python = tmp / "venv" / "bin" / "python"
    installed = _run([python, "-m", "pip", "install", "--quiet", wheel])
    if installed.returncode != 0:
        pytest.skip(f"the client's dependencies could not be installed from the index: {installed.stderr[-500:]}")
    return python


def test_fresh_venv_has_no_torch(client_venv):
    probe = _run([client_venv, "-c", "import importlib.util as u, json; "
                  "print(json.dumps({m: u.find_spec(m) is not None for m in "
                  "('torch', 'transformers', 'grpc', 'grpc_status', 'loraserve.server', 'loraserve.clients')}))"],
                 cwd=client_venv.parent)
    assert json.loads(probe.stdout) == {"torch": False, "transformers": False, "grpc": True, "grpc_status": True,
                                        "loraserve.server": False, "loraserve.clients": True}, probe.stderr


def test_client_alone_generates_streams_and_decodes_error_info(client_venv, server):
    done = _run([client_venv, "-c", CALLS, server.target, PROMPT], cwd=client_venv.parent)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    text, adapter, version, tokens = out["generate"]
    assert text and (adapter, version, tokens) == ("legal", "1", 8)
    assert out["stream"] == [text, text]
    assert out["typed_error"] == ["NOT_FOUND", "ADAPTER_NOT_FOUND"]
    assert out["error_info"] == ["NOT_FOUND", True, "ADAPTER_NOT_FOUND", "loraserve.v1"]
    assert out["modules"] == []
    assert all(str(client_venv.parent.parent) in f and str(REPO) not in f for f in out["files"]), out["files"]


def test_loraserve_client_script(client_venv, server):
    script = client_venv.parent / "loraserve-client"
    done = _run([script, "generate", "--target", server.target, "--adapter", "medical", "--max-new-tokens", "6",
                 "--json", PROMPT], cwd=client_venv.parent)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["adapter_id"], result["output_tokens"], result["load_source"] in ("vram", "ram", "disk")) == (
        "medical", 6, True)
    refused = _run([script, "generate", "--target", server.target, "--adapter", "../etc", PROMPT],
                   cwd=client_venv.parent)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
