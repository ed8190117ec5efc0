"""Speculative decoding: guess several tokens cheaply, check them all in one model pass.

Two ways to guess ("draft") the next k tokens:

    draft model     a smaller Qwen with the same tokenizer samples k tokens one by one
    prompt lookup   the last n tokens also occurred earlier in the context; propose what
                    followed them there (no second model; strong when output copies input,
                    as in code edits)

The model then runs once over [last token, d1..dk] and yields k+1 distributions p0..pk.
Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023) accepts d_i with
probability min(1, p_i(d_i) / q_i(d_i)), where q_i is the draft's distribution; at the first
rejection it draws from normalize(max(0, p_i - q_i)) instead, and when every draft is
accepted it draws one bonus token from p_k. Each emitted token is then distributed exactly
as plain sampling from the model would be. Greedy decoding is the special case of one-hot p
and q: a draft is kept iff it is the model's argmax, and the replacement is the argmax.
Prompt lookup proposes deterministically, so its q is one-hot on the proposed token.

The caches always hold the context minus its last token (which is fed with the next
drafts); rejected drafts are rolled back with `trim_cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import can_trim_cache, make_cache, trim_cache
from .decode import logprobs, prefill
from .errors import UserError

Distribution = Callable[[mx.array], mx.array]  # logprobs (B, V) -> probabilities (B, V)
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SpeculativeStats:
    """Counters a caller can read during or after a speculative generation."""

    proposed: int = 0  # draft tokens put to the model
    accepted: int = 0  # of those, how many the model kept
    passes: int = 0  # model forward passes in the decode loop

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class PromptLookup:
    """Drafts by n-gram matching in the context: O(1) work per new token.

    For each n in 1..ngram, `index[n]` maps an n-gram to the position right after its latest
    occurrence. A proposal looks up the context's last n tokens, longest n first, and returns
    up to k tokens that followed the match.
    """

    def __init__(self, ngram: int):
        if ngram < 1:
            raise UserError(f"--prompt-lookup must be at least 1 (the n-gram size), got {ngram}")
        self.ngram = ngram
        self.index: list[dict[tuple, int]] = [{} for _ in range(ngram + 1)]
        self.indexed = 0  # positions j < indexed are in the index

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        # Index every n-gram that ends before the last token; the suffix itself is not a match.
        for j in range(max(self.indexed, 1), len(seq)):
            for n in range(1, min(self.ngram, j) + 1):
                self.index[n][tuple(seq[j - n : j])] = j
        self.indexed = max(self.indexed, len(seq))
        for n in range(min(self.ngram, len(seq)), 0, -1):
            j = self.index[n].get(tuple(seq[len(seq) - n :]))
            if j is not None:
                return list(seq[j : j + k])
        return []


def _sync(model, cache: list, seq: list[int], upto: int, prefill_step: int) -> None:
    """Make `cache` hold exactly seq[:upto] (it always holds a prefix of seq)."""
    offset = cache[0].offset
    if offset > upto:
        trim_cache(cache, offset - upto)
    elif offset < upto:
        prefill(model, seq[offset:upto], cache, prefill_step)


def _draft_with_model(
    draft_model, draft_cache, seq, k, distribution, prefill_step
) -> tuple[list[int], mx.array]:
    """Sample k tokens from the draft model; return them and their distributions q (k, V)."""
    # The draft cache holds a prefix of seq; feed it whatever it has not seen, last token included.
    _sync(draft_model, draft_cache, seq, len(seq) - 1, prefill_step)
    y = mx.array(seq[-1:])
    tokens, qs = [], []
    for _ in range(k):
        q = distribution(logprobs(draft_model(y[None], cache=draft_cache)[:, -1, :]))
        y = mx.random.categorical(mx.log(q), axis=-1)
        tokens.append(y)
        qs.append(q)
    tokens_and_qs = mx.concatenate(tokens), mx.concatenate(qs)
    mx.eval(tokens_and_qs)
    return tokens_and_qs[0].tolist(), tokens_and_qs[1]


def _verify(p: mx.array, q: mx.array, drafts: list[int]) -> tuple[int, mx.array]:
    """Speculative sampling over one round: (how many drafts are accepted, the next token).

    p: (k+1, V) the model's sampling distributions; q: (k, V) the draft's.
    """
    k = len(drafts)
    if k:
        d = mx.array(drafts)
        rows = mx.arange(k)
        p_d, q_d = p[rows, d], q[rows, d]
        # accept d_i when u_i < p/q; q(d) > 0 because d was drawn from q
        ok = mx.random.uniform(shape=(k,)) * q_d < p_d
        n = int(mx.cumprod(ok.astype(mx.int32)).sum().item())
    else:
        n = 0
    if n < k:
        residual = mx.maximum(p[n] - q[n], 0.0)
        # p == q leaves nothing; that case can only be reached with probability 0, but be safe.
        target = mx.where(residual.sum() > 0, residual, p[n])
    else:
        target = p[n]
    return n, mx.random.categorical(mx.log(target))


def speculative_generate_step(
    model,
    ids: Sequence[int],
    *,
    cache: list | None = None,
    distribution: Distribution,
    logits_processors: Sequence[LogitsProcessor] = (),
    draft_model=None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    max_tokens: int = -1,
    prefill_step: int = 512,
    stats: SpeculativeStats | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs, from_draft) like generate_step, drafting with a model or by
    prompt lookup (`prompt_lookup` = the longest n-gram to match).

    `ids` is the whole prompt; `cache` may already hold a prefix of it (a prompt cache).
    `distribution` maps logprobs to the probabilities plain sampling would draw from
    (qmlx.sample.make_distribution). Logits processors apply to the model's logits only.
    """
    if draft_model is None and not prompt_lookup:
        raise ValueError("speculative decoding needs a draft model or prompt_lookup > 0")
    if num_draft_tokens < 1:
        raise UserError(f"--num-draft-tokens must be at least 1, got {num_draft_tokens}")
    seq = list(ids)
    if not seq:
        raise ValueError("speculative_generate_step needs a non-empty prompt")
    cache = cache if cache is not None else make_cache(len(model.layers))
    # A rotating cache can roll back only until it first drops a token: refuse it up front.
    if not can_trim_cache(cache) or hasattr(cache[0], "max_size"):
        raise UserError("speculative decoding needs a KV cache that can roll back; drop --max-kv-size")
    draft_cache = make_cache(len(draft_model.layers)) if draft_model is not None else None
    lookup = PromptLookup(prompt_lookup) if prompt_lookup else None
    stats = stats if stats is not None else SpeculativeStats()
    n_out = 0

    try:
        while n_out != max_tokens:
            # The model's cache holds seq[:-1]; seq[-1] goes in with the drafts.
            _sync(model, cache, seq, len(seq) - 1, prefill_step)
            k = num_draft_tokens if max_tokens < 0 else min(num_draft_tokens, max_tokens - n_out - 1)
            drafts, q = [], None
            if k > 0 and draft_model is not None:
                drafts, q = _draft_with_model(draft_model, draft_cache, seq, k, distribution, prefill_step)
            elif k > 0:
                drafts = lookup.propose(seq, k)
            logits = model(mx.array(seq[-1:] + drafts)[None], cache=cache)[0].astype(mx.float32)
            if logits_processors:
                logits = _process(logits, logits_processors, seq, drafts)
            lps = logprobs(logits)
            p = distribution(lps)
            if q is None:  # prompt lookup: the proposal is certain
                q = (mx.arange(p.shape[-1]) == mx.array(drafts)[:, None]).astype(mx.float32)
            elif q.shape[-1] < p.shape[-1]:  # a draft with a smaller embedding table
                q = mx.pad(q, [(0, 0), (0, p.shape[-1] - q.shape[-1])])
            else:
                q = q[:, : p.shape[-1]]
            n, token = _verify(p, q, drafts)
            stats.proposed += len(drafts)
            stats.accepted += n
            stats.passes += 1
            # Roll back the rejected drafts: keep seq[-1] and the n accepted ones.
            trim_cache(cache, len(drafts) - n)
            for i, t in enumerate(drafts[:n] + [token.item()]):
                seq.append(t)
                yield t, lps[i], i < n
                n_out += 1
                if n_out == max_tokens:
                    break
    finally:
        # Early exit (EOS, stop string, a client gone): the cache must not hold tokens the
        # caller never saw, or a prompt cache would record the wrong context.
        excess = cache[0].offset - len(seq)
        if excess > 0:
            trim_cache(cache, excess)


def _process(logits: mx.array, processors, seq: list[int], drafts: list[int]) -> mx.array:
    """Apply the processors to each verified position's logits, with the history before it."""
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        history = mx.array(seq + drafts[:i])
        for proc in processors:
            row = proc(history, row)
        rows.append(row)
    return mx.concatenate(rows)
