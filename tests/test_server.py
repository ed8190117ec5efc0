"""The HTTP server on a tiny random model: formats, every error path, auth, concurrency.

Most tests use FastAPI's TestClient; the ones about disconnecting clients run a real uvicorn
on a free loopback port (`running_server`, also used by the slow tests with the real model).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from tiny import tiny_config, write_folder

import qmlx
from qmlx.constrain import ConstraintProcessor
from qmlx.server import Engine, create_app

MESSAGES = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def running_server(engine: Engine, **app_kwargs):
    """A real uvicorn serving `engine` on 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine, **app_kwargs), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config())
    return qmlx.load(folder)


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    eng = Engine(model, tok, "tiny", max_concurrency=3)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine, max_body=50_000))


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0.0, **body})


def sse_events(text: str) -> list:
    lines = [ln[len("data: ") :] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def assert_error(r, status: int, param=None, code=None, contains: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


# ---------------------------------------------------------------------- formats


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["object"] == "model"
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["active"] == 0


def test_chat_non_streaming_has_usage(client):
    r = chat(client, max_tokens=6)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["completion_tokens"] <= 6 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_streaming_matches_non_streaming(client):
    whole = chat(client, max_tokens=8).json()
    r = chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert (
        len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    )
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_logprobs(client):
    body = chat(client, max_tokens=4, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] - (
        body["choices"][0]["finish_reason"] == "stop"
    )
    for item in content:
        assert len(item["top_logprobs"]) == 3 and item["logprob"] <= 0
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][-1]["logprob"]


def test_text_completion_and_stop_string(client):
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 12, "temperature": 0})
    body = r.json()
    text = body["choices"][0]["text"]
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 5
    stop = next((text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2] not in text[:i]), None)
    if stop is None:
        pytest.skip("the random model repeated itself")
    r = client.post(
        "/v1/completions",
        json={"prompt": "hello", "max_tokens": 12, "temperature": 0, "stop": [stop]},
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"
    r = client.post(
        "/v1/completions",
        json={"prompt": [104, 105], "max_tokens": 3, "logprobs": 2, "stream": True},
    )
    events = sse_events(r.text)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(
        len(e["choices"][0]["logprobs"]["top_logprobs"][0]) <= 2 for e in events if e["choices"][0]["text"]
    )


# ---------------------------------------------------------------------- structured output, tools

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("max_tokens", [1, 12, 40])
def test_json_schema_output_always_parses(client, max_tokens):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    for temperature in (0.0, 1.0):
        body = chat(client, max_tokens=max_tokens, temperature=temperature, response_format=fmt).json()
        out = json.loads(body["choices"][0]["message"]["content"])
        assert set(out) == {"city", "days", "unit"} and isinstance(out["days"], int) and out["unit"] in "CF"


def test_json_object_streamed(client):
    r = chat(client, max_tokens=16, stream=True, response_format={"type": "json_object"})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text))
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("max_tokens", [2, 40])
def test_guided_fields_and_llama_cpp_grammar_fields(client, max_tokens):
    """vLLM's guided_* fields on both endpoints and llama.cpp's grammar / json_schema on completions, streamed
    and whole; every output is checked with `re` / `json`, also when max_tokens cut it short."""
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    cases = [
        ({"guided_regex": pattern}, lambda t: re.fullmatch(pattern, t)),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_grammar": 'root ::= "(" [0-9]+ ")"'}, lambda t: re.fullmatch(r"\([0-9]+\)", t)),
        (
            {"guided_json": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
            lambda t: isinstance(json.loads(t), list),
        ),
    ]
    completion_cases = cases + [
        ({"grammar": 'root ::= ("yes" | "no") "!"'}, lambda t: t in ("yes!", "no!")),
        (
            {"json_schema": {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}},
            lambda t: json.loads(t)["a"] == 1,
        ),
    ]
    for fields, ok in cases:
        body = chat(client, max_tokens=max_tokens, **fields).json()
        assert ok(body["choices"][0]["message"]["content"]), (fields, body)
        r = chat(client, max_tokens=max_tokens, stream=True, **fields)
        text = "".join(
            e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text) if e["choices"]
        )
        assert ok(text), (fields, text)
    for fields, ok in completion_cases:
        body = {"prompt": "Answer:", "max_tokens": max_tokens, "temperature": 1.0, "seed": 3, **fields}
        out = client.post("/v1/completions", json=body).json()
        assert ok(out["choices"][0]["text"]), (fields, out)
        r = client.post("/v1/completions", json={**body, "stream": True})
        text = "".join(e["choices"][0]["text"] for e in sse_events(r.text) if e["choices"])
        assert ok(text), (fields, text)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


