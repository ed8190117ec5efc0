"""The `qmlx` command: argument parsing only; the work is done by the rooms it calls.

Errors the user caused (a wrong path, a bad config field, a bad flag) print one line and exit
with status 2; anything else is a bug, whose traceback is shown only with QMLX_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

from .errors import Stopped, UserError
from .folder import DTYPES

# Errors whose messages are for the user; anything else is a bug.
# (OSErrors about a path the user gave: the message names it.)
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}

# Signals that stop a command the way Ctrl-C does: `timeout`, a service manager, a closed terminal.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _raise_stopped(signum, frame) -> None:
    # Further stop signals are ignored from here on, so they cannot cut the clean-up short.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


class Parser(argparse.ArgumentParser):
    """argparse, but a wrong or missing flag is one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command(fn):
    """Register a function that adds one subcommand to the parser."""
    COMMANDS[fn.__name__.removeprefix("add_").replace("_", "-")] = fn
    return fn


def seed_value(text: str) -> int:
    """argparse type of --seed: an integer MLX can seed with (sample.check_seed's rule)."""
    from .sample import check_seed

    try:
        return check_seed(int(text))
    except ValueError as e:  # int() of a non-number, or check_seed's UserError
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}") from e


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation_config.json)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=seed_value, help="seed for reproducible sampling (0 or more)")


def sampling_kwargs(args) -> dict:
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


STORAGE_DTYPES = tuple(DTYPES)  # the floating dtypes qmlx reads and writes
COMPUTE_DTYPES = ("auto", *STORAGE_DTYPES)


def add_dtype_flag(p, default: str = "auto", help: str | None = None) -> None:
    """--dtype: the compute dtype of a command that runs a model ("auto": the device's)."""
    p.add_argument(
        "--dtype",
        default=default,
        choices=COMPUTE_DTYPES,
        help=help or "compute dtype (default: auto, the device's: float32 on the CPU, bfloat16 on Metal)",
    )


def add_storage_dtype_flag(p, help: str) -> None:
    """--dtype: the dtype of the floating tensors a command writes."""
    p.add_argument("--dtype", choices=STORAGE_DTYPES, help=help)


