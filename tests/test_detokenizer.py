"""The streaming detokenizer on synthetic tokens that split UTF-8 characters anywhere."""

import random

import pytest

from qmlx.tokenizer import StreamingDetokenizer

TEXT = "한국어 ünï 递归 🧑‍💻 ok € 𝄞!"


class ByteChunks:
    """A byte-level 'tokenizer' whose tokens are arbitrary byte strings (id = index)."""

    def __init__(self, chunks, byte_level=True):
        self.chunks = chunks
        self.byte_level = byte_level

    def token_bytes(self, t):
        return self.chunks[t] if self.byte_level else None

    def decode(self, ids):
        if self.byte_level:
            raise AssertionError("byte-level streaming must not re-decode (O(1) per token)")
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


def random_split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, len(data) - 1)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def complete_prefix(data: bytes) -> str:
    """The text of the longest prefix of `data` that ends on a character boundary."""
    for end in range(len(data), -1, -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_emit_each_character_as_soon_as_it_is_complete(seed):
    data = TEXT.encode()
    chunks = random_split(data, random.Random(seed))
    d = StreamingDetokenizer(ByteChunks(chunks))
    shown, seen = "", b""
    for i, c in enumerate(chunks):
        piece = d.add(i)
        assert "\ufffd" not in piece
        shown, seen = shown + piece, seen + c
        assert shown == complete_prefix(seen)
    assert shown + d.finalize() == TEXT


def test_one_byte_per_token_of_a_four_byte_character():
    chunks = [bytes([b]) for b in "𝄞x".encode()]
    d = StreamingDetokenizer(ByteChunks(chunks))
    assert [d.add(i) for i in range(len(chunks))] == ["", "", "", "𝄞", "x"]


def test_invalid_bytes_become_replacement_characters_like_a_full_decode():
    data = b"ok \xff\xfe then \xe4\xb8 cut \xe4\xb8\x80 end \xf0\x9f"
    chunks = [bytes([b]) for b in data]
    d = StreamingDetokenizer(ByteChunks(chunks))
    out = "".join(d.add(i) for i in range(len(chunks))) + d.finalize()
    assert out == data.decode("utf-8", errors="replace")


def test_reset_starts_a_new_stream():
    chunks = ["가".encode()[:2], "가".encode()[2:], b"a"]
    d = StreamingDetokenizer(ByteChunks(chunks))
    assert d.add(0) == ""
    d.reset()
    assert d.add(2) == "a" and d.finalize() == ""


@pytest.mark.parametrize("seed", range(5))
def test_fallback_path_for_tokenizers_without_byte_tokens(seed):
    data = TEXT.encode()
    chunks = random_split(data, random.Random(seed))
    d = StreamingDetokenizer(ByteChunks(chunks, byte_level=False))
    pieces = [d.add(i) for i in range(len(chunks))] + [d.finalize()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