def test_tool_choice_required_and_named_force_a_call(client):
    for choice, names in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ):
        body = chat(client, max_tokens=30, tools=TOOLS, tool_choice=choice).json()
        c = body["choices"][0]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        call = c["message"]["tool_calls"][0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "get_weather":
            assert isinstance(args["city"], str)


def test_a_forced_call_cut_short_by_max_tokens_still_parses(client):
    body = chat(client, max_tokens=2, tools=TOOLS, tool_choice="required").json()
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] in ("get_weather", "get_time")
    assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_forced_call_streams_as_a_tool_call_delta(client):
    r = chat(
        client,
        max_tokens=30,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
    )
    events = sse_events(r.text)
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert len(deltas) == 1 and deltas[0]["index"] == 0 and deltas[0]["function"]["name"] == "get_time"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_results_are_accepted_in_the_conversation(client):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({"messages": []}, "messages", ""),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", ""),
        ({"messages": [{"role": "user", "content": 5}]}, None, ""),
        ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens", ""),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens", ""),
        ({"messages": MESSAGES, "max_tokens": 10**12}, "max_tokens", "context"),
        (
            {"messages": MESSAGES, "max_completion_tokens": 100000},
            "max_completion_tokens",
            "context",
        ),
        ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens", "integer"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature", ""),
        ({"messages": MESSAGES, "temperature": -1}, "temperature", ""),
        ({"messages": MESSAGES, "top_p": 0}, "top_p", ""),
        ({"messages": MESSAGES, "top_k": 10**9}, "top_k", "vocabulary"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream", ""),
        ({"messages": MESSAGES, "stop": 7}, None, ""),
        ({"messages": MESSAGES, "stop": ["x"] * 17}, "stop", ""),
        ({"messages": MESSAGES, "n": 2}, "n", ""),
        ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias", ""),
        ({"messages": MESSAGES, "logit_bias": {"5": 1000}}, "logit_bias", ""),
        ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs", ""),
        ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice", "requires tools"),
        (
            {
                "messages": MESSAGES,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "nope",
        ),
        (
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": ""}}]},
            None,
            "",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0",
            "text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
            "",
        ),
        (
            {
                "messages": MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "not": {"const": "a"}}},
                },
            },
            "response_format.json_schema.schema",
            'unsupported JSON Schema keyword(s): ["not"]',
        ),
        ({"messages": MESSAGES, "guided_regex": "[a-z+"}, "guided_regex", "unclosed character class"),
        ({"messages": MESSAGES, "guided_choice": []}, "guided_choice", "non-empty list"),
        ({"messages": MESSAGES, "guided_grammar": "start: x"}, "guided_grammar", "guided_grammar"),
        (
            {"messages": MESSAGES, "guided_regex": "a", "response_format": {"type": "json_object"}},
            "guided_regex",
            "cannot both constrain",
        ),
        ({"messages": MESSAGES, "response_format": {"type": "xml"}}, None, ""),
        (
            {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "",
        ),
        (
            {"messages": [{"role": "user", "content": "x" * 600}]},
            "messages",
            "maximum context length",
        ),
    ],
)
def test_bad_requests_get_400_with_an_openai_error(client, body, param, contains):
    r = client.post("/v1/chat/completions", json=body)
    assert_error(r, 400, param, contains=contains)


def test_malformed_bodies(client):
    for raw in [
        b"{bad",
        b"",
        b"[]",
        b'"x"',
        b"\xff\xfe",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    ]:
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 or r.status_code == 200, (raw, r.text)
        if r.status_code == 400:
            assert "error" in r.json()
    assert_error(
        client.post("/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"}),
        400,
        contains="JSON",
    )