@command
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    p.add_argument("--model", "-m", required=True, help="model folder or hub repo id")
    p.add_argument("--prompt", "-p", help="the prompt; '-' reads standard input")
    p.add_argument("--system", "-s", help="system prompt (chat template)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    g = p.add_argument_group("fill in the middle (Qwen2.5-Coder; instead of --prompt)")
    g.add_argument("--fim-prefix-file", metavar="FILE", help="the code before the cursor")
    g.add_argument("--fim-suffix-file", metavar="FILE", help="the code after the cursor")
    g.add_argument(
        "--fim-extra",
        metavar="FILE",
        action="append",
        help="another file of the project, as context (repeatable)",
    )
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_dtype_flag(p)
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per model pass")
    add_adapter_flag(p)
    add_kv_cache_flags(p)
    p.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="start from a cache made by `qmlx cache-prompt`; --prompt continues its prompt",
    )
    g = p.add_argument_group("speculative decoding (same output, fewer model passes)")
    g.add_argument("--draft-model", help="a smaller model with the same tokenizer that drafts tokens")
    g.add_argument("--num-draft-tokens", type=int, default=3, help="tokens drafted per model pass")
    g.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="draft by matching the last N (or fewer) tokens earlier in the context",
    )
    g = p.add_argument_group("constrained output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this JSON Schema")
    g.add_argument("--json", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", metavar="R", help="the output matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar")
    g.add_argument(
        "--choice", action="append", metavar="TEXT", help="the output is one of these (repeatable)"
    )
    add_sampling_flags(p)
    add_pipeline_flags(p)
    p.set_defaults(run=run_generate)


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None


def fim_request(args):
    """(prefix, suffix, [(path, text) of --fim-extra], prefix path) of the fill-in-the-middle flags, or None."""
    if not (args.fim_prefix_file or args.fim_suffix_file or args.fim_extra):
        return None
    if args.prompt is not None or args.prompt_cache or args.system:
        raise UserError("--fim-prefix-file/--fim-suffix-file replace --prompt (and --system, --prompt-cache)")
    if not (args.fim_prefix_file and args.fim_suffix_file):
        raise UserError("fill in the middle needs both --fim-prefix-file and --fim-suffix-file")
    prefix, suffix = read_text_file(args.fim_prefix_file), read_text_file(args.fim_suffix_file)
    extra = [(p, read_text_file(p)) for p in args.fim_extra or []]
    return prefix, suffix, extra, args.fim_prefix_file


def read_constraint(args):
    """The Constraint that --json-schema / --json / --regex / --grammar / --choice ask for, or None."""
    from .constrain import Constraint, ConstraintError

    try:
        if args.json_schema:
            return Constraint.json_schema(read_text_file(args.json_schema), args.json_schema)
        if args.grammar:
            return Constraint.grammar_text(read_text_file(args.grammar), args.grammar)
        if args.regex is not None:
            return Constraint.regex(args.regex, "--regex")
        if args.choice:
            return Constraint.choice(args.choice, "--choice")
        if args.json:
            return Constraint.json_object()
    except ConstraintError as e:
        raise UserError(str(e)) from None
    return None


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline across machines (run under mlx.launch; see qmlx shard-plan)")
    g.add_argument(
        "--layers",
        metavar="RANGES",
        help="layers per rank, e.g. 0-13,14-23 (default: in proportion to each rank's free memory)",
    )


def load_or_join(args, cache_kwargs: dict):
    """`load`, or under mlx.launch this rank's pipeline stage.

    Returns None on a follower rank, after rank 0 has finished with it.
    """
    from . import load  # qmlx.load: the loader's load, plus the adapter
    from .distributed import launched, start

    adapter = getattr(args, "adapter", None)
    if launched():
        if adapter:
            raise UserError("--adapter does not work in a pipeline yet; fuse it first (qmlx fuse)")
        return start(args.model, dtype=args.dtype, layers=args.layers, cache_kwargs=cache_kwargs)
    if args.layers:
        raise UserError("--layers applies only to a pipeline started with mlx.launch")
    return load(args.model, dtype=args.dtype, adapter=adapter)


def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder written by `qmlx lora`")


def add_kv_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--max-kv-size", type=int, help="keep at most N tokens (the first 4 + the newest)")
    g.add_argument("--kv-bits", type=int, help="quantize keys and values to B bits (2-8)")
    g.add_argument("--kv-group-size", type=int, help="quantization group size (32, 64, 128)")
    g.add_argument("--key-bits", type=int, help="bits for keys (overrides --kv-bits)")
    g.add_argument("--value-bits", type=int, help="bits for values (overrides --kv-bits)")


def read_prompt(value: str) -> str:
    """--prompt's text: '-' reads standard input."""
    return sys.stdin.read() if value == "-" else value


def kv_cache_kwargs(args) -> dict:
    """make_cache arguments for the KV-cache flags that were given."""
    names = ("max_kv_size", "kv_bits", "kv_group_size", "key_bits", "value_bits")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def run_generate(args) -> int:
    from .cache import make_cache
    from .distributed import launched
    from .generate import stream_generate

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.prefill_step < 1:
        raise UserError(f"--prefill-step must be at least 1, got {args.prefill_step}")
    if launched() and (args.prompt_cache or args.draft_model or args.prompt_lookup):
        raise UserError("--prompt-cache, --draft-model and --prompt-lookup do not work in a pipeline")
    fim = fim_request(args)
    if fim is None and args.prompt is None:
        raise UserError("give --prompt (or --fim-prefix-file and --fim-suffix-file)")
    if args.raw and not args.prompt and not args.prompt_cache and fim is None:
        raise UserError("--prompt is empty; with --raw nothing would be sent to the model")
    constraint = read_constraint(args)  # before loading: a bad file fails fast
    if constraint is not None and (args.draft_model or args.prompt_lookup):
        # Drafted tokens are not checked against the grammar: decode without drafting instead.
        print("note: a constrained output is decoded without --draft-model/--prompt-lookup", file=sys.stderr)
        args.draft_model, args.prompt_lookup = None, 0
    loaded = load_or_join(args, kv_cache_kwargs(args))
    if loaded is None:
        return 0
    model, tokenizer = loaded
    stop_tokens: list[int] = []
    if fim is not None:
        from .fim import ExtraFile, fim_prompt, stop_ids

        prefix, suffix, extra, path = fim
        prompt = fim_prompt(
            tokenizer, prefix, suffix, [ExtraFile(p, t) for p, t in extra], path=path if extra else None
        )
        stop_tokens, args.raw = stop_ids(tokenizer), True
    else:
        prompt = read_prompt(args.prompt)
    cache_kwargs, prompt_cache, cache, draft = kv_cache_kwargs(args), None, None, None
    system, raw = args.system, args.raw
    if args.prompt_cache:
        from .prompt_cache import continue_prompt

        cont = continue_prompt(args.prompt_cache, model, prompt, system, raw, cache_kwargs)
        prompt_cache, prompt, system, raw = cont.cache, cont.prompt, cont.system, cont.raw
    else:
        cache = make_cache(len(model.layers), **cache_kwargs)
    if args.draft_model:
        from .loader import load_draft_model

        draft = load_draft_model(args.draft_model, tokenizer, dtype=args.dtype)
    if not raw:
        prompt = tokenizer.user_prompt(prompt, system)
    elif fim is None and not prompt:
        raise UserError("--prompt is empty; with --raw nothing would be sent to the model")
    procs = [constraint.processor(tokenizer, model.config.vocab_size)] if constraint is not None else []
    last, drafted, generated = None, 0, []
    for ev in stream_generate(
        model,
        tokenizer,
        prompt,
        args.max_tokens,
        stop=args.stop,
        prefill_step=args.prefill_step,
        cache=cache,
        prompt_cache=prompt_cache,
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
        prompt_lookup=args.prompt_lookup,
        logits_processors=procs,
        stop_tokens=stop_tokens,
        **sampling_kwargs(args),
    ):
        text = ev.text
        if procs:
            generated += [ev.token] if ev.token is not None else []
            if ev.finish_reason == "length":  # cut short: completed so that it still parses
                text = procs[0].finish_text(text, generated)
        sys.stdout.write(text)
        sys.stdout.flush()
        last, drafted = ev, drafted + ev.from_draft
    sys.stdout.write("\n")
    if last is not None and (draft is not None or args.prompt_lookup):
        print(f"speculative: {drafted} of {last.generation_tokens} tokens were drafted", file=sys.stderr)
    if prompt_cache is not None:
        print(f"prompt cache: reused {prompt_cache.reused} tokens", file=sys.stderr)
    if last is not None:
        print(last.summary(), file=sys.stderr)
    return 0


@command
def add_cache_prompt(sub) -> None:
    p = sub.add_parser(
        "cache-prompt",
        help="compute a prompt's KV cache once and save it (see generate --prompt-cache)",
    )
    p.add_argument("--model", "-m", required=True, help="model folder or hub repo id")
    p.add_argument("--prompt", "-p", required=True, help="the prompt to cache; '-' reads standard input")
    p.add_argument("--system", "-s", help="system prompt (chat template)")
    p.add_argument("--raw", action="store_true", help="cache the prompt as is, no chat template")
    p.add_argument("--out", "-o", required=True, help="the .safetensors file to write")
    add_dtype_flag(p)
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per model pass")
    add_kv_cache_flags(p)
    p.set_defaults(run=run_cache_prompt)


def run_cache_prompt(args) -> int:
    from .loader import load
    from .prompt_cache import cache_prompt

    if args.prefill_step < 1:
        raise UserError(f"--prefill-step must be at least 1, got {args.prefill_step}")
    prompt = read_prompt(args.prompt)
    model, tokenizer = load(args.model, dtype=args.dtype)
    n = cache_prompt(
        model, tokenizer, prompt, args.out, system=args.system, raw=args.raw,
        prefill_step=args.prefill_step, **kv_cache_kwargs(args),
    )  # fmt: skip
    print(f"{args.out}: {n} prompt tokens cached", file=sys.stderr)
    return 0


@command
def add_convert(sub) -> None:
    from .quant.calibrate import METHODS
    from .quant.groups import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    from .quant.recipes import RECIPES

    p = sub.add_parser(
        "convert", help="convert Hugging Face / GGUF / MLX weights into a quantized model folder"
    )
    p.add_argument("src", help="HF model folder, hub repo id, quantized folder, or .gguf file")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--bits", "-q", type=int, default=4, choices=SUPPORTED_BITS)
    p.add_argument("--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES)
    p.add_argument("--recipe", help="which layers get which bits: " + ", ".join(RECIPES) + " (or mixed-L-H)")
    p.add_argument("--shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB")
    add_storage_dtype_flag(p, "dtype of unquantized tensors, scales and biases (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--dequantize", action="store_true", help="write unquantized weights (e.g. from a quantized SRC)"
    )
    p.add_argument(
        "--method",
        default="rtn",
        choices=list(METHODS),
        help="how weights are rounded: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
    )
    p.add_argument(
        "--calib",
        metavar="FILE|DIR",
        help='calibration text (text files or JSONL with a "text" field) for awq/gptq '
        "(default: Python's standard library source)",
    )
    p.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument(
        "--calib-seq-len", type=int, default=512, help="tokens per calibration sample (default 512)"
    )
    p.add_argument(
        "--calib-head",
        action="store_true",
        help="gptq/awq-gptq: also GPTQ the output head (the embedding when tied) on the "
        "calibration text; helps when that text is in the languages you use, hurts when not",
    )
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from convert import convert

    from .progress import byte_bar

    with byte_bar(show=sys.stderr.isatty()) as progress:
        out = convert(
            args.src,
            args.dst,
            bits=args.bits,
            group_size=args.group_size,
            recipe=args.recipe,
            shard_size=args.shard_size,
            dtype=args.dtype,
            force=args.force,
            dequantize=args.dequantize,
            progress=progress,
            method=args.method,
            calib=args.calib,
            calib_samples=args.calib_samples,
            calib_seq_len=args.calib_seq_len,
            calib_head=args.calib_head,
        )
    print(out)
    return 0


@command
def add_quality(sub) -> None:
    p = sub.add_parser(
        "quality", help="compare a (quantized) model with its reference: perplexity, KL, top-1"
    )
    p.add_argument("--model", "-m", required=True, help="the model to judge (folder or hub id)")
    p.add_argument("--reference", "-r", required=True, help="the reference, e.g. the bf16 source")
    p.add_argument(
        "--files",
        "-f",
        nargs="+",
        help="UTF-8 texts to score (default: textwrap.py of Python's standard library)",
    )
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens scored per file")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per evaluation window")
    add_dtype_flag(p)
    p.set_defaults(run=run_quality)


def run_quality(args) -> int:
    from .quality import report

    report(args.model, args.reference, args.files, args.max_tokens, args.ctx, args.dtype)
    return 0


@command
def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model on task benchmarks (HumanEval, MMLU, GSM8K, KoBEST, your own)"
    )
    p.add_argument("--model", "-m", required=True, help="model folder or hub id")
    p.add_argument("--adapter", help="a LoRA adapter folder (qmlx lora) over the model")
    p.add_argument(
        "--tasks",
        default="humaneval",
        help="comma-separated: humaneval, mmlu, gsm8k, kobest (all five, and their average), kobest_boolq, "
        "kobest_copa, kobest_wic, kobest_hellaswag, kobest_sentineg, or a FILE.jsonl of your own "
        "(docs/evaluation.md)",
    )
    p.add_argument(
        "--shots",
        type=int,
        help="examples before each question: gsm8k's first train problems (default 8), MMLU's dev "
        "questions, KoBEST's train examples (default 0)",
    )
    p.add_argument("--limit", type=int, help="only the first N items of each task (after --stride)")
    p.add_argument("--stride", type=int, default=1, help="every K-th item (a spread over MMLU's subjects)")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="HumanEval: completions per problem (pass@k; needs --temperature)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per completion")
    p.add_argument("--mode", default="auto", choices=("auto", "chat", "complete"),
                   help="prompt through the chat template or as raw text (auto: generation tasks — HumanEval, "
                   "GSM8K, a custom file's generated answers — through the template when the model has one; "
                   "choices scored by log-likelihood — MMLU, KoBEST — raw)")  # fmt: skip
    p.add_argument("--data", help="the task's data in a published format (a file or folder) instead of the "
                   "download; a folder of KoBEST tasks for several")  # fmt: skip
    p.add_argument("--out", help="write settings, scores and every item here (JSON); reruns resume from it")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run")
    p.add_argument("--batch-size", type=int, default=8, help="completions generated together")
    p.add_argument("--seed", type=int, default=0, help="seed of the samplers (with --temperature)")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from .eval.run import evaluate, table

    report = evaluate(
        args.model, args.tasks, args.adapter, args.limit, args.samples, args.temperature, args.max_tokens,
        args.mode, args.data, args.out, args.timeout, args.batch_size, args.seed, progress=sys.stderr.isatty(),
        shots=args.shots, stride=args.stride,
    )  # fmt: skip
    print(table(report))
    return 0


