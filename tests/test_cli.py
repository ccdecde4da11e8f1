"""The `loraserve` command: generate against a live server, config failures."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROMPT, REPO


def loraserve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
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
