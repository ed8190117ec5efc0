"""The incremental JSON(-schema) checker and the logits processor built on it."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from qmlx.constrain import Grammar, JsonLogitsProcessor, SchemaError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "annotations are ignored"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Pet"}]},
        "ok": {"type": ["boolean", "null"]},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}},
}

VALID = [
    '{"name": "Ann", "age": 3, "tags": ["a"]}',
    '{"tags":["a","b"],"age":-0,"name":"\\u00e9\\n","height":1.5e-3,"ok":null}',
    '{\n  "name": "x",\n  "age": 12,\n  "tags": ["b"],\n  "pet": {"kind": "cat", "extra": [1, {}]}\n}',
    '{"name": "x", "age": 1, "tags": ["a"], "pet": null, "ok": true}',
]
INVALID = [
    '{"name": "x", "age": 1.5, "tags": ["a"]}',  # integer
    '{"name": "x", "age": 1, "tags": []}',  # minItems
    '{"name": "x", "age": 1, "tags": ["a", "b", "a"]}',  # maxItems
    '{"name": "x", "age": 1, "tags": ["c"]}',  # enum
    '{"name": "x", "age": 1}',  # required
    '{"name": "x", "age": 1, "tags": ["a"], "nick": "y"}',  # additionalProperties
    '{"name": "x", "name": "y", "age": 1, "tags": ["a"]}',  # repeated key
    '{"name": "x", "age": 01, "tags": ["a"]}',  # leading zero
    '{"name": "x\x01", "age": 1, "tags": ["a"]}',  # control character
    '{"name": "x", "age": 1, "tags": ["a"], "pet": {"kind": "dog"}}',  # const
    ' {"name": "x", "age": 1, "tags": ["a"]}',  # leading whitespace wastes tokens
]


@pytest.mark.parametrize("text", VALID)
def test_valid_documents_match(text):
    assert Grammar.for_schema(PERSON).matches(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_documents_are_refused(text):
    assert not Grammar.for_schema(PERSON).matches(text)


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_is_accepted_and_closure_completes_it(text):
    g = Grammar.for_schema(PERSON)
    for i in range(len(text.encode())):
        prefix = text.encode()[:i]
        state = g.advance(g.start(), prefix)
        assert state is not None, prefix
        done = prefix + g.closure(state)
        assert g.matches(done.decode()), done
        json.loads(done)


def test_json_object_mode_accepts_any_object_only():
    g = Grammar.json_object()
    assert g.matches('{"a": [1, 2.5e3, true, null, "x"], "b": {"c": -0}}')
    for bad in ["[1]", '"x"', "1", '{"a":}', '{"a":1,}', "{}}"]:
        assert not g.matches(bad)


def test_numbers_and_literals():
    n = Grammar.for_schema({"type": "number"})
    for ok in ["0", "-1", "1.25", "1e5", "2.5E-3"]:
        assert n.matches(ok), ok
    for bad in ["01", "1.", "-", ".5", "1e", "+1", "NaN"]:
        assert not n.matches(bad), bad
    e = Grammar.for_schema({"enum": [1, 12, "x", None]})
    assert e.matches("1") and e.matches("12") and e.matches('"x"') and e.matches("null")
    assert not e.matches("123") and not e.matches("2")


def test_unsupported_keywords_are_named():
    with pytest.raises(SchemaError) as e:
        Grammar.for_schema(
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}, "oneOf": []}
        )
    assert "pattern (at .properties.a)" in str(e.value) and "oneOf (at the root)" in str(e.value)
    with pytest.raises(SchemaError, match="required"):
        Grammar.for_schema(
            {"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}
        )
    with pytest.raises(SchemaError, match="not defined"):
        Grammar.for_schema({"$ref": "#/$defs/Nope"})
    # Lenient mode (tool parameters) ignores what it cannot enforce.
    assert Grammar.for_schema({"type": "string", "pattern": "x"}, strict=False).matches('"y"')


# ---------------------------------------------------------------------- the processor


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tiny import write_tokenizer

    folder = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(folder)
    from qmlx.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def run_processor(tok, grammar, max_tokens, seed):
    """Greedy decoding over random logits through the processor, as generate_step drives it."""
    rng = np.random.default_rng(seed)
    proc = JsonLogitsProcessor(grammar, tok, max_tokens, candidates=32)
    history = mx.array(tok.encode("prompt"))
    out = []
    for _ in range(max_tokens):
        logits = mx.array(rng.normal(size=(1, tok.vocab_size)).astype(np.float32))
        masked = proc(history, logits)
        t = int(mx.argmax(masked[0]).item())
        if t in tok.eos_token_ids:
            break
        out.append(t)
        history = mx.concatenate([history, mx.array([t])])
    return tok.decode(out)


@pytest.mark.parametrize("max_tokens", [3, 8, 20, 60])
def test_processor_output_always_parses_within_budget(tiny_tokenizer, max_tokens):
    tok = tiny_tokenizer
    tok.eos_token_ids = [tok.token_to_id("<|im_end|>")]
    for schema in (
        PERSON,
        {"type": "object"},
        {"type": "array", "items": {"type": "integer"}, "minItems": 2},
    ):
        g = Grammar.for_schema(schema)
        need = len(g.closure(g.start()))
        for seed in range(3):
            text = run_processor(tok, g, max(max_tokens, need), seed)
            assert g.matches(text), (schema, text)
            json.loads(text)


def test_recursive_schemas():
    tree = {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["v"],
            }
        },
    }
    g = Grammar.for_schema(tree)
    assert g.matches('{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}')
    assert not g.matches('{"v": 1, "kids": [{"kids": []}]}')
    endless = {
        "$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]}}
    }
    with pytest.raises(SchemaError, match="no finite value"):
        Grammar.for_schema({"type": "object", "properties": {"x": {"$ref": "#/$defs/A"}}, **endless})
    # A way out (null) makes it finite again.
    ok = {
        "$defs": {
            "A": {
                "type": ["object", "null"],
                "properties": {"a": {"$ref": "#/$defs/A"}},
                "required": ["a"],
            }
        }
    }
    assert Grammar.for_schema({"$ref": "#/$defs/A", **ok}).matches('{"a": {"a": null}}')