@command
def add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file")
    p.add_argument("--model", "-m", required=True, help="model folder or hub repo id")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the file")
    add_dtype_flag(p)
    p.set_defaults(run=run_perplexity)


def run_perplexity(args) -> int:
    from .evaluate import read_text, text_perplexity
    from .loader import load

    if args.ctx < 2:
        raise UserError(f"--ctx must be at least 2, got {args.ctx}")
    text = read_text(args.file, "--file")
    model, tokenizer = load(args.model, dtype=args.dtype)
    ppl, nll, n = text_perplexity(model, tokenizer, text, args.ctx, args.max_tokens, name=args.file)
    print(f"{n} predictions, mean NLL {nll:.4f} nats", file=sys.stderr)
    print(f"perplexity: {ppl:.4f}")
    return 0


@command
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument(
        "--model",
        "-m",
        help="model folder, hub repo id or .gguf file "
        "(default: Qwen/Qwen2.5-0.5B-Instruct, converted to 4-bit once)",
    )
    p.add_argument("--system", "-s", help="system prompt")
    p.add_argument("--max-tokens", "-n", type=int, default=1024, help="longest answer, in tokens")
    add_dtype_flag(p)
    add_kv_cache_flags(p)
    add_adapter_flag(p)
    add_sampling_flags(p)
    add_pipeline_flags(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from .chat import ChatSession, resolve_chat_model, run_plain, run_terminal

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    folder = args.model = resolve_chat_model(args.model)
    cache_kwargs = kv_cache_kwargs(args)
    loaded = load_or_join(args, cache_kwargs)
    if loaded is None:
        return 0
    model, tokenizer = loaded
    session = ChatSession(
        model, tokenizer, system=args.system, sampling=sampling_kwargs(args), max_tokens=args.max_tokens,
        cache_kwargs=cache_kwargs,
    )  # fmt: skip
    if sys.stdin.isatty() and sys.stdout.isatty():
        banner = f"qmlx chat · {os.path.basename(folder.rstrip('/'))}"
        config = getattr(model, "config", None)
        return run_terminal(session, banner=banner + (f" · {config.summary()}" if config is not None else ""))
    return run_plain(session)


@command
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", "-m", required=True, help="model folder or hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("QMLX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every request (default: $QMLX_API_KEY)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=8, help="requests decoded together, as one batch (default 8)"
    )
    p.add_argument(
        "--prompt-cache-bytes",
        default="1GiB",
        help="memory for KV caches kept between requests, reused by any request sharing a prefix "
        "(a system prompt, a conversation); 0 turns it off (default 1GiB)",
    )
    p.add_argument(
        "--prompt-cache-dir",
        help="keep the prompt caches that leave memory as files in this folder (created if missing), "
        "read back when a request shares their prefix; they outlive restarts (default: off)",
    )
    p.add_argument(
        "--prompt-cache-disk-bytes",
        default="8GiB",
        help="disk space the --prompt-cache-dir files may take; the least recently used go first (default 8GiB)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which clients get 429")
    p.add_argument(
        "--request-timeout", type=float, help="seconds after which a request fails (default: none)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds to let requests in flight finish before exiting (default 60)",
    )
    add_dtype_flag(p)
    add_pipeline_flags(p)
    add_adapter_flag(p)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from convert.writer import parse_size

    from .distributed import launched
    from .server import serve

    cache_bytes = parse_size(args.prompt_cache_bytes, "--prompt-cache-bytes", allow_zero=True)
    disk_bytes = parse_size(args.prompt_cache_disk_bytes, "--prompt-cache-disk-bytes", allow_zero=True)
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")

    if args.prompt_cache_dir and (launched() or args.layers):
        raise UserError(
            "--prompt-cache-dir does not work in a pipeline (each rank holds only its own layers' caches)"
        )
    loaded = None
    if launched() or args.layers:  # else serve() loads after binding the port
        loaded = load_or_join(args, {})
        if loaded is None:
            return 0
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        dtype=args.dtype,
        loaded=loaded,
        adapter=args.adapter,
        prompt_cache_bytes=cache_bytes,
        prompt_cache_dir=args.prompt_cache_dir,  # checked by serve() before the model loads
        prompt_cache_disk_bytes=disk_bytes,
        request_timeout=args.request_timeout,
        max_queue=args.max_queue,
        drain_timeout=args.drain_timeout,
    )
    return 0