def test_body_size_limit(client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 60_000}]}).encode()
    assert_error(
        client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}),
        413,
    )

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b" " * 10_000

    assert_error(
        client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
        413,
    )


def test_completions_refusals(client):
    post = lambda body: client.post("/v1/completions", json=body)
    assert_error(post({"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(post({"prompt": [1, 10**9]}), 400, "prompt")
    assert_error(post({"prompt": ""}), 400, "prompt")
    assert_error(post({"prompt": "x", "echo": True}), 400, "echo")
    assert_error(post({"prompt": "x", "max_tokens": 600}), 400, "max_tokens")


def test_unknown_paths_and_methods(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")


def test_api_key(engine):
    c = TestClient(create_app(engine, api_key="s3cret"))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        assert_error(c.get("/v1/models", headers=headers), 401, code="invalid_api_key")
        assert_error(c.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=headers), 401)
    assert_error(c.get("/health"), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert chat_with(c, ok).status_code == 200


def chat_with(c, headers):
    return c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, headers=headers)


def test_the_server_still_serves_after_all_that(client):
    assert chat(client, max_tokens=2).status_code == 200


# ---------------------------------------------------------------------- concurrency


def test_concurrent_requests_get_the_same_answers_as_sequential(client):
    prompts = [f"question {i}" for i in range(6)]
    body = lambda p: {
        "messages": [{"role": "user", "content": p}],
        "max_tokens": 10,
        "temperature": 0,
    }
    alone = [
        client.post("/v1/chat/completions", json=body(p)).json()["choices"][0]["message"]["content"]
        for p in prompts
    ]
    results: dict[int, str] = {}

    def run(i):
        with TestClient(client.app) as c:
            stream = i % 2 == 0
            r = c.post("/v1/chat/completions", json={**body(prompts[i]), "stream": stream})
            if stream:
                results[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text))
            else:
                results[i] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results.get(i) for i in range(len(prompts))] == alone


def wait_idle(engine, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        load = engine.occupancy()
        if load["active"] == 0 and load["queued"] == 0:
            return load
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.occupancy()}")


@pytest.fixture(scope="module")
def slow_engine(tmp_path_factory):
    """A wider random model, slow enough (a few ms a token) for a client to leave mid-way."""
    folder = str(tmp_path_factory.mktemp("wide"))
    cfg = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8)
    write_folder(folder, cfg)
    eng = Engine(*qmlx.load(folder), "wide", max_concurrency=2)
    eng.start()
    yield eng
    eng.stop()


def test_disconnecting_clients_free_their_slots(slow_engine):
    import httpx2 as httpx

    engine = slow_engine
    tok = engine.tokenizer
    # Sampled, but never the end: every job runs until its client leaves.
    no_end = {str(t): -100 for t in tok.eos_token_ids}
    body = {"messages": MESSAGES, "max_tokens": 480, "stream": True, "temperature": 1.0, "logit_bias": no_end}
    with running_server(engine) as url:
        for _ in range(3):  # more clients than slots: each must free its slot for the next
            with httpx.Client(base_url=url, timeout=30) as c:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    for i, _line in enumerate(r.iter_lines()):
                        if i > 6:
                            break  # hang up mid-stream
        # A non-streaming client that hangs up once its job is running.
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps({**body, "stream": False}).encode()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            deadline = time.time() + 30
            while engine.stats["cancelled"] < 3 or engine.occupancy()["active"] == 0:
                assert time.time() < deadline, engine.occupancy()
                time.sleep(0.02)
        wait_idle(engine, timeout=30)
        assert engine.stats["cancelled"] == 4 and engine.stats["completed"] == 0
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
            assert r.status_code == 200
        assert engine.stats["completed"] == 1


