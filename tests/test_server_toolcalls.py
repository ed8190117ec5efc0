"""Tool-call parsing (streamed in arbitrary pieces) and OpenAI messages -> template dicts."""

from __future__ import annotations

import json
import random

import pytest

from qmlx.toolcalls import MessageError, ToolCallParser, template_messages

ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = ONE + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'


def parse_whole(text: str, names: set[str] | None = None):
    """A whole completion through ToolCallParser: (content or None, calls); content around
    calls is stripped. (What toolcalls.parse_tool_calls did; it had no user outside tests.)"""
    p = ToolCallParser(names)
    events = p.feed(text) + p.finish()
    content = "".join(v for k, v in events if k == "content")
    if p.calls:
        content = content.strip()
    return (content or None), p.calls


def feed_in_pieces(text: str, cuts: list[int]):
    p = ToolCallParser()
    events = []
    last = 0
    for c in sorted(cuts) + [len(text)]:
        events += p.feed(text[last:c])
        last = c
    events += p.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [(v.name, json.loads(v.arguments)) for k, v in events if k == "tool_call"]
    return content, calls


def test_single_call():
    content, calls = parse_whole(ONE)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_two_calls_and_leading_text():
    content, calls = parse_whole("Let me look that up.\n" + TWO + "\n")
    assert content == "Let me look that up."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


def test_plain_text_and_lookalikes_pass_through():
    for text in [
        "no calls here",
        "a < b and <tool",
        "x <tool_cal y",
        "<tool_call> not json </tool_call>",
    ]:
        content, calls = parse_whole(text)
        assert calls == [] and content == text


def test_unclosed_last_call_still_counts_if_it_parses():
    content, calls = parse_whole('<tool_call>\n{"name": "f", "arguments": {}}')
    assert content is None and [c.name for c in calls] == ["f"]
    content, calls = parse_whole('<tool_call>\n{"name": "f", "argu')
    assert calls == [] and content == '<tool_call>\n{"name": "f", "argu'


def test_arguments_as_string_or_missing():
    _, calls = parse_whole('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 1}
    _, calls = parse_whole('<tool_call>{"name": "f"}</tool_call>')
    assert json.loads(calls[0].arguments) == {}


@pytest.mark.parametrize("text", ["Sure. " + TWO, TWO + " done", "a<tool_cal" + ONE + "<b"])
def test_streaming_split_at_every_position(text):
    whole = feed_in_pieces(text, [])
    for i in range(len(text) + 1):
        assert feed_in_pieces(text, [i]) == whole, i
    rng = random.Random(0)
    for _ in range(200):
        cuts = rng.sample(range(1, len(text)), rng.randint(1, 12))
        assert feed_in_pieces(text, cuts) == whole


def test_streamed_content_is_never_a_partial_tag():
    p = ToolCallParser()
    shown = []
    for ch in "Hi <tool_call>" + '{"name": "f", "arguments": {}}</tool_call>':
        shown += [v for k, v in p.feed(ch) if k == "content"]
    assert "".join(shown) == "Hi "
    assert [c.name for c in p.calls] == ["f"]


def test_template_messages_parse_arguments_and_flatten_content():
    msgs = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "weather "},
                {"type": "text", "text": "in Paris?"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    out = template_messages(msgs)
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["content"] == "weather in Paris?"
    assert out[2]["content"] == ""
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[3] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


def test_template_messages_refuse_what_cannot_be_rendered():
    with pytest.raises(MessageError) as e:
        template_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert e.value.param == "messages.0.content.0"
    bad = {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
    }
    with pytest.raises(MessageError) as e:
        template_messages([bad])
    assert e.value.param == "messages.0.tool_calls.0.function.arguments"


BARE = '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```'


@pytest.mark.parametrize(
    "text", [BARE, '{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n" + BARE + "\n"]
)
def test_bare_call_objects_count_when_they_name_an_offered_tool(text):
    content, calls = parse_whole(text, {"get_weather"})
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    for i in range(len(text) + 1):  # the same, streamed in two pieces
        p = ToolCallParser({"get_weather"})
        events = p.feed(text[:i]) + p.feed(text[i:]) + p.finish()
        assert [k for k, _ in events] == ["tool_call"]


@pytest.mark.parametrize(
    "text",
    [
        BARE.replace("get_weather", "rm_rf"),  # not an offered tool
        BARE + "\nThat is how you would call it.",  # more than the call
        '```python\nprint("hi")\n```',
        '{"name": "get_weather"}',  # no arguments: just data
        "Sure! " + BARE,
    ],
)
def test_other_answers_stay_content(text):
    content, calls = parse_whole(text, {"get_weather"})
    assert calls == [] and content == text


def test_plain_answers_are_not_held_back():
    p = ToolCallParser({"get_weather"})
    assert p.feed("The") == [("content", "The")]
    p = ToolCallParser({"get_weather"})
    assert p.feed("```py") == [("content", "```py")]