@command
def add_shard_plan(sub) -> None:
    p = sub.add_parser(
        "shard-plan", help="show how a pipeline (mlx.launch) would split a model's layers across hosts"
    )
    p.add_argument("--model", "-m", required=True, help="model folder, hub repo id, or a config.json")
    p.add_argument(
        "--hosts",
        required=True,
        help="NAME:GB per rank in mlx.launch order, GB = memory the model may use, e.g. a:24,b:24,c:16",
    )
    p.add_argument("--bits", type=int, help="size the weights as if quantized to B bits (unquantized config)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size with --bits")
    add_dtype_flag(p, default="bfloat16", help="compute dtype of the runs (default: bfloat16, Metal's)")
    p.add_argument("--layers", metavar="RANGES", help="check this split instead, e.g. 0-39,40-79")
    p.add_argument("--context", type=int, default=0, help="also reserve an unquantized KV cache for N tokens")
    p.set_defaults(run=run_shard_plan)


def run_shard_plan(args) -> int:
    from .shard_plan import plan_for

    report, problem = plan_for(args.model, args.hosts, bits=args.bits, group_size=args.group_size,
                               dtype=args.dtype, layers=args.layers, context=args.context)  # fmt: skip
    print(report)
    if problem is not None:
        raise problem


@command
def add_lora(sub) -> None:
    from .lora.order import ORDERS

    p = sub.add_parser("lora", help="fine-tune a LoRA / QLoRA adapter (or --estimate its memory)")
    p.add_argument(
        "--model",
        "-m",
        help="base model folder or hub id (quantized base: QLoRA); with --estimate also a config.json",
    )
    p.add_argument("--data", help="folder with train.jsonl (+ valid.jsonl, test.jsonl)")
    p.add_argument("--adapter-path", default="adapters", help="output folder (default: ./adapters)")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run saved in DIR (its output folder "
        "or one of its checkpoints) with its saved settings; --iters may extend it",
    )
    p.add_argument("--force", action="store_true", help="start over in an --adapter-path that holds a run")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha/rank")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--targets", default="q,k,v,o,gate,up,down", help="projections to adapt")
    g.add_argument("--num-layers", type=int, help="adapt only the last N blocks (default: all)")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--iters", type=int, help="optimizer steps (default 1000)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute activations: less memory")
    g.add_argument("--max-seq-len", type=int, default=2048, help="longer samples are truncated")
    g.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--seed", type=seed_value, default=0, help="seed of the run (0 or more)")
    add_dtype_flag(g)
    g = p.add_argument_group("sample order (see README: Fine-tuning)")
    g.add_argument("--order", choices=ORDERS, default="random")
    g.add_argument("--band", default="0.3,0.8", help="adaptive: quantiles of current loss to train on")
    g.add_argument("--rescore-every", type=int, default=100, help="adaptive: steps between re-scoring")
    g.add_argument(
        "--rescore-pool", type=int, default=512, help="adaptive: samples re-scored each time (0: all)"
    )
    g = p.add_argument_group("reporting")
    g.add_argument("--report-every", type=int, default=10)
    g.add_argument("--val-every", type=int, default=100)
    g.add_argument("--val-batches", type=int, default=0, help="batches per validation (0: all)")
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--test", action="store_true", help="report the test.jsonl loss at the end")
    g = p.add_argument_group("memory estimate (nothing is loaded)")
    g.add_argument("--estimate", action="store_true", help="print the memory this configuration needs")
    g.add_argument("--bits", type=int, help="estimate for weights at B bits (default: the config's)")
    g.add_argument("--group-size", type=int, default=64)
    g.add_argument("--backend", choices=("metal", "cpu"), default="metal", help="estimate for this backend")
    p.set_defaults(run=run_lora)


