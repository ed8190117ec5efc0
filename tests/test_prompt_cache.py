"""Prompt caches saved to disk: identical continuation, refusal of foreign caches, and the
`qmlx cache-prompt` / `qmlx generate --prompt-cache` commands (tiny models)."""

import mlx.core as mx
import pytest
from tiny import tiny_config, write_folder

import qmlx
from qmlx.cache import make_cache
from qmlx.cli import main
from qmlx.errors import UserError
from qmlx.prompt_cache import (
    DiskPrefixes,
    PrefixCache,
    PromptCache,
    check_cache_folder,
    fill_prompt_cache,
    load_prompt_cache,
    model_identity,
    save_cache,
    save_prompt_cache,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    a, b = str(tmp_path_factory.mktemp("a")), str(tmp_path_factory.mktemp("b"))
    cfg = tiny_config(hidden_size=128)  # head_dim 32: room for a quantized KV cache
    write_folder(a, cfg, seed=0)
    write_folder(b, cfg, seed=1)
    return a, b


@pytest.fixture(scope="module")
def tiny(folders):
    return qmlx.load(folders[0])


def tokens(events):
    return [e.token for e in events if e.token is not None]


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 8, "kv_group_size": 32}, {"max_kv_size": 256}])
def test_saved_and_reloaded_cache_continues_identically(tiny, tmp_path, kv):
    model, tok = tiny
    doc = tok.encode("a long document that many questions will share")
    question = doc + tok.encode(" -- and now the question?")
    path = str(tmp_path / "doc.safetensors")
    save_prompt_cache(path, fill_prompt_cache(model, doc, prefill_step=16, **kv), model)
    pc, _ = load_prompt_cache(path, model, kv)
    warm = list(qmlx.stream_generate(model, tok, question, 16, temperature=0.0, prompt_cache=pc))
    assert pc.reused == len(doc)
    cold = qmlx.stream_generate(model, tok, question, 16, temperature=0.0, prompt_cache=PromptCache(**kv))
    assert tokens(warm) == tokens(cold)


def test_model_identity_ignores_dtype_but_not_weights(folders):
    a32, _ = qmlx.load(folders[0], dtype="float32")
    a16, _ = qmlx.load(folders[0], dtype="bfloat16")
    b32, _ = qmlx.load(folders[1], dtype="float32")
    # the tiny folder is float32 on disk, so only a bf16-stored checkpoint is dtype-exact;
    # what matters is that different weights never collide
    assert model_identity(a32) != model_identity(b32)
    assert model_identity(a32) == model_identity(qmlx.load(folders[0], dtype="float32")[0])
    assert len(model_identity(a16)) == 32


def test_foreign_caches_are_refused(folders, tiny, tmp_path):
    model, tok = tiny
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, fill_prompt_cache(model, tok.encode("some prompt")), model)
    other, _ = qmlx.load(folders[1])
    with pytest.raises(UserError, match="another model"):
        load_prompt_cache(path, other)
    with pytest.raises(UserError, match="--kv-bits"):
        load_prompt_cache(path, model, {"kv_bits": 4, "kv_group_size": 32})
    half, _ = qmlx.load(folders[0], dtype="bfloat16")
    with pytest.raises(UserError, match="another model|--dtype"):
        load_prompt_cache(path, half)
    plain = str(tmp_path / "plain.safetensors")
    save_cache(plain, make_cache(2))
    with pytest.raises(UserError, match="not a prompt cache"):
        load_prompt_cache(plain, model)


def test_cli_cache_prompt_then_generate(folders, tmp_path, capsys):
    a, b = folders
    out = str(tmp_path / "p.safetensors")
    assert main(["cache-prompt", "-m", a, "-p", "Read this document first. ", "--out", out]) == 0
    assert "prompt tokens cached" in capsys.readouterr().err
    common = ["generate", "-m", a, "-n", "12", "--temp", "0"]
    assert main(common + ["--prompt-cache", out, "-p", "Now answer."]) == 0
    warm = capsys.readouterr()
    assert "reused" in warm.err and "reused 0 " not in warm.err
    assert main(common + ["-p", "Read this document first. Now answer."]) == 0
    assert capsys.readouterr().out == warm.out
    assert main(["generate", "-m", b, "-n", "4", "--prompt-cache", out, "-p", "x"]) == 2
    assert "another model" in capsys.readouterr().err


