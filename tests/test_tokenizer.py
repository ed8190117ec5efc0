"""Tokenizer, chat template rendering and the streaming detokenizer (tiny byte-level vocab)."""

import pytest
from tiny import write_tokenizer

from qmlx.tokenizer import TemplateError, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(str(folder))
    return Tokenizer.from_folder(str(folder))


TEXTS = ["한국어 문장입니다.", "递归是一种函数。", "emoji 🧑‍💻 and ñ", "plain ascii"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level, no merges: one token a byte
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_yields_a_partial_character(tok, text):
    d = tok.detokenizer()
    pieces = [d.add(i) for i in tok.encode(text)] + [d.finalize()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # multi-byte characters are held back until complete: at least one empty step
    if len(text.encode()) > len(text):
        assert "" in pieces[:-1]


def test_special_tokens_are_recognised_and_decoded(tok):
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    d = tok.detokenizer()
    assert "".join(d.add(i) for i in ids) + d.finalize() == "<|im_start|>hi<|im_end|>"


def test_eos_from_tokenizer_config(tok):
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]


def test_incomplete_bytes_at_the_end_are_flushed_as_replacement(tok):
    ids = tok.encode("가")[:2]  # two of three bytes
    d = tok.detokenizer()
    assert [d.add(i) for i in ids] == ["", ""]
    assert d.finalize() == "\ufffd" == tok.decode(ids)


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_errors_are_user_errors(tmp_path):
    write_tokenizer(str(tmp_path))
    t = Tokenizer.from_folder(str(tmp_path))
    t.chat_template = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(TemplateError, match="only user and assistant"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="role"):
        t.apply_chat_template([{"content": "x"}])
    t.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