def run_lora(args) -> int:
    if args.estimate:
        return run_lora_estimate(args)
    from .lora.run import check_out, prepare, report_test, train_with_progress
    from .lora.trainer import TrainConfig, resume_run

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.resume:
        out, cfg = resume_run(args.resume)
        cfg.iters = args.iters or cfg.iters
        say(f"resuming with the settings saved in {out}/train_config.json")
    else:
        if not args.model or not args.data:
            raise UserError("--model and --data are required (or --resume DIR)")
        cfg = TrainConfig(
            model=args.model, data=args.data, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
            targets=parse_lora_targets(args.targets), num_layers=args.num_layers, lr=args.lr,
            weight_decay=args.weight_decay, batch_size=args.batch_size, iters=args.iters or 1000,
            grad_accum=args.grad_accum, grad_clip=args.grad_clip, grad_checkpoint=args.grad_checkpoint,
            max_seq_len=args.max_seq_len, train_on_prompt=args.train_on_prompt, schedule=args.schedule,
            warmup=args.warmup, min_lr=args.min_lr, seed=args.seed, order=args.order,
            band=parse_band(args.band), rescore_every=args.rescore_every,
            rescore_pool=args.rescore_pool, report_every=args.report_every,
            val_every=args.val_every, val_batches=args.val_batches, save_every=args.save_every,
        )  # fmt: skip
        out = args.adapter_path
    check_out(out, args.resume, args.force)
    trainer = prepare(cfg, out, dtype=args.dtype, resume=args.resume, log=say)
    train_with_progress(trainer)
    if args.test:
        report_test(trainer, say)
    print(out)
    return 0


