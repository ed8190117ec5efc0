"""Fill in the middle (qmlx/fim.py) on a tiny model whose tokenizer has Qwen2.5-Coder's FIM tokens: the
prompt's layout, the end tokens, and the routes that take it (/v1/completions with suffix, llama.cpp's /infill)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from tiny import FIM_TOKENS, TOKENIZER_VOCAB, tiny_config, write_folder, write_tokenizer

import qmlx
from qmlx.fim import ExtraFile, FIMError, fim_prompt, stop_ids
from qmlx.server import Engine, create_app


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fim"))
    write_folder(folder, tiny_config(vocab_size=TOKENIZER_VOCAB + len(FIM_TOKENS)))
    write_tokenizer(folder, fim=True)
    return qmlx.load(folder)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("plain"))
    write_tokenizer(folder)
    return qmlx.tokenizer.Tokenizer.from_folder(folder)


def test_prompt_layout_and_single_id_markers(fim_model):
    _, tok = fim_model
    ids = {t: tok.token_to_id(t) for t in FIM_TOKENS}
    p = fim_prompt(tok, "def f():\n    ", "\n    return x\n")
    assert p[0] == ids["<|fim_prefix|>"] and p[-1] == ids["<|fim_middle|>"] and ids["<|fim_suffix|>"] in p
    assert tok.decode(p) == "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return x\n<|fim_middle|>"
    repo = fim_prompt(tok, "a", "b", [ExtraFile("u.py", "X = 1")], path="m.py")
    assert tok.decode(repo) == (
        "<|repo_name|>project\n<|file_sep|>u.py\nX = 1\n<|file_sep|>m.py\n<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    )
    # Code that quotes a marker is code: the marker's text, not its id.
    quoted = fim_prompt(tok, 'M = "<|fim_middle|>"', "")
    assert quoted.count(ids["<|fim_middle|>"]) == 1 and "<|fim_middle|>" in tok.decode(quoted[1:-2])
    assert set(stop_ids(tok)) == {tok.token_to_id(t) for t in ["<|endoftext|>", *FIM_TOKENS]}


def test_a_vocabulary_without_fim_tokens_is_refused(plain_tok):
    with pytest.raises(FIMError, match=r"no <\|fim_prefix\|>, <\|fim_suffix\|>, <\|fim_middle\|>"):
        fim_prompt(plain_tok, "a", "b")


@pytest.fixture(scope="module")
def client(fim_model):
    model, tok = fim_model
    eng = Engine(model, tok, "tiny-fim", max_concurrency=2)
    eng.start()
    yield TestClient(create_app(eng)), tok
    eng.stop()


def test_completions_with_suffix_and_infill(client):
    c, tok = client
    want = fim_prompt(tok, "def add(a, b):\n    ", "\n")
    pad = tok.token_to_id("<|fim_pad|>")
    body = {"prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 8, "temperature": 0}
    r = c.post("/v1/completions", json=body).json()
    assert r["usage"]["prompt_tokens"] == len(want)
    # A FIM end token ends the completion, unseen.
    r = c.post("/v1/completions", json={**body, "logit_bias": {str(pad): 100}}).json()
    assert r["choices"][0] == {**r["choices"][0], "text": "", "finish_reason": "stop"}
    assert r["usage"]["completion_tokens"] == 1
    # llama.cpp's /infill, shaped as llama.vscode sends it (unknown fields are ignored).
    infill = {
        "input_prefix": "def add(a, b):\n    ",
        "input_suffix": "\n",
        "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
        "prompt": "return",
        "n_predict": 6,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1000,
        "response_fields": ["content", "timings/prompt_n"],
    }
    r = c.post("/infill", json=infill)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["content"], str) and out["stop"] is True and out["stop_type"] == "limit"
    assert out["tokens_predicted"] == 6
    extra = [ExtraFile("util.py", "def helper():\n    pass\n")]
    assert out["tokens_evaluated"] == len(fim_prompt(tok, infill["input_prefix"], "\n", extra)) + len(
        tok.encode("return")
    )
    s = c.post("/infill", json={**infill, "stream": True, "temperature": 0})
    lines = [json.loads(ln[6:]) for ln in s.text.splitlines() if ln.startswith("data: ")]
    assert "[DONE]" not in s.text and lines[-1]["stop"] is True and all(not x["stop"] for x in lines[:-1])
    greedy = c.post("/infill", json={**infill, "temperature": 0}).json()["content"]
    assert "".join(x["content"] for x in lines) == greedy


def test_fim_refusals(client, engine_without_fim):
    c, _ = client
    r = c.post("/v1/completions", json={"prompt": [1, 2], "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    plain = TestClient(create_app(engine_without_fim))
    for path, body, param in [
        ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("/infill", {"input_prefix": "a", "input_suffix": "b"}, "input_prefix"),
    ]:
        r = plain.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert "cannot fill in the middle" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def engine_without_fim(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("nofim"))
    write_folder(folder, tiny_config())
    model, tok = qmlx.load(folder)
    eng = Engine(model, tok, "tiny", max_concurrency=1)
    eng.start()
    yield eng
    eng.stop()