def test_cli_generate_cache_and_speculative_flags(folders, capsys):
    a, _ = folders
    base = ["generate", "-m", a, "-n", "10", "--temp", "0", "-p", "def f(x): return f(x"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--prompt-lookup", "2"], ["--draft-model", a, "--num-draft-tokens", "2"]):
        assert main(base + extra) == 0
        got = capsys.readouterr()
        assert got.out == plain and "drafted" in got.err
    assert main(base + ["--kv-bits", "8", "--kv-group-size", "32", "--max-kv-size", "64"]) == 0
    assert main(base + ["--key-bits", "8", "--value-bits", "4", "--kv-group-size", "32"]) == 0
    capsys.readouterr()
    assert main(base + ["--kv-bits", "7", "--kv-group-size", "32"]) == 2
    assert "--kv-bits" in capsys.readouterr().err
    assert main(base + ["--prompt-lookup", "2", "--max-kv-size", "64"]) == 2
    assert "--max-kv-size" in capsys.readouterr().err


# ---------------------------------------------------------------------- PrefixCache (shared across requests)


def _held(model, ids, **kw) -> PromptCache:
    """A PromptCache that has read `ids` (as a finished request leaves it)."""
    pc = PromptCache(**kw)
    caches, todo = pc.prepare(model, ids + [0])
    model(mx.array([todo[:-1]]), cache=caches)
    pc.commit(ids + [0])
    assert pc.tokens == ids
    return pc


def test_prefix_cache_shares_the_longest_prefix_without_changing_it(tiny):
    model, _ = tiny
    store = PrefixCache(1 << 30)
    system = list(range(10, 40))
    store.checkin(_held(model, system + [1, 2, 3]))
    store.checkin(_held(model, list(range(100, 120))))
    before = [mx.array(c.state[0]) for c in store.entries[0][1]]
    pc = store.checkout(model, system + [7, 8, 9])
    assert pc.tokens == system and store.hits == 1 and store.reused_tokens == len(system)
    # The request continues from the shared prefix: same logits as reading everything afresh.
    caches, todo = pc.prepare(model, system + [7, 8, 9])
    assert pc.reused == len(system) and todo == [7, 8, 9]
    got = model(mx.array([todo]), cache=caches)[0, -1]
    want = model(mx.array([system + [7, 8, 9]]))[0, -1]
    assert mx.allclose(got, want, atol=1e-5).item()
    # ... and the stored entry is untouched by what the request wrote.
    after = [c.state[0] for c in store.entries[-1][1]]
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, after))
    assert store.checkout(model, [5, 6]).tokens == [] and store.misses == 1


def test_prefix_cache_replaces_what_it_extends_and_stays_within_its_bytes(tiny):
    model, _ = tiny
    turn1 = list(range(10, 30))
    store = PrefixCache(1 << 30)
    store.checkin(_held(model, turn1))
    store.checkin(_held(model, turn1 + [40, 41, 42]))  # the next turn of the same conversation
    assert [t for t, _ in store.entries] == [turn1 + [40, 41, 42]]
    store.checkin(_held(model, turn1[:5]))  # already held by an entry: nothing new
    assert len(store.entries) == 1
    one = store.nbytes
    small = PrefixCache(int(one * 2.5))
    for start in (100, 130, 160):
        small.checkin(_held(model, list(range(start, start + 23))))
    assert len(small.entries) == 2 and small.nbytes <= small.max_bytes
    assert [t[0] for t, _ in small.entries] == [130, 160]  # the least recently used went first
    off = PrefixCache(0)
    off.checkin(_held(model, turn1))
    assert off.entries == []
    with pytest.raises(UserError, match="prompt cache size"):
        PrefixCache(-1)


def test_prefix_cache_shares_a_rotated_cache_only_whole(tiny):
    model, _ = tiny
    store = PrefixCache(1 << 30, max_kv_size=16)
    ids = list(range(10, 40))  # 30 tokens through a 16-token rotating cache: it has dropped some
    store.checkin(_held(model, ids, max_kv_size=16))
    assert store.checkout(model, ids[:20] + [1, 2]).tokens == []  # cannot be cut short
    assert store.checkout(model, ids + [1, 2]).tokens == ids


def _spill_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("prefix-"))