def parse_lora_targets(text: str) -> list[str]:
    from .lora.apply import parse_targets

    return parse_targets(text)


def parse_band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--band must be two quantiles LO,HI such as 0.3,0.8, got {text!r}") from None
    return lo, hi


def run_lora_estimate(args) -> int:
    from .lora.estimate import estimate_report

    if not args.model:
        raise UserError("--estimate needs --model (a folder, config.json or hub id)")
    print(
        estimate_report(
            args.model,
            bits=args.bits,
            group_size=args.group_size,
            rank=args.rank,
            targets=parse_lora_targets(args.targets),
            batch_size=args.batch_size,
            seq_len=args.max_seq_len,
            dtype=args.dtype,
            dropout=args.dropout,
            backend=args.backend,
            num_layers=args.num_layers,
        )  # fmt: skip
    )
    return 0


@command
def add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="LoRA orderings × seeds: train each with `qmlx lora`, score with `qmlx eval`, report"
    )
    p.add_argument("spec", metavar="SPEC.toml", help="the study's spec (see docs/study.md)")
    p.add_argument("--out", help="the study folder (default: the spec's `out`, else beside the spec)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan with each run's time and memory; train nothing"
    )
    p.add_argument("--report", action="store_true", help="only (re)write the report from the finished runs")
    p.set_defaults(run=run_study)


