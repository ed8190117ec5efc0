"""Request preparation: messages -> chat template -> token ids; limits, tools and grammars checked.

Everything here runs before a request reaches the engine (in a worker thread), so anything a client
can get wrong is refused with a 400 naming the field, and the engine only ever sees valid jobs.
Tool choice, response_format and the guided_* / grammar fields become a constraint (qmlx/constrain.py,
on llguidance): "required" or a named function starts the answer inside `<tool_call>` and constrains the
call's JSON, arguments included, to the tools' schemas. Its processor is built here, off the engine's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..constrain import Constraint, ConstraintError
from ..fim import ExtraFile, FIMError, fim_prompt, stop_ids
from ..toolcalls import OPEN, MessageError, template_messages
from .engine import Engine, Job
from .schemas import APIError, ChatRequest, CompletionRequest, InfillRequest, NamedToolChoice, Sampling, Tool

DEFAULT_MAX_TOKENS = 2048  # when a request names no limit (OpenAI's "up to the context")


@dataclass
class Prepared:
    """A validated request: the job to run and how to present its output."""

    job: Job
    parse_tools: bool = False  # split <tool_call> blocks out of the text
    forced_call: bool = False  # the output is the JSON of one call (tool_choice required/named)
    tool_names: set[str] = field(default_factory=set)  # offered tools, to recognise bare calls
    parallel_calls: bool = True  # False: keep only the first call


def _sampling_kwargs(req: Sampling, tokenizer) -> dict[str, Any]:
    if req.top_k is not None and req.top_k > tokenizer.vocab_size:
        raise APIError(400, f"top_k must be at most the vocabulary size ({tokenizer.vocab_size})", "top_k")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise APIError(400, "at most 16 stop strings are supported", "stop")
    bias = None
    if req.logit_bias:
        bias = {}
        for k, v in req.logit_bias.items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < tokenizer.vocab_size:
                raise APIError(400, f"logit_bias key {k!r} is not a token id of this model", "logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias values must be within [-100, 100], got {v}", "logit_bias")
            bias[int(k)] = float(v)
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": bias,
        # MLX seeds are unsigned 64-bit; any integer a client sends maps onto one.
        "seed": None if req.seed is None else req.seed % (1 << 64),
        "stop": [s for s in stop if s] or None,
    }


def _encode(tok, text: str, param: str) -> list[int]:
    try:
        return tok.encode(text)
    except Exception as e:  # e.g. lone surrogates a JSON string can carry
        raise APIError(400, f"{param} cannot be tokenized: {e}", param) from None


def _limit_tokens(engine: Engine, ids: list[int], asked: int | None, param: str) -> int:
    """The generation budget, refusing prompts and requests that cannot fit the context."""
    ctx, n = engine.context, len(ids)
    if n == 0:
        raise APIError(400, "the prompt is empty", "prompt")
    if asked is not None and asked > ctx:
        raise APIError(400, f"{param} is {asked}, more than the model's context of {ctx} tokens", param)
    if n >= ctx or (asked is not None and n + asked > ctx):
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n + (asked or 1)} tokens ({n} in the prompt, {asked or 1} for the completion).",
            "messages",
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(DEFAULT_MAX_TOKENS, ctx - n)


def _constraint(make, param: str) -> Constraint:
    try:
        return make()
    except ConstraintError as e:
        raise APIError(400, str(e), param) from None


def _tool_call_constraint(tools: list[Tool]) -> Constraint:
    """The JSON of one call to one of `tools`, its arguments constrained to that tool's schema."""
    pairs = [(t.function.name, t.function.parameters or {"type": "object"}) for t in tools]
    return _constraint(lambda: Constraint.tool_call(pairs), "tools")


CONSTRAINT_FIELDS = {  # request field -> how its value becomes a constraint
    "guided_json": Constraint.json_schema,
    "json_schema": Constraint.json_schema,
    "guided_regex": Constraint.regex,
    "guided_choice": Constraint.choice,
    "guided_grammar": Constraint.grammar_text,
    "grammar": Constraint.grammar_text,
}


def _response_constraint(req: Sampling) -> Constraint | None:
    """The request's output constraint: response_format or one of the guided_* / llama.cpp fields."""
    given = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", Constraint.json_object))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(
                400,
                "response_format of type json_schema needs a json_schema object",
                "response_format.json_schema",
            )
        where = "response_format.json_schema.schema"
        given.append((where, partial(Constraint.json_schema, fmt.json_schema.schema_, where)))
    for name, make in CONSTRAINT_FIELDS.items():
        value = getattr(req, name)
        if value is not None:
            given.append((name, partial(make, value, name)))
    if len(given) > 1:
        raise APIError(400, f"{given[0][0]} and {given[1][0]} cannot both constrain the output", given[1][0])
    if not given:
        return None
    param, make = given[0]
    return _constraint(make, param)


