"""Per-sample losses: the loss function, batching, and the cached base-model difficulty."""

from __future__ import annotations

import hashlib
import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels
from .data import Dataset

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "qmlx", "difficulty")


def make_batch(data: Dataset, idx) -> tuple[mx.array, mx.array]:
    """(tokens (B, L), target mask (B, L)) padded to the longest sample of the batch."""
    samples = [data.samples[i] for i in idx]
    L = max(len(s.tokens) for s in samples)
    tokens = np.zeros((len(samples), L), np.int32)
    mask = np.zeros((len(samples), L), bool)
    for row, s in enumerate(samples):
        tokens[row, : len(s.tokens)] = s.tokens
        mask[row, : len(s.mask)] = s.mask
    return mx.array(tokens), mx.array(mask)


# Logits of at most this many tokens are alive at once: for a 152K vocabulary the full (B, L,
# vocab) float32 logits of a batch of 8 x 512 would take 2.5 GB, plus their gradient.
LOSS_CHUNK = 1024


def token_losses(model: nn.Module, tokens: mx.array, mask: mx.array, chunk: int = LOSS_CHUNK):
    """(per-position cross-entropy masked to targets (B, L-1), the mask as float (B, L-1)).

    The head and the loss run over chunks of positions under `mx.checkpoint`, so the backward
    pass recomputes one chunk's logits at a time instead of keeping all of them.
    """
    h = model.model(tokens[:, :-1])
    targets, m = tokens[:, 1:], mask[:, 1:].astype(mx.float32)
    step = max(1, chunk // h.shape[0])  # positions per chunk

    def chunk_loss(hc, tc):
        # -log p(target): the kernels' log-softmax on the CPU (MLX's CPU logsumexp has a scalar exp)
        return -mx.take_along_axis(kernels.log_softmax(model.head(hc)), tc[..., None], axis=-1)[..., 0]

    if h.shape[1] <= step:
        return chunk_loss(h, targets) * m, m
    ce = []
    for s in range(0, h.shape[1], step):
        # Targets are closed over: checkpoint differentiates every argument, ids included.
        run = mx.checkpoint(lambda hc, tc=targets[:, s : s + step]: chunk_loss(hc, tc))
        ce.append(run(h[:, s : s + step]))
    return mx.concatenate(ce, axis=1) * m, m


def loss_fn(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(mean loss over the batch's target tokens, number of target tokens)."""
    ce, m = token_losses(model, tokens, mask)
    n = m.sum()
    return ce.sum() / mx.maximum(n, 1.0), n


def sample_losses(model: nn.Module, data: Dataset, batch_size: int = 8, indices=None) -> np.ndarray:
    """Mean target-token loss of each sample (of `indices`, default all), in index order."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    idx = idx[np.argsort(data.lengths[idx], kind="stable")]  # less padding
    out = np.zeros(len(data), np.float64)
    training = model.training
    model.train(False)  # no dropout while scoring
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        ce, m = token_losses(model, *make_batch(data, part))
        per = ce.sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)
        out[part] = np.array(per, np.float64)
    model.train(training)
    return out if indices is None else out[np.asarray(indices)]


def difficulty(model, data: Dataset, key_parts: dict, batch_size: int = 8, cache_dir: str | None = None):
    """The base model's per-sample losses on `data`, computed once per (model, data, settings).

    `key_parts` names what the scores depend on (model folder, settings); the file's bytes are
    hashed in too, so editing the data invalidates the cache.
    """
    h = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode())
    with open(data.path, "rb") as f:
        h.update(f.read())
    cache_dir = cache_dir or CACHE_DIR
    path = os.path.join(cache_dir, h.hexdigest()[:24] + ".json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            scores = json.load(f)
        if len(scores) == len(data):
            return np.array(scores, np.float64), path, True
    scores = sample_losses(model, data, batch_size)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(scores.tolist(), f)
    os.replace(tmp, path)
    return scores, path, False
