"""A mock model that "predicts" a fixed token script: exact control over what is generated."""

from __future__ import annotations

import mlx.core as mx

VOCAB = 300


class ScriptedModel:
    """Logits that put all mass on `script[p + 1]` at absolute position p, ignoring the input.

    With a prompt that is the script's beginning, greedy generation continues the script;
    past its end it repeats the last token. It fills a real KV cache (of width 1), so cache
    offsets, trimming and prompt caches behave as with a real model.
    """

    def __init__(self, script: list[int], n_layers: int = 2, vocab: int = VOCAB):
        self.script = list(script)
        self.layers = [None] * n_layers
        self.vocab = vocab
        self.calls: list[int] = []  # tokens per call, to count what was prefilled

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        B, L = inputs.shape
        self.calls.append(L)
        offset = cache[0].offset if cache is not None else 0
        if cache is not None:
            for c in cache:
                c.update_and_fetch(mx.zeros((B, 1, L, 1)), mx.zeros((B, 1, L, 1)))
        nxt = [self.script[min(offset + i + 1, len(self.script) - 1)] for i in range(L)]
        logits = mx.where(mx.arange(self.vocab)[None] == mx.array(nxt)[:, None], 30.0, 0.0)
        return mx.broadcast_to(logits[None], (B, L, self.vocab))
