"""Pipeline parallelism: the layer plan, stage loading, and real runs under `mlx.launch`."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny import tiny_config, write_folder

from qmlx.cache import make_cache
from qmlx.config import ModelConfig
from qmlx.distributed import _caches_for, model_digest
from qmlx.loader import load_model
from qmlx.safetensors import folder_index
from qmlx.shard_plan import (
    GB,
    PlanError,
    Sizes,
    check_fits,
    parse_hosts,
    parse_layers,
    rank_bytes,
    split_layers,
    weight_sizes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
CONFIGS = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "configs")


def brute_force(sizes: Sizes, memory: list[int]) -> float:
    """The best max(load / memory) over every contiguous split with a layer per rank."""
    n, L = len(memory), len(sizes.layers)
    best = float("inf")
    for cuts in itertools.combinations(range(1, L), n - 1):
        bounds = (0, *cuts, L)
        ranges = [range(a, b) for a, b in itertools.pairwise(bounds)]
        best = min(best, max(b / m for b, m in zip(rank_bytes(sizes, ranges), memory)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_split_is_optimal_and_contiguous(seed):
    import random

    rng = random.Random(seed)
    n_layers, n = rng.randint(3, 9), rng.randint(2, 3)
    sizes = Sizes([rng.randint(5, 20) for _ in range(n_layers)], rng.randint(0, 40))
    memory = [rng.randint(50, 200) for _ in range(n)]
    ranges = split_layers(sizes, memory)
    assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]]
    assert ranges[-1].stop == n_layers and all(len(r) >= 1 for r in ranges)
    got = max(b / m for b, m in zip(rank_bytes(sizes, ranges), memory))
    assert got == pytest.approx(brute_force(sizes, memory))


def test_split_follows_memory_and_rank0_ends():
    sizes = Sizes([10] * 30, ends=0)
    assert [len(r) for r in split_layers(sizes, [2, 1])] == [20, 10]
    # Rank 0 also holds the embedding and head: it takes fewer layers.
    assert [len(r) for r in split_layers(Sizes([10] * 30, ends=100), [1, 1])] == [10, 20]


def test_plan_errors_name_the_flag():
    with pytest.raises(PlanError, match="--layers gives 1 ranges"):
        parse_layers("0-23", 24, 2)
    with pytest.raises(PlanError, match="contiguous"):
        parse_layers("0-10,12-23", 24, 2)
    with pytest.raises(PlanError, match="layers 0-23"):
        parse_layers("0-10,11-22", 24, 2)
    assert parse_layers("0-10, 11-23", 24, 2) == [range(11), range(11, 24)]
    with pytest.raises(PlanError, match="--hosts: 'a' is not NAME:GB"):
        parse_hosts("a")
    assert parse_hosts("a:24,b:1.5") == (["a", "b"], [24 * GB, int(1.5 * GB)])
    with pytest.raises(PlanError, match=r"rank 1 \(b\) needs"):
        check_fits(Sizes([10, 10, 10], 0), [range(1), range(1, 3)], [100, 15], ["a", "b"])
    with pytest.raises(PlanError, match="only 2 layers"):
        split_layers(Sizes([1, 1], 0), [1, 1, 1])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dist") / "tiny")
    write_folder(folder, tiny_config(num_hidden_layers=4, tie_word_embeddings=False), shards=3)
    return folder


def test_weight_sizes_match_loaded_arrays(tiny_folder):
    model = load_model(tiny_folder, dtype="float32")
    sizes = weight_sizes(model.config, mx.float32, set(folder_index(tiny_folder)))
    actual = dict(tree_flatten(model.parameters()))
    assert sizes.total == sum(v.nbytes for v in actual.values())
    assert sizes.layers[2] == sum(v.nbytes for k, v in actual.items() if k.startswith("model.layers.2."))


def test_weight_sizes_of_a_quantized_config():
    from tiny import random_model

    from qmlx.quant import quantize_model

    cfg = tiny_config(num_hidden_layers=3)
    model = quantize_model(random_model(cfg), {"bits": 4, "group_size": 32})
    mx.eval(model.parameters())
    config = ModelConfig.from_dict({**cfg, "quantization": {"bits": 4, "group_size": 32}})
    sizes = weight_sizes(config, mx.float32)
    assert sizes.total == sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_weight_sizes_of_a_quantized_moe_config():
    from tiny import random_model, tiny_moe_config

    from qmlx.quant import quantize_model

    cfg = tiny_moe_config(decoder_sparse_step=2)
    model = quantize_model(random_model(cfg), {"bits": 4, "group_size": 32})
    mx.eval(model.parameters())
    config = ModelConfig.from_dict({**cfg, "quantization": {"bits": 4, "group_size": 32}})
    sizes = weight_sizes(config, mx.float32)
    actual = dict(tree_flatten(model.parameters()))
    assert sizes.total == sum(v.nbytes for v in actual.values())
    assert sizes.layers[1] == sum(v.nbytes for k, v in actual.items() if k.startswith("model.layers.1."))
    assert sizes.layers[1] > 2 * sizes.layers[0]  # the sparse block holds 8 experts


def test_shard_plan_of_qwen2_57b_a14b_reports_active_parameters(tmp_path):
    cfg = dict(
        model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=2560, shared_expert_intermediate_size=20480, vocab_size=151936,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = run_qmlx("shard-plan", "-m", str(path), "--hosts", "a:24,b:24", "--bits", "4")
    assert out.returncode == 0, out.stderr
    assert "57.4B parameters (14.2B active per token: 8 of 64 experts" in out.stdout
    weights = float(re.search(r"([\d.]+) GB of weights", out.stdout)[1])
    assert 29.5 < weights < 31  # GiB: 57.4B parameters at 4.5 bits, ~32 GB
    assert re.search(r"0\s+a\s+0-13 \(14\)", out.stdout) and re.search(r"1\s+b\s+14-27 \(14\)", out.stdout)


def test_kv_reservation_matches_a_filled_cache():
    from qmlx.cache import cache_nbytes
    from qmlx.shard_plan import kv_bytes_per_layer

    config = ModelConfig.from_dict(tiny_config())
    cache = make_cache(1)
    kv = mx.zeros((1, config.num_key_value_heads, 512, config.head_dim))
    cache[0].update_and_fetch(kv, kv)
    mx.eval(cache[0].state)
    assert kv_bytes_per_layer(config, 512, mx.float32) == cache_nbytes(cache)


def test_stages_compose_to_the_full_model(tiny_folder):
    """Rank 0 (ends + blocks 0-0), a middle stage (1-2) and a last (3) give the full logits."""
    full = load_model(tiny_folder, dtype="float32")
    first = load_model(tiny_folder, dtype="float32", layers=range(1), ends=True)
    middle = load_model(tiny_folder, dtype="float32", layers=range(1, 3), ends=False)
    last = load_model(tiny_folder, dtype="float32", layers=range(3, 4), ends=False)
    assert "embed_tokens" not in middle.model and "lm_head" not in middle and "norm" not in last.model
    held = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    assert held(first) + held(middle) + held(last) == held(full)
    ids = mx.array([[1, 5, 9, 200, 7, 3]])
    caches = [make_cache(len(m.layers)) for m in (first, middle, last)]
    h = first.model.blocks(first.model.embed_tokens(ids), caches[0])
    h = last.model.blocks(middle.model.blocks(h, caches[1]), caches[2])
    got = first.head(first.model.norm(h))
    assert mx.allclose(got, full(ids), atol=1e-5).item()
    assert [c[0].offset for c in caches] == [6, 6, 6]


def test_follower_caches_follow_rank0_offsets():
    slots: dict = {}
    make = lambda: make_cache(2)
    assert _caches_for(slots, -1, 0, make) is None
    c = _caches_for(slots, 0, 0, make)
    k = mx.zeros((1, 2, 5, 4))
    for layer in c:
        layer.update_and_fetch(k, k)
    assert _caches_for(slots, 0, 5, make) is c
    assert _caches_for(slots, 0, 3, make)[0].offset == 3  # rank 0 trimmed: so do we
    assert _caches_for(slots, 0, 0, make) is not c  # rank 0 started afresh
    with pytest.raises(RuntimeError, match="rank 0 at 9"):
        _caches_for(slots, 0, 9, make)


def test_digest_changes_with_config_or_dtype(tiny_folder, tmp_path):
    infos = folder_index(tiny_folder)
    base = model_digest(tiny_folder, infos, mx.float32)
    assert model_digest(tiny_folder, infos, mx.float32) == base
    assert model_digest(tiny_folder, infos, mx.bfloat16) != base
    other = str(tmp_path / "other")
    write_folder(other, tiny_config(num_hidden_layers=4, tie_word_embeddings=False, rope_theta=5e5))
    assert model_digest(other, folder_index(other), mx.float32) != base


def run_qmlx(*args, timeout=120, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qmlx", *args], cwd=ROOT, capture_output=True, text=True, check=False,
        timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def launch(*args, timeout=300):
    return subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "qmlx", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_shard_plan_command_on_a_72b_config():
    cfg = os.path.join(CONFIGS, "qwen2.5-72b-instruct.json")
    out = run_qmlx("shard-plan", "-m", cfg, "--hosts", "a:24,b:24,c:16", "--bits", "4")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"\d\s", line)]
    assert [r[1] for r in rows] == ["a", "b", "c"]
    spans = [tuple(map(int, r[2].split("-"))) for r in rows]
    assert spans[0][0] == 0 and spans[-1][1] == 79
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    short = run_qmlx("shard-plan", "-m", cfg, "--hosts", "a:24,b:24,c:16", "--bits", "8")
    assert short.returncode == 2
    assert short.stderr.count("\n") == 1 and "rank 0 (a) needs" in short.stderr


def test_layers_flag_outside_a_pipeline_is_refused(tiny_folder):
    out = run_qmlx("generate", "-m", tiny_folder, "-p", "hi", "--raw", "--layers", "0-1,2-3")
    assert out.returncode == 2 and "--layers applies only" in out.stderr


def test_unreachable_neighbour_times_out(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:45871"], ["127.0.0.1:45872"]]))
    env = {"MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0", "QMLX_DIST_TIMEOUT": "2"}
    out = run_qmlx("generate", "-m", "unused", "-p", "hi", timeout=60, env=env)
    assert out.returncode != 0
    assert "rank 0" in out.stderr and "could not connect to its neighbours within 2 s" in out.stderr


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("case", ["different", "missing"])
def test_ranks_that_disagree_on_the_model_stop_with_one_line(tiny_folder, tmp_path, case):
    other = str(tmp_path / "other")
    if case == "different":
        write_folder(other, tiny_config(num_hidden_layers=4, tie_word_embeddings=False, rope_theta=5e5))
    expect = {
        "different": ["ranks disagree on the model: rank 1"] * 2,
        "missing": ["rank 1 could not open the model", f"{other}: no such folder"],
    }[case]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qmlx", "generate", "-m", folder, "-p", "hi", "--raw"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
        )
        for rank, folder in enumerate((tiny_folder, other))
    ]
    for p, message in zip(procs, expect):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2, err
        assert err.count("\n") == 1 and message in err


@pytest.fixture(scope="module")
def tied_4bit_folder(tmp_path_factory):
    """A tied-embedding model converted to 4 bits: rank 0's head is the quantized embedding."""
    root = tmp_path_factory.mktemp("dist4")
    write_folder(str(root / "src"), tiny_config(num_hidden_layers=4, tie_word_embeddings=True))
    out = run_qmlx("convert", str(root / "src"), str(root / "q4"), "--bits", "4", "--group-size", "32")
    assert out.returncode == 0, out.stderr
    return str(root / "q4")


