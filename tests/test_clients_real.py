"""Other dialects of `qmlx serve` on the real Qwen2.5-Coder-0.5B-Instruct, through their official clients."""

from __future__ import annotations

import pytest
from test_server import running_server

from qmlx.server import Engine

pytestmark = pytest.mark.slow

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
GREEDY = {"extra_body": {"temperature": 0}}  # the anthropic client no longer sends temperature itself


@pytest.fixture(scope="module")
def url(real_model):
    model, tok = real_model
    engine = Engine(model, tok, "qwen", max_concurrency=2)
    engine.start()
    with running_server(engine, api_key="test-key") as u:
        yield u
    engine.stop()


@pytest.fixture(scope="module")
def claude(url):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=url, api_key="test-key", max_retries=0, timeout=120)


def test_anthropic_streams_a_message(claude):
    ask = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    with claude.messages.stream(model="qwen", max_tokens=8, messages=ask, **GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert "Paris" in text and final.stop_reason == "end_turn" and final.usage.output_tokens >= 1
    n = claude.messages.count_tokens(model="qwen", messages=ask).input_tokens
    assert n == final.usage.input_tokens


def test_anthropic_tool_use_round_trip(claude):
    ask = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    m = claude.messages.create(model="qwen", max_tokens=48, messages=ask, tools=[WEATHER], **GREEDY)
    assert m.stop_reason == "tool_use", m.content
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and "paris" in use.input["city"].lower()
    result = (
        "Result of get_weather: 31 degrees Celsius, sunny. Now answer the user's question in one sentence."
    )
    follow = ask + [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]},
    ]
    m2 = claude.messages.create(model="qwen", max_tokens=40, messages=follow, tools=[WEATHER], **GREEDY)
    text = "".join(b.text for b in m2.content if b.type == "text")
    assert m2.stop_reason == "end_turn" and "31" in text


def test_ollama_lists_fills_in_the_middle_and_chats(url):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=url, headers={"Authorization": "Bearer test-key"}, timeout=120)
    assert [m.model for m in client.list().models] == ["qwen"]
    prefix = 'def celsius_to_fahrenheit(c: float) -> float:\n    """Convert degrees Celsius to degrees Fahrenheit."""\n'
    suffix = "\n\nassert celsius_to_fahrenheit(100) == 212\nassert celsius_to_fahrenheit(0) == 32\n"
    r = client.generate(
        model="qwen",
        prompt=prefix,
        suffix=suffix,
        options={"temperature": 0, "num_predict": 40, "stop": ["\n\n"]},
    )
    ns: dict = {}
    exec(
        compile(prefix + r.response + suffix, "fim", "exec"), ns
    )  # the model's own code, asserted by its suffix
    tool = {"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                             "parameters": WEATHER["input_schema"]}}  # fmt: skip
    ask = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    parts = list(
        client.chat(
            model="qwen",
            messages=ask,
            tools=[tool],
            stream=True,
            options={"temperature": 0, "num_predict": 48},
        )
    )
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert "paris" in calls[0].function.arguments["city"].lower()
    assert parts[-1].done and parts[-1].done_reason == "stop"
