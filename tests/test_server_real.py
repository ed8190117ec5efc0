"""The server with the real Qwen2.5-Coder-0.5B-Instruct, driven by the official `openai` client."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from test_constrain import SCHEMAS
from test_server import running_server

from qmlx.server import Engine

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client(real_model):
    openai = pytest.importorskip("openai")
    model, tok = real_model
    engine = Engine(model, tok, "qwen", max_concurrency=2)
    engine.start()
    with running_server(engine, api_key="test-key") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0, timeout=120)
    engine.stop()


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_streamed_answer(client):
    stream = client.chat.completions.create(
        model="qwen",
        messages=ask("What is the capital of France? Answer with one word."),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_non_streamed_answer_with_usage(client):
    r = client.chat.completions.create(
        model="qwen",
        messages=[{"role": "system", "content": "Answer tersely."}]
        + ask("What is 2 + 3? Reply with the number only."),
        max_completion_tokens=6,
        temperature=0,
    )
    assert "5" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 10 and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_tool_call_round_trip(client):
    messages = ask("What's the weather like in Paris right now?")
    r = client.chat.completions.create(
        model="qwen", messages=messages, tools=[WEATHER], max_tokens=48, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    # Send the call and its result back, as an OpenAI client does; the answer must use it.
    # (The 0.5B model repeats its call after a bare result -- transformers' generate does the
    # same -- so the result, like many real tools' output, says what to do next.)
    result = (
        "Result of get_weather: 31 degrees Celsius, sunny. Now answer the user's question in one sentence."
    )
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    r = client.chat.completions.create(
        model="qwen", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0
    )
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "31" in answer


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(
        model="qwen",
        messages=ask("Check the weather in Tokyo."),
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=30,
        temperature=0,
        stream=True,
    )
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert "tokyo" in json.loads(calls[0].function.arguments)["city"].lower()


def test_json_schema_response_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "languages": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "languages"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("Alice is 31 and writes Python and Rust. Give her details as JSON."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        max_tokens=60,
        temperature=0,
    )
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    data = json.loads(text)
    assert data["name"] == "Alice" and data["age"] == 31


def test_stop_strings(client):
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("Count from 1 to 10, separated by commas, nothing else."),
        max_tokens=40,
        temperature=0,
        stop=["5"],
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert "4" in text and "5" not in text


def test_concurrent_streams_match_sequential(client):
    questions = ["Name a primary color.", "Name a planet.", "Name a fruit."]
    # No repetition penalty: with prompt-cache reuse, stream_generate's penalty window sees only
    # the newly prefilled suffix of the prompt, so the penalised answer depends on the slot.
    kw = {
        "model": "qwen",
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"repetition_penalty": 1.0},
    }
    alone = [
        client.chat.completions.create(messages=ask(q), **kw).choices[0].message.content for q in questions
    ]
    got: dict[int, str] = {}

    def run(i):
        stream = client.chat.completions.create(messages=ask(questions[i]), stream=True, **kw)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(len(questions))] == alone


def test_wrong_key_is_refused(client):
    import openai

    bad = openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_table_through_the_openai_client(client, name):
    """Each keyword of the table, on the real model via the real client: every answer (even one the
    token limit cut short and the server completed) is accepted by the jsonschema library."""
    schema = SCHEMAS[name]
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("Reply with a JSON value for this JSON Schema:\n" + json.dumps(schema)),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        max_tokens=48,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_regex_choice_and_forced_call_arguments(client):
    date = r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("When did the first person land on the Moon? Give the date."),
        max_tokens=16,
        temperature=0,
        extra_body={"guided_regex": date},
    )
    assert re.fullmatch(date, r.choices[0].message.content)
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("Is Python a programming language?"),
        max_tokens=4,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content == "yes"
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 2},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "forecast", "parameters": params}}
    r = client.chat.completions.create(
        model="qwen",
        messages=ask("I am going to Seoul next week."),
        tools=[tool],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_an_unsupported_keyword_is_refused_by_name(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="not"):
        client.chat.completions.create(
            model="qwen",
            messages=ask("hi"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "not": {"const": "a"}}},
            },
        )
