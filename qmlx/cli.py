"""The `qmlx` command: argument parsing only; the work is done by the rooms it calls.

Errors the user caused (a wrong path, a bad config field, a bad flag) print one line and exit
with status 2; anything else is a bug, whose traceback is shown only with QMLX_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import UserError

# Errors whose messages are for the user; anything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError)

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(fn):
    """Register a function that adds one subcommand to the parser."""
    COMMANDS[fn.__name__.removeprefix("add_").replace("_", "-")] = fn
    return fn


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation_config.json)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")


def sampling_kwargs(args) -> dict:
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


@command
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    p.add_argument("--model", "-m", required=True, help="model folder or hub repo id")
    p.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads standard input")
    p.add_argument("--system", "-s", help="system prompt (chat template)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    p.add_argument("--prefill-step", type=int, default=512)
    add_sampling_flags(p)
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from .generate import stream_generate
    from .loader import load

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args.model, dtype=args.dtype)
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    last = None
    for ev in stream_generate(
        model,
        tokenizer,
        prompt,
        args.max_tokens,
        stop=args.stop,
        prefill_step=args.prefill_step,
        **sampling_kwargs(args),
    ):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        last = ev
    sys.stdout.write("\n")
    if last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s "
            f"(first token after {last.time_to_first_token:.2f} s)\n"
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s "
            f"[{last.finish_reason}]\npeak memory: {last.peak_memory_gb:.2f} GB",
            file=sys.stderr,
        )
    return 0


def version_text() -> str:
    from . import __version__, _blas
    import mlx.core as mx

    device = "Metal GPU" if mx.metal.is_available() else "CPU"
    return f"qmlx {__version__} (mlx {mx.__version__}, {device}; BLAS: {_blas.status})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmlx", description="Run, convert, chat with and serve Qwen2/Qwen2.5 models on MLX."
    )
    parser.add_argument("--version", action="store_true", help="print versions and the BLAS in use")
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
        return 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
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


if __name__ == "__main__":
    sys.exit(main())