def run_study(args) -> int:
    from .study import runner
    from .study.report import write_report
    from .study.spec import read_spec

    spec = read_spec(args.spec, build_parser(), args.out)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.dry_run:
        print(runner.dry_run(spec, say))
    elif args.report:
        if not os.path.isdir(spec.out):
            raise UserError(f"{spec.out}: no study folder yet (run `qmlx study {args.spec}` first)")
        print(write_report(spec))
    else:
        print(runner.run(spec, say))
    return 0


@command
def add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="merge a LoRA adapter into its base model (or export it for PEFT)")
    p.add_argument("--model", "-m", required=True, help="the base model folder or hub id")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder written by `qmlx lora`")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--bits", "-q", type=int, help="quantize the fused model (default: as the base)")
    p.add_argument("--group-size", type=int, help="quantization group size (default: 64, or the base's)")
    add_storage_dtype_flag(p, "dtype of floating tensors (default: the base config's torch_dtype)")
    p.add_argument("--export", choices=("peft",), help="write a Hugging Face PEFT adapter to DST instead")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=run_fuse)


def run_fuse(args) -> int:
    if args.export == "peft":
        from .loader import load_config, resolve
        from .lora.peft import export_peft

        folder = resolve(args.model)
        out = export_peft(
            args.adapter,
            args.dst,
            base_model=args.model,
            num_hidden_layers=load_config(folder).num_hidden_layers,
            force=args.force,
        )
    else:
        from .lora.fuse import fuse

        out = fuse(
            args.model,
            args.adapter,
            args.dst,
            bits=args.bits,
            group_size=args.group_size,
            dtype=args.dtype,
            force=args.force,
        )
    print(out)
    return 0


