"""The in-place KV cache keeps exactly what transformers' concatenating one would, through the
engine's row selections, merges and trims."""

import torch
from transformers.cache_utils import DynamicLayer

from runner.kvcache import SlackLayer


def _step(layers, k, v):
    return [layer.update(k, v) for layer in layers]


def test_slack_layer_matches_dynamic_layer_through_reassignments():
    torch.manual_seed(0)
    slack, ref = SlackLayer(), DynamicLayer()
    layers = (slack, ref)
    prefill = torch.randn(4, 2, 7, 8), torch.randn(4, 2, 7, 8)
    _step(layers, *prefill)
    for step in range(150):  # past the first buffer's room, so it regrows
        if step == 20:  # rows leave (engine._select)
            for layer in layers:
                layer.batch_select_indices(torch.tensor([0, 2, 3]))
        if step == 40:  # leading columns every row masks out are dropped (engine._trim)
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
        if step == 60:  # rows join (engine._merge)
            joined = torch.randn(2, 2, slack.keys.shape[2], 8)
            for layer in layers:
                layer.keys, layer.values = torch.cat([layer.keys, joined]), torch.cat([layer.values, joined])
        rows = slack.keys.shape[0]
        (ks, vs), (kr, vr) = _step(layers, torch.randn(rows, 2, 1, 8), torch.randn(rows, 2, 1, 8))
        assert torch.equal(ks, kr) and torch.equal(vs, vr)
    assert slack.get_seq_length() == ref.get_seq_length() == 7 + 150 - 3
