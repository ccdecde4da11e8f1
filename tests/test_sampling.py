"""Batched sampling: a row's draw depends on its own (seed, step) only, extreme values are
normalised instead of crashing, and the draws follow the distribution asked for."""

import torch

from runner.sampling import sample
from scheduler.types import SamplingParams


def test_a_seeded_row_draws_the_same_token_whatever_its_batch_holds():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11 + i) for i in range(6)]
    together = sample(logits, params, [5] * 6)
    for i in range(6):
        assert sample(logits[i:i + 1], params[i:i + 1], [5]) == together[i]
    assert sample(logits[:1], params[:1], [6]) is not None  # another step, another draw


def test_values_that_would_overflow_are_normalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3]])
    for params in (SamplingParams(temperature=1e-38, seed=1), SamplingParams(temperature=1e-30, top_k=10**9, seed=2),
                   SamplingParams(temperature=2.0, top_k=2**31 - 1, top_p=1e-9, seed=3)):
        assert int(sample(logits, [params], [0])) == 1


def test_draws_follow_softmax_of_scores_over_temperature_within_top_k_and_top_p():
    probs = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
    logits = probs.log().unsqueeze(0)
    counts = torch.zeros(5)
    for seed in range(3000):
        counts[sample(logits, [SamplingParams(temperature=1.0, top_k=3, seed=seed)], [0])] += 1
    want = torch.tensor([0, 0.4, 0.3, 0.15, 0]) / 0.85
    assert torch.allclose(counts / 3000, want, atol=0.03)
    counts.zero_()
    for seed in range(3000):  # top_p 0.6: 0.4 then 0.3 reach it; the rest never drawn
        counts[sample(logits, [SamplingParams(temperature=1.0, top_p=0.6, seed=seed)], [0])] += 1
    assert counts[[0, 3, 4]].sum() == 0 and abs(counts[1] / 3000 - 0.4 / 0.7) < 0.03


def test_text_still_incomplete_when_a_row_ends_is_not_lost(demo_dir):
    """A character whose bytes are not all out is held back while streaming; if the row ends
    there (EOS, max_new_tokens), the decoder's text is what the answer gets."""
    from transformers import AutoTokenizer

    from runner.detok import decode_new

    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    ids = tok.encode("ok \ufffd", add_special_tokens=False)
    text, held, prefix, read = "", "", 0, 0
    for n in range(1, len(ids) + 1):
        new, held, prefix, read = decode_new(tok, ids[:n], prefix, read)
        text += new
    assert text + held == tok.decode(ids) == "ok \ufffd"
