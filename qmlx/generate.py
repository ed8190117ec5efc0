"""Generation as three stacked generators:

    generate_step    token ids in, (token, logprobs) out; owns the decode loop
    stream_generate  text in, GenerationEvent out (text deltas, stop handling, timing)
    generate         text in, text out

stream_generate composes the shared decoding parts (qmlx/decode.py: prefill, log-softmax,
text with EOS and stop strings) with a token source: generate_step, or speculative decoding
(qmlx/speculative.py) when there is something to draft with.
Nothing here prints; front ends render the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .cache import make_cache
from .decode import Clock, GenerationEvent, TextStream, logprobs, prefill, token_logprobs
from .errors import UserError
from .sample import make_distribution, make_logits_processors, make_sampler, seed_generator

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

if TYPE_CHECKING:  # only for annotations: prompt_cache.py does not import this module either
    from .prompt_cache import PromptCache


def generate_step(
    model,
    prompt: mx.array,
    *,
    cache: list | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = -1,
    prefill_step: int = 512,
    context: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs over the vocabulary) for each new token, forever or max_tokens.

    `context` is the token ids `cache` already holds before `prompt` (a reused prompt cache):
    the logits processors see context + prompt + generated tokens, so a repetition penalty
    acts the same whether or not part of the prompt came from a cache.

    The prompt is prefilled in chunks of `prefill_step` tokens so a long prompt's peak memory
    is bounded by the chunk. Decoding is pipelined: step n+1 is queued for evaluation before
    token n is handed to the caller, so host work overlaps the model.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("generate_step needs a non-empty 1-D array of prompt token ids")
    cache = cache if cache is not None else make_cache(len(model.layers))
    sampler = sampler or make_sampler(0.0)
    history = None
    if logits_processors:
        history = (
            mx.concatenate([mx.array(list(context), dtype=prompt.dtype), prompt]) if len(context) else prompt
        )

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(y[None], cache=cache)[:, -1, :].astype(mx.float32)
        if logits_processors:
            # Start the forward pass now: processors that read the tokens so far (a grammar's mask)
            # wait for the previous step only, and do their host work while this one runs.
            mx.async_eval(logits)
            for proc in logits_processors:
                logits = proc(history, logits)
        lp = logprobs(logits)
        token = sampler(lp)
        if logits_processors:
            history = mx.concatenate([history, token.reshape(-1)])
        return token, lp[0]

    # Every prompt token but the last goes into the cache with no logits: the output head (a quarter of
    # a 0.5B model's work per token) is never computed for them. The last token is the first step.
    prefill(model, prompt[:-1], cache, prefill_step)
    y, lp = step(prompt[-1:])
    mx.async_eval(y, lp)
    n = 0
    while n != max_tokens:
        if n + 1 != max_tokens:
            next_y, next_lp = step(y)
            mx.async_eval(next_y, next_lp)
        yield y.item(), lp
        n += 1
        if n == max_tokens:
            break
        y, lp = next_y, next_lp
        if n % 256 == 0:
            mx.clear_cache()


def sampling_settings(defaults: dict[str, Any], **given) -> dict[str, Any]:
    """Merge explicit sampling arguments (None = not given) over generation_config.json defaults."""
    out = {
        "temperature": defaults.get("temperature", 0.0) if defaults.get("do_sample", True) else 0.0,
        "top_p": defaults.get("top_p", 1.0),
        "top_k": defaults.get("top_k", 0),
        "min_p": defaults.get("min_p", 0.0),
        "repetition_penalty": defaults.get("repetition_penalty"),
    }
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def _not_drafted(steps: Iterator[tuple[int, mx.array]]) -> Iterator[tuple[int, mx.array, bool]]:
    """generate_step's (token, logprobs) as speculative decoding's (token, logprobs, False)."""
    try:
        for token, lps in steps:
            yield token, lps, False
    finally:
        steps.close()


def _token_steps(
    model,
    ids: list[int],
    todo: list[int],
    cache: list | None,
    settings: dict[str, Any],
    sampler: Sampler,
    processors: list[LogitsProcessor],
    max_tokens: int,
    prefill_step: int,
    draft: tuple,
) -> Iterator[tuple[int, mx.array, bool]]:
    """(token, logprobs, from_draft) after the prompt `ids`, of which `cache` holds all but `todo`.

    `draft` is (draft_model, num_draft_tokens, prompt_lookup): with a draft model or prompt
    lookup the tokens come from speculative decoding, else from generate_step.
    """
    draft_model, num_draft_tokens, prompt_lookup = draft
    if draft_model is None and not prompt_lookup:
        plain = generate_step(
            model,
            mx.array(todo),
            cache=cache,
            sampler=sampler,
            logits_processors=processors,
            max_tokens=max_tokens,
            prefill_step=prefill_step,
            context=ids[: len(ids) - len(todo)],
        )
        return _not_drafted(plain)
    from .speculative import speculative_generate_step

    s = settings
    return speculative_generate_step(
        model,
        ids,
        cache=cache,
        distribution=make_distribution(s["temperature"], s["top_p"], s["top_k"], s["min_p"]),
        logits_processors=processors,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        prompt_lookup=prompt_lookup,
        max_tokens=max_tokens,
        prefill_step=prefill_step,
    )


def _committing(steps: Iterator, prompt_cache: PromptCache, ids: list[int]) -> Iterator:
    """`steps`, then `prompt_cache` records what its caches hold, also after an early close."""
    generated = []
    try:
        for step in steps:
            generated.append(step[0])
            yield step
    finally:
        steps.close()
        prompt_cache.commit(ids + generated)


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    stop_tokens: Sequence[int] = (),
    top_logprobs: int = 0,
    cache: list | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step: int = 512,
    draft_model=None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[GenerationEvent]:
    """Stream a completion of `prompt` (text, or token ids) as GenerationEvents.

    Sampling arguments left as None take the model's generation_config.json values.
    With a `prompt_cache`, the longest prefix it already holds is not computed again.
    Generation stops at any EOS id or id of `stop_tokens` (finish_reason "stop"; the id is not
    shown), at a stop string (never shown, not even in part), or after max_tokens ("length").
    A `draft_model` (same tokenizer) or `prompt_lookup` = n (match up to n-grams in the
    context) turns on speculative decoding (qmlx/speculative.py): same output distribution,
    up to `num_draft_tokens` tokens per model pass.
    Extra `logits_processors` ((history, logits) -> logits, e.g. a grammar constraint) run
    after the penalty processors built from the arguments above.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise UserError("the prompt is empty: nothing to continue")
    s = sampling_settings(
        tokenizer.generation_defaults,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    if seed is not None:
        seed_generator(seed)
    sampler = make_sampler(s["temperature"], top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"])
    processors = make_logits_processors(
        repetition_penalty=s["repetition_penalty"],
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=logit_bias,
    ) + list(logits_processors)
    text, clock = TextStream(tokenizer, stop, stop_tokens), Clock(len(ids))
    cache, todo = prompt_cache.prepare(model, ids) if prompt_cache is not None else (cache, ids)
    clock.computed = len(todo)
    draft = (draft_model, num_draft_tokens, prompt_lookup)
    if (draft_model is not None or prompt_lookup) and not all(
        getattr(p, "drafting_safe", True) for p in processors
    ):
        raise ValueError(
            "a grammar constraint cannot check drafted tokens: decode it without draft_model/prompt_lookup"
        )
    steps = _token_steps(model, ids, todo, cache, s, sampler, processors, max_tokens, prefill_step, draft)
    steps = _committing(steps, prompt_cache, ids) if prompt_cache is not None else steps
    with closing(steps):  # also on early exit (a client gone, Ctrl-C): the cache must know what it holds
        for token, lps, drafted in steps:
            clock.tick()
            out = text.add(token)
            if token not in text.eos:  # EOS ends the text and is not shown
                lp, tops = token_logprobs(lps, token, top_logprobs) if top_logprobs else (None, None)
                yield clock.event(out, token, None, lp, tops, drafted)
            if text.finish:
                break
    # Text held back for a stop string that never completed is real output; flush it.
    yield clock.event(text.rest(), None, text.finish or "length")


def generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256, **kwargs) -> str:
    """The whole completion of `prompt` as one string (see stream_generate for arguments)."""
    return "".join(ev.text for ev in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
