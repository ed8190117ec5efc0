"""Samplers and logits processors as plain callables.

    sampler = make_sampler(temperature=0.7, top_p=0.8, top_k=20)
    tokens = sampler(logprobs)                       # (B, V) -> (B,)

    for proc in make_logits_processors(repetition_penalty=1.05):
        logits = proc(token_ids_so_far, logits)      # (T,), (B, V) -> (B, V)

The filters follow Hugging Face transformers, whose semantics Qwen's generation_config.json
values were tuned for: temperature, then top_k, then top_p, then min_p. Random draws use
MLX's global generator, so a caller wanting reproducible output calls mx.random.seed first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from .errors import UserError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None
) -> Sampler:
    """A callable mapping log-probabilities (B, V) to token ids (B,).

    With a `seed` the sampler draws from its own random key sequence rather than MLX's global
    generator, so its draws do not depend on what else is sampled meanwhile (a request in a
    batch samples the same tokens as alone).

    temperature 0 is greedy (argmax; the filters are then irrelevant). Otherwise, in
    transformers' order:
      1. divide by temperature,
      2. top_k > 0 keeps the k most likely tokens,
      3. top_p < 1 keeps the smallest set of most likely tokens whose probability (after the
         steps above) reaches top_p -- always at least the most likely token,
      4. min_p > 0 keeps tokens whose probability is at least min_p times the largest,
    and draws from what is left, renormalised, with mx.random.categorical.
    """
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= min_p <= 1.0:
        raise UserError(f"min_p must be in [0, 1], got {min_p}")

    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    narrow = _make_filter(temperature, top_p, top_k, min_p)
    key = None if seed is None else mx.random.key(check_seed(seed))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        logits, ids = narrow(logprobs)
        if key is None:
            choice = mx.random.categorical(logits, axis=-1)
        else:
            key, draw = mx.random.split(key)
            choice = mx.random.categorical(logits, axis=-1, key=draw)
        if ids is None:
            return choice
        return mx.take_along_axis(ids, choice[..., None], axis=-1).squeeze(-1)

    return sample


def make_distribution(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """A callable mapping log-probabilities (B, V) to the probabilities (B, V) that
    `make_sampler` with the same arguments draws from; greedy gives a one-hot row.

    Speculative sampling needs these explicitly: it accepts a drafted token with probability
    min(1, p/q), which only keeps the model's distribution if p is what would be sampled.
    """
    make_sampler(temperature, top_p, top_k, min_p)  # the same argument checks
    if temperature == 0:

        def one_hot(logprobs: mx.array) -> mx.array:
            best = mx.argmax(logprobs, axis=-1, keepdims=True)
            return (mx.arange(logprobs.shape[-1]) == best).astype(mx.float32)

        return one_hot

    narrow = _make_filter(temperature, top_p, top_k, min_p)

    def distribution(logprobs: mx.array) -> mx.array:
        logits, ids = narrow(logprobs)
        probs = mx.softmax(logits, axis=-1)
        if ids is None:
            return probs
        # Scatter the kept columns back to their vocabulary ids; the rest get 0.
        full = mx.zeros(logprobs.shape, dtype=mx.float32)
        return mx.put_along_axis(full, ids, probs, axis=-1)

    return distribution


def _make_filter(temperature: float, top_p: float, top_k: int, min_p: float):
    """Steps 1-4 of make_sampler: logprobs (B, V) -> (logits, ids).

    `logits` are the surviving candidates' scaled logits (-inf for removed ones); `ids` maps
    their columns back to vocabulary ids, or is None when the columns are the vocabulary.
    """
    log_min_p = math.log(min_p) if min_p > 0 else None

    def narrow(logprobs: mx.array) -> tuple[mx.array, mx.array | None]:
        logits = logprobs.astype(mx.float32) / temperature
        ids = None
        if 0 < top_k < logits.shape[-1]:
            # A partial sort: with Qwen's top_k=20 the later filters then sort 20, not 150k.
            ids = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
            logits = mx.take_along_axis(logits, ids, axis=-1)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            logits = mx.take_along_axis(logits, order, axis=-1)
            ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
            probs = mx.softmax(logits, axis=-1)
            # Mass of the strictly more likely tokens: 0 for the top one, so it always stays.
            mass_before = mx.cumsum(probs, axis=-1) - probs
            logits = mx.where(mass_before < top_p, logits, -math.inf)
        if log_min_p is not None:
            # p_i >= min_p * p_max, compared as log-probabilities (normalisation cancels).
            threshold = logits.max(axis=-1, keepdims=True) + log_min_p
            logits = mx.where(logits >= threshold, logits, -math.inf)
        return logits, ids

    return narrow


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> list[LogitsProcessor]:
    """Logits processors `(token_ids, logits) -> logits` for one request, in application order.

    token_ids is the 1-D array of the prompt's ids followed by the ids generated so far; the
    same ids apply to every row of logits (B, V). Build a fresh list per request: the
    presence/frequency processor learns the prompt's length from its first call.

    repetition_penalty (transformers' rule): for each distinct id among the last
      repetition_context_size ids (prompt included), a positive logit is divided by the
      penalty and a negative one multiplied by it. None or 1.0 = off.
    presence_penalty, frequency_penalty (OpenAI's rule): over the *generated* ids only,
      logit -= presence_penalty * [count > 0] + frequency_penalty * count.
    logit_bias: {token id: value} added last, so a ban (-100) or a forced token (+100) is
      never bent by the penalties.
    """
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty or frequency_penalty:
        processors.append(_presence_frequency_penalty(presence_penalty, frequency_penalty))
    if logit_bias:
        processors.append(_logit_bias(logit_bias))
    return processors


def _token_counts(tokens: mx.array, vocab_size: int) -> mx.array:
    """How often each vocabulary id occurs in `tokens`: (V,) float32."""
    return mx.zeros((vocab_size,), dtype=mx.float32).at[tokens].add(1.0)


def _repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    if penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0, got {penalty}")
    if context_size < 1:
        raise UserError(f"repetition_context_size must be >= 1, got {context_size}")

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens is None or tokens.size == 0:
            return logits
        seen = _token_counts(tokens[-context_size:], logits.shape[-1]) > 0
        penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalised, logits)

    return apply


def _presence_frequency_penalty(presence: float, frequency: float) -> LogitsProcessor:
    prompt_length = None  # learned on the first call, which sees only the prompt

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal prompt_length
        if tokens is None:
            return logits
        if prompt_length is None:
            prompt_length = tokens.size
        generated = tokens[prompt_length:]
        if generated.size == 0:
            return logits
        counts = _token_counts(generated, logits.shape[-1])
        penalty = frequency * counts + presence * (counts > 0)
        return logits - penalty.astype(logits.dtype)

    return apply


def _logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    if any(int(i) < 0 for i in bias):
        raise UserError("logit_bias token ids must be >= 0")
    ids = mx.array([int(i) for i in bias], dtype=mx.int32)
    values = mx.array([float(v) for v in bias.values()], dtype=mx.float32)

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return apply


def check_seed(seed) -> int:
    """`seed` if MLX can seed with it (an integer in [0, 2**64)); else a UserError."""
    if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise UserError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return seed


def seed_generator(seed: int) -> None:
    """Seed MLX's global generator with a checked seed."""
    mx.random.seed(check_seed(seed))