def test_a_conversation_reuses_its_prompt_cache_with_the_same_answers(tiny, engine, client):
    from qmlx.generate import generate

    model, tok = tiny
    wait_idle(engine)
    first = [{"role": "user", "content": "tell me a story about a cat"}]
    a = chat(client, messages=first, max_tokens=8).json()["choices"][0]["message"]["content"]
    before = engine.stats["prompt_tokens_reused"]
    turn = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "more"}]
    b = chat(client, messages=turn, max_tokens=8).json()["choices"][0]["message"]["content"]
    assert engine.stats["prompt_tokens_reused"] - before >= len(tok.encode("tell me a story"))
    second = chat(client, messages=turn, max_tokens=8).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(tok.encode("tell me a story"))
    # The same answer as a fresh generation with no cache at all.
    prompt = tok.apply_chat_template(turn, add_generation_prompt=True)
    assert b == generate(model, tok, prompt, 8, temperature=0.0)


def test_prefix_caches_on_disk_serve_a_later_request_and_outlive_the_engine(tiny, tmp_path):
    """--prompt-cache-dir with no memory for caches: a conversation's next turn starts from the file its
    first turn left (usage.cached_tokens, the disk metrics) with the same answer as a fresh generation;
    a new engine on the same folder finds the entries again."""
    from qmlx.generate import generate

    model, tok = tiny
    folder = str(tmp_path / "pc")
    eng = Engine(model, tok, "tiny", prompt_cache_bytes=0, prompt_cache_dir=folder)
    eng.start()
    try:
        c = TestClient(create_app(eng))
        first = [{"role": "user", "content": "tell me a story about a cat"}]
        a = chat(c, messages=first, max_tokens=8).json()["choices"][0]["message"]["content"]
        wait_idle(eng)
        turn = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "more"}]
        second = chat(c, messages=turn, max_tokens=8).json()
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(tok.encode("tell me a story"))
        prompt = tok.apply_chat_template(turn, add_generation_prompt=True)
        assert second["choices"][0]["message"]["content"] == generate(model, tok, prompt, 8, temperature=0.0)
        wait_idle(eng)
        text = c.get("/metrics").text
        assert re.search(r"^qmlx_prefix_cache_disk_hits_total [1-9]", text, re.M), text
        assert re.search(r"^qmlx_prefix_cache_disk_entries [1-9]", text, re.M), text
        assert "qmlx_prefix_cache_entries 0" in text
    finally:
        eng.stop()
    again = Engine(model, tok, "tiny", prompt_cache_dir=folder)
    assert len(again.prefixes.disk.entries) >= 1