def version_text() -> str:
    import mlx.core as mx

    from . import __version__, _blas, kernels

    if mx.metal.is_available():
        return f"qmlx {__version__} (mlx {mx.__version__}, Metal GPU; quantized matmuls: MLX's Metal kernels)"
    return (
        f"qmlx {__version__} (mlx {mx.__version__}, CPU; quantized matmuls: {kernels.status}; "
        f"BLAS: {_blas.status})"
    )


def model_text(model: str) -> str:
    """`qmlx --version -m MODEL`: what the model is, from its config.json alone."""
    from .config import ModelConfig
    from .lora.estimate import read_config  # a file, a folder or a hub id's config.json alone

    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    return f"{model}: {ModelConfig.from_dict(read_config(model), source=path).summary()}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qmlx", description="Run, convert, chat with and serve Qwen2/Qwen2.5 models on MLX.")
    parser.add_argument(
        "--version", action="store_true", help="print versions, the kernels and the BLAS in use"
    )
    parser.add_argument(
        "--model", "-m", dest="version_model", metavar="MODEL",
        help="with --version: also describe a model (folder, hub id or config.json): its parameters, "
        "active ones per token for a mixture of experts, and quantization",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import qmlx  # noqa: F401  (loads OpenBLAS before mlx.core)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        if args.version_model:
            try:
                print(model_text(args.version_model))
            except UserError as e:
                print(f"qmlx: error: {e}", file=sys.stderr)
                return 2
        return 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS} if main_thread else {}
    try:
        return args.run(args) or 0
    except KeyboardInterrupt as e:
        name = f"stopped by {signal.Signals(e.signum).name}" if isinstance(e, Stopped) else "interrupted"
        try:
            print(f"\n{name}", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal may be gone
            pass
        return 128 + e.signum if isinstance(e, Stopped) else 130
    except BrokenPipeError:
        return 0
    except USER_ERRORS as e:
        if os.environ.get("QMLX_DEBUG") == "1":
            raise
        print(f"qmlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if os.environ.get("QMLX_DEBUG") == "1":
            raise
        import traceback

        tb = traceback.format_exc().strip().splitlines()[-1]
        print(
            f"qmlx {args.command}: internal error: {tb}\n(this is a bug; run with QMLX_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
