"""The `loraserve` command: generate against a live server, config failures, what a newcomer
sees from demo build and serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import PROMPT, REPO
from loraserve.runner.demo import DemoSpec
from loraserve.tools.cli import summary_text


def loraserve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "loraserve.tools.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_generate_prints_text_and_json(server):
    plain = loraserve("generate", "--target", server.target, "--adapter", "legal", "--max-new-tokens", "12", PROMPT)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() and "legal@1" in plain.stderr
    data = json.loads(loraserve("generate", "--target", server.target, "--adapter", "legal", "--max-new-tokens",
                                "12", "--json", PROMPT).stdout)
    assert data["adapter_id"] == "legal" and data["output_tokens"] == 12 and data["text"] == plain.stdout[:-1]


def test_generate_stream_matches_unary(server):
    unary = loraserve("generate", "--target", server.target, "--adapter", "medical", "--max-new-tokens", "20", PROMPT)
    stream = loraserve("generate", "--target", server.target, "--adapter", "medical", "--max-new-tokens", "20",
                       "--stream", PROMPT)
    assert stream.returncode == 0 and stream.stdout == unary.stdout


def test_generate_reports_server_errors(server):
    res = loraserve("generate", "--target", server.target, "--adapter", "ghost", PROMPT)
    assert res.returncode == 1
    assert "NOT_FOUND (ADAPTER_NOT_FOUND)" in res.stderr


def test_serve_fails_fast_on_nonsense_config(tmp_path):
    res = loraserve("serve", "--quantization", "fp3", "--max-batch-size", "0")
    assert res.returncode == 2
    assert "quantization must be one of" in res.stderr and "max_batch_size" in res.stderr
    res = loraserve("serve", "--model-path", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "not found" in res.stderr


def test_adapters_cli_lifecycle(demo_dir, tmp_path):
    store = tmp_path / "store"
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (raw / f).write_bytes((demo_dir / "adapters" / "medical" / "1" / f).read_bytes())

    def adapters(*args):
        return loraserve("adapters", "--store", str(store), *args)

    reg = adapters("--json", "register", str(raw), "--name", "triage", "--model-path", str(demo_dir / "base"),
                   "--client", "northmed", "--task", "triage", "--aliases", "er", "--fallback", "base")
    assert reg.returncode == 0, reg.stderr
    passport = json.loads(reg.stdout)[0]
    assert passport["status"] == "staging" and passport["smoke_test"]["passed"]
    assert all(r["output"].strip() for r in passport["smoke_test"]["results"])
    assert adapters("register", str(raw), "--name", "triage", "--model-path", str(demo_dir / "base"),
                    "--client", "northmed", "--aliases", "er").returncode == 0

    assert adapters("promote", "triage", "1").returncode == 0
    assert adapters("promote", "triage", "2").returncode == 0
    table = adapters("list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "VERSION", "STATUS"] and "archived" in table
    active = json.loads(adapters("--json", "list", "--status", "active", "--client", "northmed").stdout)
    assert [(p["name"], p["version"]) for p in active] == [("triage", "2")]
    assert json.loads(adapters("--json", "list", "--client", "nobody").stdout) == []
    assert json.loads(adapters("show", "er").stdout)["version"] == "2"
    assert json.loads(adapters("--json", "rollback", "triage").stdout)[0]["version"] == "1"
    assert json.loads(adapters("show", "triage@2").stdout)["status"] == "staging"
    assert json.loads(adapters("--json", "stale", "--days", "0").stdout)[0]["version"] == "2"
    assert adapters("archive", "triage").returncode == 0
    assert json.loads(adapters("--json", "list", "--status", "active").stdout) == []

    (raw / "adapter_model.safetensors").rename(raw / "adapter_model.bin")
    refused = adapters("register", str(raw), "--name", "triage", "--model-path", str(demo_dir / "base"))
    assert refused.returncode == 1 and "pickle" in refused.stderr
    missing = adapters("promote", "triage", "9")
    assert missing.returncode == 1 and "not in the store" in missing.stderr


def test_serve_says_how_to_try_it_in_one_line_and_the_commands_work(demo_dir):
    env = {**os.environ, "LORASERVE_PORT": "0", "LORASERVE_METRICS_PORT": "-1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraserve.tools.cli", "serve", "--model-path", str(demo_dir / "base"),
                             "--adapters-dir", str(demo_dir / "adapters")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready: try "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), lines
        cli, grpcurl = re.findall(r"`([^`]+)`", lines[-1])
        assert cli.startswith("loraserve generate ") and grpcurl.startswith("grpcurl ")
        tried = subprocess.run(["bash", "-c", cli.replace("loraserve", f"{sys.executable} -m loraserve.tools.cli", 1)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert tried.returncode == 0 and tried.stdout.strip() and "legal@1" in tried.stderr, tried.stderr
        binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
        if binary:
            called = subprocess.run(["bash", "-c", grpcurl.replace("grpcurl", binary, 1)], capture_output=True,
                                    text=True, timeout=60)
            assert called.returncode == 0 and json.loads(called.stdout)["adapter"]["id"] == "legal", called.stderr
    finally:
        proc.terminate()
        proc.wait(60)
    said = "".join(lines)
    assert sum(line.startswith("ready: ") for line in lines) == 1
    assert "Loading weights" not in said and "Warning" not in said, said


def test_demo_summary_reads_as_text():
    text = summary_text({"base": "var/demo/base", "adapters": "var/demo/adapters", "base_loss": 0.3456,
                         "adapter_losses": {"legal": 1.7, "medical": 1.9}, "seconds": 27.4})
    assert text.splitlines()[0] == "demo built in 27 s"
    assert "legal, medical in var/demo/adapters" in text and "legal 1.70, medical 1.90" in text
    assert "loraserve serve --model-path var/demo/base --adapters-dir var/demo/adapters" in text


@pytest.mark.slow
def test_demo_build_shows_one_bar_per_stage(tmp_path):
    """A smaller spec through the same command path: one line per stage off a terminal."""
    from loraserve.runner.demo import build_demo
    from loraserve.tools.progress import StageBars

    class Log:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    log = Log()
    spec = DemoSpec(adapters=("legal",), base_steps=3, adapter_steps=2)
    build_demo(tmp_path / "demo", spec, progress=StageBars(log))
    stages = [line.split("[")[0].strip() for line in log.text.splitlines()]
    assert stages == ["tokenizer", "base model", "adapter legal", "register (smoke test)"]
    assert all(re.search(r"\[#+\]\s+(\d+)/\1\s+[\d.]+ s$", line) for line in log.text.splitlines()), log.text


def test_registry_cli_alone_registers_only_without_the_smoke_test(tmp_path, capsys):
    """`python -m loraserve.registry.cli` imports no runner: a smoke-tested registration needs `loraserve adapters`."""
    from loraserve.registry.cli import main
    from tiny import fake_base, tiny_adapter

    raw, base, store = tiny_adapter(tmp_path / "raw"), fake_base(tmp_path / "base"), tmp_path / "store"
    assert main(["--store", str(store), "register", str(raw), "--name", "x", "--model-path", str(base)]) == 1
    assert "loraserve adapters register" in capsys.readouterr().err
    assert main(["--store", str(store), "--json", "register", str(raw), "--name", "x", "--no-smoke",
                 "--model-path", str(base)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "staging"


def test_serve_exits_non_zero_and_says_why_when_start_up_fails(demo_dir):
    """A warm adapter that is not there fails the load: the process says so and exits, not idles NOT_SERVING."""
    res = subprocess.run([sys.executable, "-m", "loraserve.server.cli", "serve", "--model-path", str(demo_dir / "base"),
                          "--adapters-dir", str(demo_dir / "adapters"), "--port", "0", "--metrics-port", "-1",
                          "--warm", "ghost"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "start-up failed" in res.stderr and "ghost" in res.stderr, res.stderr
    assert "ready: " not in res.stderr
