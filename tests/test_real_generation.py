"""Real tier for the generation engine: speculative decoding, saved prompt caches and batched
generation on the Qwen2.5-Coder fixture give exactly the plain greedy output. Kept short."""

import pytest

import qmlx
from qmlx.batch import batch_generate
from qmlx.prompt_cache import PromptCache, fill_prompt_cache, load_prompt_cache, save_prompt_cache

pytestmark = pytest.mark.slow

CODE = '''class UserError(ValueError):
    """An error caused by the user's input; the message names the file, field or flag."""


def check(path):
    if not path:
        raise UserError("no path given")
    return path
'''


@pytest.fixture(scope="module")
def edit_prompt(real_model):
    _, tok = real_model
    msg = "Rename UserError to InputError in this code and print all of it:\n```python\n" + CODE + "```"
    # Start the answer with the code block, so the model copies code from the first token.
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": msg}]) + "```python\n")


def greedy(model, tok, ids, n, **kw):
    events = list(qmlx.stream_generate(model, tok, ids, n, temperature=0.0, repetition_penalty=1.0, **kw))
    return [e.token for e in events if e.token is not None], events


@pytest.fixture(scope="module")
def plain(real_model, edit_prompt):
    model, tok = real_model
    return greedy(model, tok, edit_prompt, 24)[0]


def test_prompt_lookup_greedy_equals_plain_on_a_code_edit(real_model, edit_prompt, plain):
    model, tok = real_model
    got, events = greedy(model, tok, edit_prompt, 24, prompt_lookup=3, num_draft_tokens=4)
    assert got == plain
    assert sum(e.from_draft for e in events) >= 8  # the edit copies most of the code


def test_draft_model_greedy_equals_plain(real_model, edit_prompt, plain):
    model, tok = real_model
    got, events = greedy(model, tok, edit_prompt, 12, draft_model=model, num_draft_tokens=3)
    assert got == plain[:12]
    assert sum(e.from_draft for e in events) >= 6


def test_saved_prompt_cache_continues_like_a_cold_run(real_model, edit_prompt, plain, tmp_path):
    model, tok = real_model
    path = str(tmp_path / "edit.safetensors")
    save_prompt_cache(path, fill_prompt_cache(model, edit_prompt[:-5], prefill_step=32), model)
    pc, _ = load_prompt_cache(path, model, {})
    got, _ = greedy(model, tok, edit_prompt, 8, prompt_cache=pc)
    assert pc.reused == len(edit_prompt) - 5
    assert got == plain[:8]


def test_prompt_cache_second_turn_equals_cold_run(real_model):
    model, tok = real_model
    chat = [{"role": "user", "content": "Name one sorting algorithm."}]
    pc = PromptCache()
    first, _ = greedy(model, tok, tok.encode(tok.apply_chat_template(chat)), 6, prompt_cache=pc)
    chat += [
        {"role": "assistant", "content": tok.decode(first)},
        {"role": "user", "content": "Another?"},
    ]
    ids = tok.encode(tok.apply_chat_template(chat))
    warm, _ = greedy(model, tok, ids, 6, prompt_cache=pc)
    assert pc.reused > 20
    assert warm == greedy(model, tok, ids, 6)[0]


def test_batch_rows_equal_single_prompt_outputs(real_model, edit_prompt, plain):
    model, tok = real_model
    other = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi."}]))
    # Penalties now apply per row in a batch: off, as in greedy()
    results = batch_generate(model, tok, [edit_prompt, other], 8, temperature=0.0, repetition_penalty=1.0)
    assert results[0].tokens == plain[:8]
    assert results[1].tokens == greedy(model, tok, other, 8)[0]
