"""Backpressure end to end: clients take turns for batch rows, and a request that cannot start
before its deadline is refused at once."""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from loraserve.clients.client import LoraServeClient, RequestFailed
from conftest import PROMPT, ServerThread, server_config
from loraserve.server.app import engine_config
from test_lifecycle import PacedEngine, wait_for

TOKENS = {"noisy-token": {"client": "noisy"}, "quiet-token": {"client": "quiet"}}


@pytest.fixture(scope="module")
def one_row(demo_dir, tmp_path_factory):
    """One batch row, decode steps of >= 10 ms: who gets the row next is observable."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    cfg = server_config(demo_dir, max_batch_size=1, auth_tokens_file=tokens)
    srv = ServerThread(cfg, engine=PacedEngine(engine_config(cfg)))
    yield srv
    srv.stop()


def test_a_noisy_client_cannot_starve_a_quiet_one(one_row):
    done: list[str] = []
    lock = threading.Lock()

    def call(token: str, name: str):
        with LoraServeClient(one_row.target, token=token, timeout=120) as client:
            client.generate("legal", PROMPT, max_new_tokens=20, ignore_eos=True)
        with lock:
            done.append(name)

    noisy = [threading.Thread(target=call, args=("noisy-token", f"n{i}")) for i in range(5)]
    for t in noisy:
        t.start()
    assert wait_for(lambda: one_row.server.scheduler.queue_depth == 4)
    quiet = threading.Thread(target=call, args=("quiet-token", "q"))
    quiet.start()
    for t in (*noisy, quiet):
        t.join(120)
    # First come first served would finish all five noisy requests before the quiet one.
    assert done.index("q") <= 2, done


def test_a_request_that_would_wait_past_its_deadline_fails_at_once(one_row):
    with LoraServeClient(one_row.target, token="quiet-token", timeout=120) as client:
        client.generate("legal", PROMPT, max_new_tokens=40, ignore_eos=True)  # the service time is now known
        with LoraServeClient(one_row.target, token="noisy-token", timeout=120) as other:
            busy = threading.Thread(target=other.generate, args=("legal", PROMPT),
                                    kwargs={"max_new_tokens": 60, "ignore_eos": True})
            busy.start()
            assert wait_for(lambda: one_row.server.scheduler.running == 1)
            queued_before = one_row.server.scheduler.stats.submitted
            with LoraServeClient(one_row.target, token="quiet-token", timeout=0.05) as hurried:
                with pytest.raises(RequestFailed) as refused:
                    hurried.generate("legal", PROMPT)
            busy.join(120)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                          "EXPECTED_WAIT_EXCEEDS_DEADLINE")
    assert one_row.server.scheduler.stats.submitted == queued_before  # it never took a queue slot