def _attach(engine: Engine, job: Job, constraint: Constraint | None) -> Job:
    """The job with its constraint's processor (built here, off the engine's thread)."""
    if constraint is not None:
        job.constraint = constraint.processor(engine.tokenizer, engine.vocab)
        if constraint.json_output:
            job.sampling["stop"] = None  # JSON output ends when the value does
    return job


def prepare_chat(engine: Engine, req: ChatRequest) -> Prepared:
    """Validate a chat request and turn it into a job (runs in a worker thread)."""
    tok = engine.tokenizer
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    try:
        messages = template_messages([m.model_dump(exclude_none=True) for m in req.messages])
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None
    grammar = _response_constraint(req)
    choice = req.tool_choice or ("auto" if req.tools else "none")
    tools = req.tools or []
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                "tool_choice",
            )
        tools_forced = named
    else:
        tools_forced = tools if choice == "required" else []
    if choice != "none" and choice != "auto" and not tools:
        raise APIError(400, "tool_choice requires tools", "tool_choice")
    if tools_forced and grammar is not None:
        raise APIError(400, "response_format cannot be combined with a required tool call", "response_format")
    rendered_tools = [t.model_dump(exclude_none=True) for t in tools] if tools and choice != "none" else None
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=rendered_tools)
    except Exception as e:  # the template refused these messages (raise_exception, bad types)
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    if tools_forced:
        # Start the answer inside a call, as the model itself would, then constrain its JSON.
        prompt += OPEN + "\n"
        grammar = _tool_call_constraint(tools_forced)
    ids = _encode(tok, prompt, "messages")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _limit_tokens(engine, ids, asked, param)
    sampling = _sampling_kwargs(req, tok)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    # The chosen token's logprob comes with the alternatives, so ask for at least one.
    n_top = max(req.top_logprobs or 0, 1) if req.logprobs else 0
    return Prepared(
        _attach(engine, Job(ids, max_tokens, sampling, top_logprobs=n_top), grammar),
        parse_tools=bool(rendered_tools) and not tools_forced and grammar is None,
        forced_call=bool(tools_forced),
        tool_names={t.function.name for t in tools},
        parallel_calls=req.parallel_tool_calls,
    )


def prepare_completion(engine: Engine, req: CompletionRequest) -> Prepared:
    tok = engine.tokenizer
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if req.echo:
        raise APIError(400, "echo is not supported", "echo")
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], int):
        if not all(0 <= t < tok.vocab_size for t in p):
            raise APIError(400, "prompt token ids must be within the vocabulary", "prompt")
        ids = list(p)
    else:
        if isinstance(p, list):
            if len(p) != 1:
                raise APIError(400, "exactly one prompt per request is supported", "prompt")
            p = p[0]
        ids = None if req.suffix is not None else _encode(tok, p, "prompt")
    sampling = _sampling_kwargs(req, tok)
    if req.suffix is not None:  # fill in the middle: the prompt is the code before the cursor
        if not isinstance(p, str):
            raise APIError(400, "a prompt with a suffix must be text, not token ids", "prompt")
        ids = _fim(tok, p, req.suffix, [], "suffix")
        sampling["stop_tokens"] = stop_ids(tok)
    max_tokens = _limit_tokens(engine, ids, req.max_tokens, "max_tokens")
    n_top = 0 if req.logprobs is None else max(req.logprobs, 1)
    job = Job(ids, max_tokens, sampling, top_logprobs=n_top)
    return Prepared(_attach(engine, job, _response_constraint(req)))


def _fim(tok, prefix: str, suffix: str, extra: list[ExtraFile], param: str) -> list[int]:
    try:
        return fim_prompt(tok, prefix, suffix, extra)
    except FIMError as e:
        raise APIError(400, str(e), param) from None
    except Exception as e:  # e.g. lone surrogates a JSON string can carry
        raise APIError(400, f"{param} cannot be tokenized: {e}", param) from None


def prepare_infill(engine: Engine, req: InfillRequest) -> Prepared:
    """llama.cpp's /infill: prefix, suffix and other files of the project -> a fill-in-the-middle job."""
    tok = engine.tokenizer
    extra = [ExtraFile(c.filename or f"file{i}", c.text) for i, c in enumerate(req.input_extra)]
    ids = _fim(tok, req.input_prefix, req.input_suffix, extra, "input_prefix")
    if req.prompt:
        ids += tok.encode_plain(req.prompt)
    if req.repeat_penalty is not None and req.repetition_penalty is None:
        req = req.model_copy(update={"repetition_penalty": req.repeat_penalty})
    sampling = _sampling_kwargs(req, tok)
    sampling["stop_tokens"] = stop_ids(tok)
    asked = req.n_predict if req.n_predict > 0 else req.max_tokens
    max_tokens = _limit_tokens(engine, ids, asked, "n_predict")
    job = Job(ids, max_tokens, sampling)
    return Prepared(_attach(engine, job, _response_constraint(req)))