def _together(client, bodies: list[dict]) -> list:
    """POST every chat body at once (one thread each); the responses in order."""
    out: list = [None] * len(bodies)

    def run(i):
        with TestClient(client.app) as c:
            out[i] = c.post("/v1/chat/completions", json=bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def _answer(r) -> tuple:
    m = r.json()["choices"][0]["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
    return m["content"], calls, r.json()["choices"][0]["finish_reason"]


def test_json_schema_and_tool_call_requests_batched_with_plain_ones(client, engine):
    """Constrained rows keep their grammar per row in a batch, and every answer is its answer alone."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    base = {"messages": MESSAGES, "temperature": 0.0}
    bodies = [
        {**base, "max_tokens": 20},
        {**base, "max_tokens": 40, "response_format": fmt},
        {**base, "max_tokens": 30, "tools": TOOLS, "tool_choice": "required"},
        {
            **base,
            "messages": [{"role": "user", "content": "a longer question for the model"}],
            "max_tokens": 12,
        },
    ]
    wait_idle(engine)
    alone = [_answer(client.post("/v1/chat/completions", json=b)) for b in bodies]
    steps = engine.decoder.steps
    together = [_answer(r) for r in _together(client, bodies)]
    assert together == alone
    assert set(json.loads(together[1][0])) == {"city", "days", "unit"}
    assert together[2][2] == "tool_calls" and together[2][1][0][0] in ("get_weather", "get_time")
    assert engine.decoder.steps - steps < sum(b["max_tokens"] for b in bodies)  # rows did share steps


def test_a_request_failing_alone_fails_only_itself(tiny, engine, client, monkeypatch):
    """A bug in one request's own part of a step (its grammar) fails that request with a 500 error object;
    the requests batched with it finish normally."""
    wait_idle(engine)
    real = ConstraintProcessor.__call__

    def broken(self, history, logits):
        if self._seen is not None:  # its second step
            raise RuntimeError("boom")
        return real(self, history, logits)

    monkeypatch.setattr(ConstraintProcessor, "__call__", broken)
    plain = {"messages": MESSAGES, "temperature": 0.0, "max_tokens": 12}
    bad = {**plain, "response_format": {"type": "json_object"}}
    want = _answer(client.post("/v1/chat/completions", json=plain))
    r_plain, r_bad, r_bad_stream = _together(client, [plain, bad, {**bad, "stream": True}])
    assert _answer(r_plain) == want
    assert_error(r_bad, 500, contains="generation failed: RuntimeError: boom")
    assert r_bad_stream.status_code == 200 and '"error"' in r_bad_stream.text
    assert r_bad_stream.text.rstrip().endswith("[DONE]")
    monkeypatch.undo()
    assert chat(client, max_tokens=2).status_code == 200 and engine.thread.is_alive()
    assert wait_idle(engine) == {"active": 0, "queued": 0}


def test_an_engine_fault_fails_the_batch_and_the_engine_goes_on(tiny, engine, client, monkeypatch):
    """The batched forward pass itself raises (injected): every request in that batch gets a 500 error
    object, none hangs, and the next request is served as if nothing had happened."""
    wait_idle(engine)
    decoder = engine.decoder
    real, calls = decoder.model, {"n": 0}

    def faulty(*args, **kwargs):  # every pass fails while patched, whichever requests it serves then
        calls["n"] += 1
        raise RuntimeError("injected fault")

    faulty.layers = real.layers
    monkeypatch.setattr(decoder, "model", faulty)
    body = {"messages": MESSAGES, "temperature": 0.0, "max_tokens": 30}
    before = engine.stats["failed"]
    results = _together(client, [body, {**body, "stream": True}])
    assert_error(results[0], 500, contains="injected fault")
    assert '"injected fault' in results[1].text or "injected fault" in results[1].text
    assert results[1].text.rstrip().endswith("[DONE]")
    assert engine.stats["failed"] - before == 2
    monkeypatch.undo()
    assert engine.thread.is_alive() and wait_idle(engine) == {"active": 0, "queued": 0}
    assert chat(client, max_tokens=3).status_code == 200


def test_metrics_are_prometheus_text(client, engine):
    chat(client, max_tokens=2)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
    assert values["qmlx_requests_completed_total"] >= 1 and values["qmlx_generated_tokens_total"] >= 1
    for name in ("qmlx_queued_requests", "qmlx_batch_size", "qmlx_prefix_cache_hits_total",
                 "qmlx_generation_tokens_per_second", "qmlx_requests_rejected_total"):  # fmt: skip
        assert name in values


def test_request_timeout_fails_with_an_error_object(tiny):
    model, tok = tiny
    eng = Engine(model, tok, "tiny", request_timeout=0.001)
    eng.start()
    try:
        c = TestClient(create_app(eng))
        time.sleep(0.01)
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 400})
        if r.status_code != 200:  # it may also finish first; a 400-token answer of a random model rarely does
            assert_error(r, 504, code="timeout")
        assert eng.metrics()["requests_timed_out"] + eng.metrics()["requests_completed"] == 1
    finally:
        eng.stop()


def test_a_full_queue_answers_429(tiny):
    model, tok = tiny
    idle = Engine(model, tok, "tiny", max_queue=0)  # never started: nothing leaves the queue
    r = TestClient(create_app(idle)).post("/v1/chat/completions", json={"messages": MESSAGES})
    assert_error(r, 429, code="server_busy")
    assert r.headers["retry-after"] == "1" and idle.metrics()["requests_rejected"] == 1


def test_serve_command_refuses_a_taken_port():
    from qmlx.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--model", "unused", "--port", str(s.getsockname()[1])]) == 2
    assert main(["serve", "--model", "unused", "--max-concurrency", "0"]) == 2
    assert main(["serve", "--model", "unused", "--prompt-cache-bytes", "lots"]) == 2
    assert main(["serve", "--model", "unused", "--request-timeout", "0"]) == 2
    assert main(["serve", "--model", "unused", "--max-queue", "-1"]) == 2
