"""Batched sampling: a row's draw depends on its own (seed, step) only, extreme values are
normalised instead of crashing, and the draws follow the distribution asked for."""

import torch

from loraserve.runner.sampling import sample
from loraserve.scheduler.types import SamplingParams


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

    from loraserve.runner.detok import decode_new

    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    ids = tok.encode("ok \ufffd", add_special_tokens=False)
    text, held, prefix, read = "", "", 0, 0
    for n in range(1, len(ids) + 1):
        new, held, prefix, read = decode_new(tok, ids[:n], prefix, read)
        text += new
    assert text + held == tok.decode(ids) == "ok \ufffd"


def _as_before(logits, params, steps):
    """The sampler as it was before it ran on the device without host round trips (one full sort
    per step, a host sync on top_p): the reference the device path must agree with."""
    from loraserve.runner.sampling import MIN_TEMPERATURE, gumbel

    chosen = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if not drawn:
        return chosen
    idx = torch.tensor(drawn)
    temps = torch.tensor([max(params[i].temperature, MIN_TEMPERATURE) for i in drawn])
    scores = logits.index_select(0, idx) / temps.unsqueeze(1)
    vocab = scores.shape[1]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    top_k = torch.tensor([params[i].top_k or vocab for i in drawn]).clamp(max=vocab)
    drop = torch.arange(vocab).unsqueeze(0) >= top_k.unsqueeze(1)
    top_p = torch.tensor([params[i].top_p for i in drawn])
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    noise = gumbel([params[i].seed or 0 for i in drawn], [steps[i] for i in drawn], vocab, logits.device)
    perturbed = sorted_scores.masked_fill(drop, float("-inf")) + noise.gather(1, order)
    chosen[idx] = order.gather(1, perturbed.argmax(dim=-1, keepdim=True)).squeeze(1)
    return chosen


def test_every_path_draws_what_the_full_sort_drew():
    """Greedy, temperature alone, top_k alone (topk, noise at its candidates only), top_k beside
    unfiltered rows, top_p (the sort): mixed in batches of every kind, one Sampler reused (its
    staging buffer grows past the rows it was sized for), the same tokens as the full sort. Scores
    are distinct: between equal scores at the top_k boundary the sort's choice was arbitrary."""
    import random

    from loraserve.runner.sampling import Sampler

    rng, sampler = random.Random(0), Sampler(torch.device("cpu"), rows=2)
    torch.manual_seed(0)
    kinds = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3, top_k=5),
             dict(temperature=1e-38, top_k=1), dict(temperature=0.9, top_k=10**9), dict(temperature=1.0, top_p=0.8),
             dict(temperature=0.8, top_k=40, top_p=0.95)]
    for trial in range(300):
        rows, vocab = rng.randint(1, 9), rng.choice([7, 600, 4000])
        pool = kinds[:5] if trial % 2 else kinds  # half the batches have no top_p row: no sort at all
        params = [SamplingParams(**rng.choice(pool), seed=rng.randrange(2**64)) for _ in range(rows)]
        steps = [rng.randrange(1000) for _ in range(rows)]
        logits = torch.randn(rows, vocab) * 4
        assert torch.equal(sampler(logits, params, steps), _as_before(logits, params, steps)), (trial, params)


def test_no_sort_unless_a_row_asks_for_top_p(monkeypatch):
    from loraserve.runner.sampling import Sampler

    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(self.shape) or real_sort(self, *a, **k))
    sampler, logits = Sampler(torch.device("cpu"), 4), torch.randn(4, 1000)
    sampler(logits, [SamplingParams(), SamplingParams(temperature=0.5, seed=1),
                     SamplingParams(temperature=0.9, top_k=50, seed=2), SamplingParams(temperature=1.0, top_k=5, seed=3)],
            [0, 1, 2, 3])
    assert sorts == []
    sampler(logits, [SamplingParams(), SamplingParams(temperature=0.9, top_k=50, seed=2),
                     SamplingParams(temperature=0.5, top_p=0.9, seed=1), SamplingParams(temperature=0.5, seed=3)],
            [0, 1, 2, 3])
    assert sorts == [(1, 1000)]  # the top_p row alone: its neighbours do not sort for it
