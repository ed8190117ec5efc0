"""`qmlx chat`: a terminal chat.

`ChatSession` holds the conversation and one prompt cache and knows nothing about terminals;
`run_terminal` renders it with rich (streamed Markdown) and reads input with prompt_toolkit;
`run_plain` serves pipes and scripts. Each turn renders the whole history through the chat
template, and the prompt cache makes the model compute only the tokens that are new.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import Stopped, UserError
from .generate import GenerationEvent, stream_generate
from .prompt_cache import PromptCache

HELP = """\
Commands:
  /help               this help
  /system TEXT        set the system prompt (starts a new conversation)
  /reset              forget the conversation (keeps the system prompt)
  /save FILE          save the conversation as OpenAI-style JSON messages
  /load FILE          load a conversation saved with /save
  /set NAME VALUE     change a setting: temp, top_p, top_k, min_p, repetition_penalty,
                      max_tokens, seed   (e.g. /set temp 0.3)
  /stats              settings and context usage
  /exit               leave (also Ctrl-D, or Ctrl-C at an empty prompt)
Keys: Enter sends; Alt+Enter (or Esc then Enter, or Ctrl-J) adds a new line; pasting
multi-line text works. Ctrl-C while an answer streams stops it and keeps what was said."""

SETTINGS = {
    "temp": ("temperature", float),
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "max_tokens": ("max_tokens", int),
    "seed": ("seed", int),
}


@dataclass
class TurnStats:
    tokens: int = 0
    tps: float = 0.0
    ttft: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Reply:
    """What a slash command or a turn tells the front end."""

    text: str = ""
    exit: bool = False
    notice: str = ""  # e.g. turns dropped to fit the context


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    system: str | None = None
    sampling: dict = field(default_factory=dict)  # None values: generation_config defaults
    max_tokens: int = 1024
    cache_kwargs: dict = field(default_factory=dict)  # max_kv_size, kv_bits, ...
    context_limit: int | None = None

    def __post_init__(self):
        self.messages: list[dict] = []
        self.prompt_cache = PromptCache(**self.cache_kwargs)
        self.last = TurnStats()
        if self.context_limit is None:
            self.context_limit = self.model.config.max_position_embeddings

    # ------------------------------------------------------------------ prompt building
    def _render(self, messages: list[dict]) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = self.tokenizer.apply_chat_template(full, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def prompt_ids(self) -> tuple[list[int], int]:
        """The prompt for the next answer, and how many old turns were dropped to fit it.

        The oldest user/assistant turns go first; the system prompt always stays, and so does
        the newest user message (if even that does not fit, the caller gets a UserError).
        """
        room = self.context_limit - min(self.max_tokens, self.context_limit // 2)
        messages, dropped = self.messages, 0
        ids = self._render(messages)
        while len(ids) > room and len(messages) > 1:
            # drop one exchange: a user message and everything up to the next user message
            cut = 1
            while cut < len(messages) - 1 and messages[cut]["role"] != "user":
                cut += 1
            messages, dropped = messages[cut:], dropped + 1
            ids = self._render(messages)
        if len(ids) > room:
            raise UserError(
                f"the message is too long: {len(ids)} tokens, the context allows {room} "
                f"(context {self.context_limit}, {self.max_tokens} reserved for the answer)"
            )
        self.messages = messages
        return ids, dropped

    # ------------------------------------------------------------------ a turn
    def respond(self, text: str, on_notice: Callable[[str], None] | None = None) -> Iterator[GenerationEvent]:
        """Add a user message and stream the answer; the answer (even a partial one, when the
        caller stops early or Ctrl-C strikes) is kept in the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except UserError:
            self.messages.pop()
            raise
        if dropped and on_notice:
            on_notice(f"(context full: dropped the {dropped} oldest exchange(s) to make room)")
        answer: list[str] = []
        last = None
        kwargs = {k: v for k, v in self.sampling.items() if k != "max_tokens"}
        try:
            for ev in stream_generate(
                self.model, self.tokenizer, ids, self.max_tokens, prompt_cache=self.prompt_cache, **kwargs
            ):
                answer.append(ev.text)
                last = ev
                yield ev
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            if last is not None:
                self.last = TurnStats(
                    tokens=last.generation_tokens,
                    tps=last.generation_tps,
                    ttft=last.time_to_first_token,
                    prompt_tokens=last.prompt_tokens,
                    reused_tokens=self.prompt_cache.reused,
                    finish_reason=last.finish_reason or "interrupted",
                )
            else:
                self.last = TurnStats(finish_reason="interrupted")

    def context_used(self) -> int:
        return len(self.prompt_cache.tokens)

    def stats_line(self) -> str:
        s = self.last
        return (
            f"{s.tokens} tokens · {s.tps:.1f} tokens/s · first token {s.ttft:.2f} s "
            f"({s.prompt_tokens - s.reused_tokens} new prompt tokens) · "
            f"context {self.context_used():,}/{self.context_limit:,}"
        )

    # ------------------------------------------------------------------ slash commands
    def command(self, line: str) -> Reply:
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/exit", "/quit", "/q"):
            return Reply(exit=True)
        if name in ("/help", "/?"):
            return Reply(HELP)
        if name == "/reset":
            self.messages = []
            self.prompt_cache.reset()
            return Reply("conversation cleared")
        if name == "/system":
            if not arg:
                return Reply(f"system prompt: {self.system or '(the model default)'}\nusage: /system TEXT")
            self.system, self.messages = arg, []
            self.prompt_cache.reset()
            return Reply("system prompt set; new conversation started")
        if name == "/save":
            if not arg:
                return Reply("usage: /save FILE")
            return Reply(self.save(arg))
        if name == "/load":
            if not arg:
                return Reply("usage: /load FILE")
            return Reply(self.load(arg))
        if name == "/set":
            return Reply(self._set(arg))
        if name == "/stats":
            settings = {k: v for k, v in self.sampling.items() if v is not None}
            return Reply(
                f"messages: {len(self.messages)} · context {self.context_used():,}/{self.context_limit:,} tokens\n"
                f"settings: max_tokens={self.max_tokens} "
                + " ".join(f"{k}={v}" for k, v in settings.items())
                + " (others: the model's generation_config.json)\n"
                f"last answer: {self.stats_line()}"
            )
        return Reply(f"unknown command {name}; type /help for the list")

    def _set(self, arg: str) -> str:
        key, _, value = arg.partition(" ")
        if key not in SETTINGS or not value.strip():
            return "usage: /set NAME VALUE with NAME one of " + ", ".join(
                sorted(set(SETTINGS) - {"temperature"})
            )
        name, kind = SETTINGS[key]
        try:
            v = kind(value.strip())
        except ValueError:
            return f"/set {key}: {value.strip()!r} is not a{'n integer' if kind is int else ' number'}"
        if name == "max_tokens":
            if v < 1:
                return "/set max_tokens: must be at least 1"
            self.max_tokens = v
        else:
            if v < 0 or (name in ("top_p", "min_p") and v > 1):
                return f"/set {key}: {v} is out of range"
            self.sampling[name] = v
        return f"{key} = {v}"

    def save(self, path: str) -> str:
        path = os.path.expanduser(path)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(messages, f, ensure_ascii=False, indent=2)
            os.replace(tmp, path)
        except OSError as e:
            return f"/save: cannot write {path}: {e.strerror}"
        return f"saved {len(messages)} messages to {path}"

    def load(self, path: str) -> str:
        path = os.path.expanduser(path)
        try:
            with open(path, encoding="utf-8") as f:
                messages = json.load(f)
        except OSError as e:
            return f"/load: cannot read {path}: {e.strerror}"
        except json.JSONDecodeError as e:
            return f"/load: {path} is not JSON ({e})"
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
            and isinstance(m.get("content", ""), str)
            for m in messages
        )  # fmt: skip
        if not ok:
            return f"/load: {path} is not a list of {{'role', 'content'}} messages"
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        self.system = system if system is not None else self.system
        self.messages = messages[1:] if system is not None else messages
        return f"loaded {len(self.messages)} messages from {path}"