@pytest.fixture(scope="module")
def moe_4bit_folder(tmp_path_factory):
    """A Qwen2-MoE (sparse blocks 1 and 3) converted to 4 bits: each rank holds routed experts."""
    from tiny import tiny_moe_config

    root = tmp_path_factory.mktemp("distmoe")
    write_folder(str(root / "src"), tiny_moe_config(decoder_sparse_step=2))
    out = run_qmlx("convert", str(root / "src"), str(root / "q4"), "--bits", "4", "--group-size", "32")
    assert out.returncode == 0, out.stderr
    return str(root / "q4")


@pytest.mark.parametrize("which", ["dense", "tied_4bit", "moe_4bit"])
def test_two_ranks_on_loopback_match_one_process(which, request):
    folder = request.getfixturevalue(f"{'tiny' if which == 'dense' else which}_folder")
    args = ["generate", "-m", folder, "-p", "hello there", "--raw", "-n", "12", "--temp", "0"]
    single = run_qmlx(*args)
    assert single.returncode == 0, single.stderr
    pipe = launch(*args, "--layers", "0-1,2-3")
    assert pipe.returncode == 0, pipe.stderr
    assert pipe.stdout == single.stdout
    assert re.search(r"0\s+\S+\s+0-1 \(2\)", pipe.stderr)


