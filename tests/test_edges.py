"""Strict edges: whole-id matching."""

from __future__ import annotations

import grpc
import pytest

from clients.client import RequestFailed
from conftest import PROMPT
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc


@pytest.mark.parametrize("adapter_id", ["legal\n", "legal\r\n", " legal", "legal@1\n", "legal\x00"])
def test_adapter_ids_are_matched_whole(server, adapter_id):
    # A plain stub: LoraServeClient also sends the id as routing metadata, which gRPC refuses to carry.
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT, max_new_tokens=2), timeout=30)
    err = RequestFailed.from_rpc_error(caught.value)
    assert (err.code, err.reason, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "adapter_id")

