"""The chat session (fast, tiny model) and `qmlx chat` driven in a pseudo-terminal (real model)."""

import json
import os
import re
import sys

import pytest
from tiny import tiny_config, write_folder

import qmlx
from qmlx.chat import ChatSession, split_settled
from qmlx.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    write_folder(str(folder), tiny_config())
    return qmlx.load(str(folder))


def session(tiny, **kw):
    model, tok = tiny
    kw.setdefault("max_tokens", 8)
    return ChatSession(model, tok, sampling={"temperature": 0.0}, **kw)


def test_turns_reuse_the_cache_and_match_a_cold_render(tiny):
    s = session(tiny)
    list(s.respond("hello"))
    turn1_prompt = s.tokenizer.encode(s.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]))
    list(s.respond("and again"))
    # turn 2 did not recompute turn 1's prompt (a random model's answer may not re-tokenize
    # identically; the real-model test below checks the answer is reused too)
    assert s.prompt_cache.reused >= len(turn1_prompt)
    # same answer as a fresh session given the same history
    fresh = session(tiny)
    fresh.messages = s.messages[:2]
    assert "".join(ev.text for ev in fresh.respond("and again")) == s.messages[-1]["content"]


@pytest.mark.slow
def test_real_turn_prefills_only_the_new_message(real_model):
    model, tok = real_model
    s = ChatSession(model, tok, sampling={"temperature": 0.0}, max_tokens=24)
    list(s.respond("Name three colors."))
    held_after_turn1 = len(s.prompt_cache.tokens)
    ids, _ = s.prompt_ids()
    list(s.respond("And three animals?"))
    new = s.last.prompt_tokens - s.last.reused_tokens
    # everything of turn 1 (prompt and answer) was reused; only the new message was computed
    assert s.prompt_cache.reused >= held_after_turn1 - 1
    assert (
        new
        <= len(
            tok.encode("<|im_end|>\n<|im_start|>user\nAnd three animals?<|im_end|>\n<|im_start|>assistant\n")
        )
        + 1
    )


def test_system_prompt_is_rendered_once(tiny):
    s = session(tiny, system="Be brief.")
    for q in ("one", "two", "three"):
        list(s.respond(q))
    ids, _ = s.prompt_ids()
    assert s.tokenizer.decode(ids).count("Be brief.") == 1


def test_partial_answer_is_kept_when_stopped(tiny):
    s = session(tiny, max_tokens=50)
    events = s.respond("tell me a story")
    got = [next(events).text for _ in range(3)]
    events.close()  # what Ctrl-C does in the terminal
    assert s.messages[-1] == {"role": "assistant", "content": "".join(got)}
    assert s.last.finish_reason == "interrupted"
    list(s.respond("continue"))  # and the conversation goes on
    assert len(s.messages) == 4


def test_overflow_drops_oldest_turns_keeps_system(tiny):
    s = session(tiny, system="S", context_limit=160, max_tokens=8)
    notices = []
    for i in range(6):
        list(s.respond(f"question number {i} " * 2, on_notice=notices.append))
    assert notices and "dropped" in notices[0]
    ids, _ = s.prompt_ids()
    assert len(ids) <= 160 - 8
    assert s.tokenizer.decode(ids).startswith("<|im_start|>system\nS")


def test_too_long_message_is_refused_without_losing_history(tiny):
    s = session(tiny, context_limit=64)
    list(s.respond("hi"))
    with pytest.raises(UserError, match="too long"):
        list(s.respond("x" * 500))
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_commands(tiny, tmp_path):
    s = session(tiny)
    list(s.respond("hello"))
    assert "unknown command /frobnicate" in s.command("/frobnicate").text
    assert "/set" in s.command("/help").text
    assert s.command("/set temp 0.3").text == "temp = 0.3" and s.sampling["temperature"] == 0.3
    assert "not a number" in s.command("/set temp warm").text
    assert "out of range" in s.command("/set top_p 2").text
    assert s.command("/set max_tokens 5").text == "max_tokens = 5" and s.max_tokens == 5
    assert "context" in s.command("/stats").text
    path = str(tmp_path / "conv.json")
    assert "saved 2 messages" in s.command(f"/save {path}").text
    assert json.load(open(path))[0] == {"role": "user", "content": "hello"}
    s.command("/reset")
    assert s.messages == [] and s.prompt_cache.tokens == []
    assert "loaded 2 messages" in s.command(f"/load {path}").text
    assert "cannot read" in s.command(f"/load {tmp_path / 'nope.json'}").text
    (tmp_path / "bad.json").write_text('{"role": "user"}')
    assert "not a list" in s.command(f"/load {tmp_path / 'bad.json'}").text
    assert s.command("/system You are a pirate.").text.startswith("system prompt set")
    assert s.messages == [] and s.system == "You are a pirate."
    assert s.command("/exit").exit


def test_split_settled_keeps_code_fences_whole():
    text = "Intro.\n\n```python\ndef f():\n\n    return 1\n```\n\nMore"
    cut = split_settled(text)
    assert text[:cut] == "Intro.\n\n```python\ndef f():\n\n    return 1\n```\n\n"
    assert split_settled("no blank line yet") == 0


@pytest.mark.slow
def test_terminal_chat_end_to_end(fixture_dir, tmp_path):
    """Drive `qmlx chat` in a pseudo-terminal: Korean, a follow-up, Ctrl-C, /reset, /save, /load."""
    pexpect = pytest.importorskip("pexpect")
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "COLUMNS": "100",
        "LINES": "40",
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    child = pexpect.spawn(
        sys.executable, ["-m", "qmlx.cli", "chat", "--model", fixture_dir, "--temp", "0", "--max-tokens", "60"],
        env=env, encoding="utf-8", timeout=240, dimensions=(40, 100),
    )  # fmt: skip
    # Enter is a carriage return in a real terminal (a bare newline, Ctrl-J, adds a line).
    try:
        child.expect("/help for commands")
        child.expect("›")
        child.send("파이썬에서 리스트를 뒤집는 방법을 알려주세요." + "\r")
        child.expect("tokens/s")  # the stats line closes the answer
        assert any("\uac00" <= c <= "\ud7a3" for c in child.before)  # a Korean answer
        assert "\ufffd" not in child.before
        child.expect("›")
        child.send("My name is Minsu. Just say hello to me." + "\r")
        child.expect("tokens/s")
        child.expect("›")
        child.send("What is my name? Answer with the name only." + "\r")
        child.expect("tokens/s")
        assert "Minsu" in child.before  # needs the previous turn
        child.expect("›")
        child.send("/set max_tokens 400" + "\r")
        child.expect("max_tokens = 400")
        child.send("Write a very long, detailed essay about the history of Python." + "\r")
        # prompt_toolkit echoes the input twice; a third "Python" is the answer streaming
        child.expect(re.compile(r"history of Python\..*Python.*Python.*Python", re.S))
        child.sendintr()
        child.expect("partial answer is kept")
        child.expect("›")
        path = str(tmp_path / "conv.json")
        child.send(f"/save {path}" + "\r")
        child.expect("saved 8 messages")
        saved = json.load(open(path))
        assert saved[-1]["role"] == "assistant" and saved[-1]["content"]  # the partial answer
        child.send("/reset" + "\r")
        child.expect("conversation cleared")
        child.send(f"/load {path}" + "\r")
        child.expect("loaded 8 messages")
        child.send("/set max_tokens 30" + "\r")
        child.expect("max_tokens = 30")
        child.send("What is my name? Answer with the name only." + "\r")
        child.expect("tokens/s")
        assert "Minsu" in child.before  # the loaded history is used
        child.expect("›")
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
