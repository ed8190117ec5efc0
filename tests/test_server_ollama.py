"""The Ollama API of `qmlx serve`, driven by the official `ollama` client (a tiny model with FIM tokens)."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest
from test_server import running_server
from tiny import FIM_TOKENS, TOKENIZER_VOCAB, tiny_config, write_folder, write_tokenizer

import qmlx
from qmlx.fim import fim_prompt
from qmlx.server import Engine

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fim"))
    write_folder(folder, tiny_config(vocab_size=TOKENIZER_VOCAB + len(FIM_TOKENS)))
    write_tokenizer(folder, fim=True)
    model, tok = qmlx.load(folder)
    engine = Engine(model, tok, "tiny", max_concurrency=2)
    engine.start()
    with running_server(engine) as url:
        yield ollama.Client(host=url, timeout=60), tok
    engine.stop()


def test_list_and_show(setup):
    client, _ = setup
    models = client.list().models
    assert [m.model for m in models] == ["tiny"]
    info = client.show("tiny")
    assert "insert" in info.capabilities and "tools" in info.capabilities
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404 and "not found" in e.value.error


def test_generate_streamed_whole_and_with_suffix(setup):
    client, tok = setup
    opts = {"temperature": 0, "num_predict": 5}
    whole = client.generate(model="tiny", prompt="hi", options=opts)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 5
    parts = list(client.generate(model="tiny", prompt="hi", options=opts, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    fim = client.generate(model="tiny", prompt="def f():\n    ", suffix="\n", options=opts)
    assert fim.prompt_eval_count == len(fim_prompt(tok, "def f():\n    ", "\n"))
    raw = client.generate(model="tiny", prompt="abc", raw=True, options=opts)
    assert raw.prompt_eval_count == len(tok.encode("abc"))


def test_chat_with_format_and_tools(setup):
    client, _ = setup
    msgs = [{"role": "user", "content": "hi"}]
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = client.chat(model="tiny", messages=msgs, format=schema, options={"temperature": 0, "num_predict": 30})
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client.chat(model="tiny", messages=msgs, format="json", options={"num_predict": 20})
    assert isinstance(json.loads(r.message.content), dict)
    parts = list(
        client.chat(model="tiny", messages=msgs, stream=True, options={"temperature": 0, "num_predict": 4})
    )
    assert parts[-1].done and parts[-1].eval_count == 4
    r = client.chat(model="tiny", messages=msgs, tools=[TOOL], options={"num_predict": 4})
    assert r.done and r.message.role == "assistant"
    # A format the client would not send itself: refused in Ollama's error shape.
    bad = client._client.post(
        "/api/chat", json={"model": "tiny", "messages": msgs, "format": "xml", "stream": False}
    )
    assert bad.status_code == 400 and "format" in bad.json()["error"] and set(bad.json()) == {"error"}