@pytest.mark.slow
def test_real_fixture_pipeline_is_greedy_identical_and_halves_weights(fixture_dir, real_model):
    """Two ranks on loopback: same greedy text as one process; each holds about half."""
    import qmlx

    model, tokenizer = real_model
    prompt = "Write a Python function that reverses a string."
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    expected = qmlx.generate(model, tokenizer, text, max_tokens=8, temperature=0.0)
    pipe = launch("generate", "-m", fixture_dir, "-p", prompt, "-n", "8", "--temp", "0",
                  "--dtype", "float32")  # fmt: skip
    assert pipe.returncode == 0, pipe.stderr
    assert pipe.stdout.rstrip("\n") == expected
    held = [float(x) * 2**30 for x in re.findall(r"rank \d (\d+\.\d+) GB", pipe.stderr)]
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert len(held) == 2 and sum(held) == pytest.approx(total, rel=1e-3)  # nothing held twice
    assert all(0.4 < h / total < 0.6 for h in held), [h / total for h in held]


def test_chat_turns_in_a_pipeline_match_one_process(tiny_folder):
    """Turn 2 reuses turn 1's prompt cache: the followers' caches must follow rank 0's."""
    args = ["chat", "-m", tiny_folder, "--temp", "0", "-n", "8"]
    lines = "hello\nand again\n/reset\nhello\n/exit\n"
    single = subprocess.run(
        [sys.executable, "-m", "qmlx", *args], input=lines, cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    pipe = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "qmlx", *args],
        input=lines, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert single.returncode == 0 and pipe.returncode == 0, pipe.stderr
    assert pipe.stdout == single.stdout and single.stdout.count("\n") >= 3


def test_a_stage_reads_only_its_own_tensors(tiny_folder, monkeypatch):
    from qmlx import loader

    seen = {}
    real = loader.load_folder

    def spy(folder, infos=None):
        seen.update(infos)
        return real(folder, infos)

    monkeypatch.setattr(loader, "load_folder", spy)
    stage = load_model(tiny_folder, dtype="float32", layers=range(2, 4), ends=False)
    assert seen and all(re.match(r"model\.layers\.[23]\.", name) for name in seen)
    all_infos = folder_index(tiny_folder)
    assert {i.file for i in seen.values()} == {
        all_infos[n].file for n in all_infos if re.match(r"model\.layers\.[23]\.", n)
    }
    assert len(stage.layers) == 2