def test_prefix_caches_spill_to_disk_and_continue_identically(tiny, tmp_path):
    """An entry evicted from memory goes to the disk tier; a request sharing its prefix reads it back
    and continues with the same logits as reading everything afresh."""
    model, _ = tiny
    folder = tmp_path / "spill"
    disk = DiskPrefixes(str(folder), 1 << 30, model)
    store = PrefixCache(0, disk)  # nothing stays in memory: every entry goes to disk
    system = list(range(10, 40))
    store.checkin(_held(model, system + [1, 2, 3]))
    assert store.entries == [] and disk.writes == 1 and len(_spill_files(folder)) == 1
    pc = store.checkout(model, system + [7, 8, 9])
    assert pc.tokens == system and disk.hits == 1 and store.hits == 1
    caches, todo = pc.prepare(model, system + [7, 8, 9])
    assert todo == [7, 8, 9]
    got = model(mx.array([todo]), cache=caches)[0, -1]
    want = model(mx.array([system + [7, 8, 9]]))[0, -1]
    assert mx.allclose(got, want, atol=1e-5).item()
    # The entry read back kept its file: evicting it again writes nothing new.
    store.checkin(_held(model, system + [1, 2, 3]))
    assert disk.writes == 1 and len(_spill_files(folder)) == 1
    # A longer entry replaces the file it extends.
    store.checkin(_held(model, system + [1, 2, 3, 4, 5]))
    assert disk.writes == 2 and len(_spill_files(folder)) == 1
    assert [t for t, *_ in disk.entries] == [system + [1, 2, 3, 4, 5]]


def test_disk_prefixes_outlive_a_restart_and_pass_over_what_is_not_theirs(folders, tiny, tmp_path):
    model, _ = tiny
    folder = tmp_path / "spill"
    store = PrefixCache(1 << 30, DiskPrefixes(str(folder), 1 << 30, model))
    ids = list(range(50, 80))
    store.checkin(_held(model, ids))
    assert _spill_files(folder) == []  # still in memory
    store.flush()  # shutdown
    assert len(_spill_files(folder)) == 1
    (folder / "prefix-garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (folder / "notes.txt").write_text("someone else's file")
    restarted = DiskPrefixes(str(folder), 1 << 30, model)
    assert [t for t, *_ in restarted.entries] == [ids]
    pc = PrefixCache(1 << 30, restarted).checkout(model, ids + [1, 2])
    assert pc.tokens == ids and restarted.hits == 1
    other, _ = qmlx.load(folders[1])  # other weights: the files are not its own
    assert DiskPrefixes(str(folder), 1 << 30, other).entries == []
    assert DiskPrefixes(str(folder), 1 << 30, model, kv_bits=8, kv_group_size=32).entries == []
    assert (folder / "notes.txt").exists() and (folder / "prefix-garbage.safetensors").exists()


def test_disk_prefixes_stay_within_their_bytes_and_survive_a_damaged_file(tiny, tmp_path):
    model, _ = tiny
    folder = tmp_path / "spill"
    probe = DiskPrefixes(str(tmp_path / "probe"), 1 << 30, model)
    probe.put(*_entry(model, list(range(100, 123))))
    one = probe.nbytes
    disk = DiskPrefixes(str(folder), int(one * 2.5), model)
    store = PrefixCache(0, disk)
    for start in (100, 130, 160):
        store.checkin(_held(model, list(range(start, start + 23))))
    assert len(disk.entries) == 2 and disk.nbytes <= disk.max_bytes
    assert [t[0] for t, *_ in disk.entries] == [130, 160] and len(_spill_files(folder)) == 2
    # A file damaged behind the server's back: the request is a miss, not an error, and the file goes.
    path = disk.entries[0][1]
    with open(path, "r+b") as f:
        f.truncate(100)
    pc = store.checkout(model, list(range(130, 153)) + [1])
    assert pc.tokens == [] and disk.failures == 1 and store.misses == 1
    assert len(_spill_files(folder)) == 1
    # The folder gone (a disk unmounted): the entry is dropped and counted, the request unharmed.
    gone = DiskPrefixes(str(tmp_path / "gone"), 1 << 30, model)
    (tmp_path / "gone").rmdir()
    gone.put(*_entry(model, list(range(10, 20))))
    assert gone.entries == [] and gone.failures == 1
    off = DiskPrefixes(str(tmp_path / "off"), 0, model)
    off.put(*_entry(model, list(range(10, 20))))
    assert off.entries == [] and _spill_files(tmp_path / "off") == []


def _entry(model, ids):
    pc = _held(model, ids)
    return pc.tokens, pc.caches


def test_disk_prefixes_refuse_a_bad_folder_or_size(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        DiskPrefixes(str(tmp_path / "file"), 1 << 30, model)
    with pytest.raises(UserError, match="cannot create the folder"):
        DiskPrefixes(str(tmp_path / "file" / "below"), 1 << 30, model)
    with pytest.raises(UserError, match="disk size"):
        DiskPrefixes(str(tmp_path / "ok"), -1, model)
    with pytest.raises(UserError, match="is a file"):
        check_cache_folder(str(tmp_path / "file" / "below"), create=False)  # what `qmlx serve` checks first
    new = str(tmp_path / "new" / "deeper")
    assert check_cache_folder(new, create=False) == new and not (tmp_path / "new").exists()
    assert check_cache_folder(new) == new and (tmp_path / "new" / "deeper").is_dir()
