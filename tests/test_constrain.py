"""Constrained decoding on llguidance (qmlx/constrain.py): every output is checked by `jsonschema`, `re`
or the grammar's own definition, never by the code under test."""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from qmlx.constrain import Constraint, ConstraintError, bridge

# A table of schemas using the keywords a constrained request must honour.
SCHEMAS = {
    "oneOf": {"oneOf": [{"type": "integer", "minimum": 5}, {"type": "string", "maxLength": 3}]},
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },
    "anyOf": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 3}]},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{3}$"},
    "lengths": {"type": "string", "minLength": 4, "maxLength": 9},
    "bounds": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": -3, "maximum": 12},
            "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        },
        "required": ["n", "x"],
        "additionalProperties": False,
    },
    "enum_const": {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog", 3, None]}, "v": {"const": {"k": [1, 2]}}},
        "required": ["kind", "v"],
    },
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        "minItems": 2,
        "maxItems": 3,
    },
    "uniqueItems": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "minItems": 2},
    "prefixItems": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}],
        "items": False,
    },
    "recursive_ref": {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
    },
    "closed_object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny import write_tokenizer

    from qmlx.tokenizer import Tokenizer

    folder = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(folder)
    t = Tokenizer.from_folder(folder)
    t.eos_token_ids = [t.token_to_id("<|im_end|>")]
    return t


def run(tok, constraint, max_tokens, seed, n_vocab=None):
    """Greedy decoding over random logits through the processor, as generate_step drives it: (ids, text)."""
    n_vocab = n_vocab or tok.vocab_size
    rng = np.random.default_rng(seed)
    proc = constraint.processor(tok, n_vocab)
    history = mx.array(tok.encode("prompt"))
    out = []
    for _ in range(max_tokens):
        logits = mx.array(rng.normal(size=(1, n_vocab)).astype(np.float32) * 4)
        t = int(mx.argmax(proc(history, logits)[0]).item())
        if t in tok.eos_token_ids:
            break
        out.append(t)
        history = mx.concatenate([history, mx.array([t])])
    return out, tok.decode(out), proc


def finished(text, proc, ids):
    """The output completed as the server completes one cut short by max_tokens."""
    cut, add = proc.completion(ids)
    return text[: len(text) - cut] + add


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_even_when_cut_short(tok, name):
    """Whatever the logits, the output (plus completion() when max_tokens ran out) is valid JSON that the
    jsonschema library accepts; a long budget ends by itself."""
    schema = SCHEMAS[name]
    c = Constraint.json_schema(schema)
    for max_tokens, seed in [(400, 0), (400, 1), (6, 2), (2, 3)]:
        ids, text, proc = run(tok, c, max_tokens, seed)
        jsonschema.validate(json.loads(finished(text, proc, ids)), schema)
        if len(ids) < max_tokens:  # it stopped by itself: complete, nothing to add
            assert proc.completion(ids) == (0, "")


def test_unsupported_keywords_are_refused_by_name():
    for schema, word in [
        ({"type": "string", "not": {"const": "a"}}, '"not"'),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ]:
        with pytest.raises(ConstraintError, match=re.escape(word)):
            Constraint.json_schema(schema)
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint.json_schema("{nope")


def test_regex_choice_and_grammars(tok):
    pattern = r"(yes|no), [0-9]{2,4}!"
    for seed in range(4):
        ids, text, proc = run(tok, Constraint.regex(pattern), 40, seed)
        assert re.fullmatch(pattern, finished(text, proc, ids)), text
        ids, text, _ = run(tok, Constraint.choice(["red", "green", "blue"]), 40, seed)
        assert text in ("red", "green", "blue")
        # The same language as a GBNF (llama.cpp) and as a Lark (llguidance) grammar.
        gbnf = 'root ::= "(" digit+ ("+" digit+)* ")"\ndigit ::= [0-9]'
        lark = 'start: "(" DIGITS ("+" DIGITS)* ")"\nDIGITS: /[0-9]+/'
        for g in (gbnf, lark):
            ids, text, proc = run(tok, Constraint.grammar_text(g), 30, seed)
            assert re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", finished(text, proc, ids)), text
    with pytest.raises(ConstraintError, match="regex"):
        Constraint.regex("[a-z")
    with pytest.raises(ConstraintError, match="grammar"):
        Constraint.grammar_text("start: undefined_rule")
    with pytest.raises(ConstraintError, match="non-empty"):
        Constraint.choice([])


def test_tool_call_arguments_follow_each_tools_schema(tok):
    tools = [
        ("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        (
            "add",
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/N"}},
                "required": ["a"],
                "$defs": {"N": {"type": "integer"}},
            },
        ),
    ]
    c = Constraint.tool_call(tools)
    schemas = dict(tools)
    for seed in range(6):
        ids, text, proc = run(tok, c, 300, seed)
        call = json.loads(finished(text, proc, ids))
        assert set(call) == {"name", "arguments"} and call["name"] in schemas
        jsonschema.validate(call["arguments"], schemas[call["name"]])
    with pytest.raises(ConstraintError, match=r"tools\[0\]"):
        Constraint.tool_call([("f", {"type": "object", "not": {}})])


def test_the_mask_never_allows_padding_ids_or_special_tokens(tok):
    """Ids past the tokenizer's vocabulary (the embedding's padding rows) and special tokens other than
    the end are never allowed; the end is allowed exactly when the output is complete."""
    n_vocab = tok.vocab_size + 37
    proc = Constraint.choice(["ab"]).processor(tok, n_vocab)
    proc(mx.array([1, 2]), mx.zeros((1, n_vocab)))
    eos = tok.eos_token_ids[0]
    specials = [t for t in range(tok.vocab_size) if tok.is_special(t) and t != eos]
    assert specials
    for step_text in ("a", "b"):
        mask = proc.allowed()
        assert mask.shape == (n_vocab,) and not mask[tok.vocab_size :].any() and not mask[specials].any()
        assert not mask[eos]
        proc.feed(tok.encode(step_text))
    mask = proc.allowed()
    assert mask[eos] and mask.sum() == 1 and proc.done


def test_the_bridge_is_built_once_per_tokenizer(tok):
    assert bridge(tok, tok.vocab_size) is bridge(tok, tok.vocab_size)
    assert bridge(tok, tok.vocab_size + 1) is not bridge(tok, tok.vocab_size)


def test_a_character_split_by_the_cut_is_finished_not_replaced(tok):
    """Cut inside a Korean character (its first UTF-8 byte generated): the completion finishes that
    character and the string, so the text is valid JSON with no U+FFFD."""
    proc = Constraint.json_schema({"type": "string", "minLength": 1}).processor(tok, tok.vocab_size)
    ids = tok.encode('"') + [bridge(tok, tok.vocab_size).byte_token["한".encode()[0]]]
    text = tok.decode(ids)
    assert text.endswith("\ufffd")
    value = json.loads(finished(text, proc, ids))
    assert len(value) == 1 and "\ufffd" not in value and value.encode()[0] == "한".encode()[0]


def test_stream_generate_refuses_drafting_under_a_constraint(tok):
    from tiny import random_model, tiny_config

    from qmlx.generate import stream_generate

    model = random_model(tiny_config())
    proc = Constraint.json_object().processor(tok, model.config.vocab_size)
    with pytest.raises(ValueError, match="drafted tokens"):
        next(stream_generate(model, tok, "hi", 4, prompt_lookup=2, logits_processors=[proc]))