# ---------------------------------------------------------------------- front ends
def split_settled(text: str) -> int:
    """Where the text can be cut so the part before it is final Markdown: the last blank line
    outside a code fence. Printing settled blocks once keeps the live area small (no flicker
    on long answers)."""
    cut, in_fence, pos = 0, False, 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```") or stripped.startswith("~~~"):
            in_fence = not in_fence
        pos += len(line)
        if not in_fence and stripped == "" and line.endswith("\n") and pos < len(text):
            cut = pos
    return cut


@contextlib.contextmanager
def _no_echo():
    """Keep the terminal from echoing keys (a Ctrl-C's "^C", typed-ahead text) while an answer
    streams: an echo moves the cursor under rich's live area, which then redraws a line twice."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal (or not POSIX)
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_terminal(session: ChatSession, banner: str) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings
    from rich.console import Console
    from rich.live import Live
    from rich.markdown import Markdown
    from rich.text import Text

    console = Console(highlight=False)
    history_dir = os.path.join(os.path.expanduser("~"), ".cache", "qmlx")
    os.makedirs(history_dir, exist_ok=True)
    keys = KeyBindings()

    @keys.add("escape", "enter")
    @keys.add("c-j")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(
        history=FileHistory(os.path.join(history_dir, "chat_history")),
        key_bindings=keys,
        multiline=False,
        prompt_continuation="… ",
    )
    console.print(Text(banner, style="bold"))
    console.print(Text("Type /help for commands. Alt+Enter for a new line.", style="dim"))
    while True:
        try:
            line = prompt.prompt("› ")
        except Stopped:
            raise  # SIGTERM / SIGHUP: the CLI reports it
        except KeyboardInterrupt:
            return 0  # Ctrl-C at the prompt
        except EOFError:
            return 0  # Ctrl-D
        if not line.strip():
            continue
        if line.startswith("/"):
            reply = session.command(line)
            if reply.exit:
                return 0
            console.print(Text(reply.text, style="cyan"))
            continue
        text, printed, shown_at = "", 0, 0.0
        events = session.respond(line, on_notice=lambda m: console.print(Text(m, style="yellow")))
        # Ctrl-C while answering only raises a flag, checked between tokens: an exception
        # thrown into rich's refresh thread or a pending MLX evaluation could hang them.
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_, stop=stop: stop.set())
        try:
            with _no_echo(), Live(console=console, refresh_per_second=12, transient=False) as live:
                for ev in events:
                    text += ev.text
                    cut = split_settled(text)
                    if cut > printed:
                        # settled blocks are printed once, above the live area
                        live.update(Text(""))
                        console.print(Markdown(text[printed:cut]))
                        printed = cut
                    now = time.monotonic()
                    if now - shown_at > 0.08 or ev.finish_reason or stop.is_set():
                        live.update(Markdown(text[printed:]))
                        shown_at = now
                    if stop.is_set():
                        break
        except UserError as e:
            console.print(Text(str(e), style="red"))
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
            events.close()  # records the answer, even a partial one, in the history
        if stop.is_set():
            console.print(Text("(stopped; the partial answer is kept)", style="yellow"))
        console.print(Text(session.stats_line(), style="dim"))


def run_plain(session: ChatSession, stream=None, out=None) -> int:
    """Scriptable mode: one user message per input line, answers as plain text (default: stdin, stdout)."""
    stream = sys.stdin if stream is None else stream
    out = sys.stdout if out is None else out
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            reply = session.command(line)
            if reply.exit:
                break
            print(reply.text, file=out, flush=True)
            continue
        try:
            for ev in session.respond(line, on_notice=lambda m: print(m, file=sys.stderr)):
                out.write(ev.text)
                out.flush()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        out.write("\n")
        out.flush()
        print(session.stats_line(), file=sys.stderr)
    return 0


DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def resolve_chat_model(model: str | None) -> str:
    """The folder to chat with: a given folder or hub id, a GGUF converted on the fly, or the
    default model converted to 4-bit once and kept in ~/.cache/qmlx/models."""
    from .loader import resolve

    models_dir = os.path.join(os.path.expanduser("~"), ".cache", "qmlx", "models")
    if model is None or model.lower().endswith(".gguf"):
        source = model or DEFAULT_MODEL
        name = os.path.basename(source.rstrip("/")).removesuffix(".gguf") + "-4bit"
        target = os.path.join(models_dir, name)
        if os.path.exists(os.path.join(target, "config.json")):
            return target
        if model is None:
            source = resolve(DEFAULT_MODEL)  # raises a clear message when offline
        elif not os.path.isfile(source):
            raise UserError(f"{source}: no such GGUF file")
        try:
            from convert import convert
        except ImportError:
            raise UserError(
                f"{source}: converting needs the qmlx convert package; pass a model folder instead"
            ) from None
        from .progress import byte_bar

        print(f"converting {source} to 4-bit in {target} (once)…", file=sys.stderr)
        os.makedirs(models_dir, exist_ok=True)
        with byte_bar() as progress:
            convert(source, target, bits=4, group_size=64, progress=progress)
        return target
    return resolve(model)
