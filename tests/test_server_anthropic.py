"""The Anthropic Messages API of `qmlx serve`, driven by the official `anthropic` client (tiny model)."""

from __future__ import annotations

import anthropic
import jsonschema
import pytest
from test_server import running_server
from tiny import tiny_config, write_folder

import qmlx
from qmlx.server import Engine

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config())
    model, tok = qmlx.load(folder)
    engine = Engine(model, tok, "tiny", max_concurrency=2)
    engine.start()
    with running_server(engine, api_key="k") as url:
        yield anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=60), url, tok
    engine.stop()


def test_message_whole_and_streamed(setup):
    client, _, _ = setup
    kw = {"model": "tiny", "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}
    m = client.messages.create(system="Be brief.", **kw)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("max_tokens", "end_turn")
    assert m.usage.input_tokens > 3 and 1 <= m.usage.output_tokens <= 6
    text = "".join(b.text for b in m.content if b.type == "text")
    with client.messages.stream(system="Be brief.", **kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens


def test_count_tokens_matches_the_prompt(setup):
    client, _, tok = setup
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    n = client.messages.count_tokens(model="tiny", system="S", messages=messages).input_tokens
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello there"}],
        add_generation_prompt=True,
    )
    assert n == len(tok.encode(prompt))


def test_forced_tool_use_round_trip(setup):
    """tool_choice any: a tool_use block whose input follows the tool's schema (constrained), streamed
    as input_json_delta; its tool_result goes back in the next request."""
    client, _, _ = setup
    kw = {"model": "tiny", "max_tokens": 60, "tools": [WEATHER]}
    ask = [{"role": "user", "content": "weather in Oslo?"}]
    m = client.messages.create(messages=ask, tool_choice={"type": "any"}, **kw)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(messages=ask, tool_choice={"type": "tool", "name": "get_weather"}, **kw) as s:
        final = s.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input and final.stop_reason == "tool_use"
    follow = ask + [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}],
        },
    ]
    m2 = client.messages.create(messages=follow, max_tokens=4, model="tiny", tools=[WEATHER])
    assert m2.usage.input_tokens > m.usage.input_tokens


def test_errors_have_anthropics_shape(setup):
    client, url, _ = setup
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [image]}])
    schema = {**WEATHER, "input_schema": {"type": "object", "not": {}}}
    with pytest.raises(anthropic.BadRequestError, match="not"):
        client.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                               tools=[schema], tool_choice={"type": "any"})  # fmt: skip
