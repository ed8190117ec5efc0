"""Perplexity: windows, prediction counts, and the shared reference on the real model."""

from __future__ import annotations

import math
import os

import mlx.core as mx
import pytest
from tiny import random_model, tiny_config

from qmlx.evaluate import perplexity

SHARED = os.environ.get("QMLX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")


def manual_nll(model, ids: list[int]) -> float:
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -sum(logp[i, t].item() for i, t in enumerate(ids[1:]))


def test_one_window_scores_every_token_after_the_first():
    model = random_model(tiny_config())
    ids = [5, 9, 33, 2, 250, 17, 88, 41, 3, 7]
    ppl, mean, n = perplexity(model, ids, ctx=1024)
    assert n == len(ids) - 1
    assert mean == pytest.approx(manual_nll(model, ids) / n, rel=1e-5)
    assert ppl == pytest.approx(math.exp(mean))


def test_long_inputs_are_scored_in_independent_windows():
    model = random_model(tiny_config())
    ids = list(range(3, 15))  # 12 tokens, ctx 5: windows of 5, 5, 2 tokens
    _, mean, n = perplexity(model, ids, ctx=5)
    assert n == 4 + 4 + 1
    total = manual_nll(model, ids[:5]) + manual_nll(model, ids[5:10]) + manual_nll(model, ids[10:])
    assert mean == pytest.approx(total / n, rel=1e-5)


def test_head_is_applied_in_chunks(monkeypatch):
    import qmlx.evaluate

    model = random_model(tiny_config())
    ids = list(range(3, 40))
    whole = perplexity(model, ids)
    monkeypatch.setattr(qmlx.evaluate, "HEAD_CHUNK", 7)
    assert perplexity(model, ids) == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_bf16_fixture_matches_reference_perplexity(real_model, reference):
    """transformers (float32) scored the first 1024 tokens: 1023 predictions per text."""
    model, tokenizer = real_model
    for entry in reference["texts"]:
        with open(os.path.join(TEXTS, entry["file"]), encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())[: entry["tokens"]]
        ppl, mean, n = perplexity(model, ids, ctx=1024)
        assert n == entry["tokens"] - 1
        assert ppl == pytest.approx(entry["ppl"], rel=1e-3), entry["file"]
        assert mean == pytest.approx(entry["mean_nll"], rel=1e-3)
