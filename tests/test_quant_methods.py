"""Searched ranges, AWQ folding, GPTQ, calibration text, and the quality report (fast tier)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from tiny import random_model, tiny_config, write_folder

from convert import convert
from convert.calib import calibration_tokens, read_texts, stdlib_files
from convert.errors import ConvertError
from qmlx.loader import load_model
from qmlx.quality import compare
from qmlx.quant import awq
from qmlx.quant.calibrate import METHODS, collect, scale_block
from qmlx.quant.gptq import Hessian, gptq, inverse_cholesky
from qmlx.quant.search import pack, quantize_searched
from qmlx.tokenizer import Tokenizer

IDS = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 200]])


def _dequant(triple, bits, gs=64):
    return mx.dequantize(*triple, group_size=gs, bits=bits).astype(mx.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    w = mx.random.normal((16, 128), key=mx.random.key(bits))
    packed, s, b = mx.quantize(w, group_size=64, bits=bits)
    codes = (_dequant((packed, s, b), bits) - mx.repeat(b, 64, axis=1)) / mx.repeat(s, 64, axis=1)
    q = np.rint(np.array(codes)).astype(np.uint8)
    np.testing.assert_array_equal(pack(q, bits), np.array(packed))


@pytest.mark.parametrize("bits", [3, 4])
def test_searched_ranges_beat_round_to_nearest(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, size=(256, 512)).astype(np.float32) * 0.02  # heavy tails: outliers
    w = mx.array(w)
    rtn = ((_dequant(mx.quantize(w, group_size=64, bits=bits), bits) - w) ** 2).mean().item()
    searched = ((_dequant(quantize_searched(w, bits, 64, dtype=mx.float32), bits) - w) ** 2).mean()
    assert searched.item() < 0.9 * rtn


def _correlated(n, cols, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols)
    x = rng.normal(size=(n, cols)) @ mix + 0.1 * rng.normal(size=(n, cols))
    return mx.array((x * rng.lognormal(0, 1, size=cols)).astype(np.float32))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_reduces_layer_output_error_vs_rtn(bits):
    x = _correlated(1024, 256)
    w = mx.array(np.random.default_rng(1).normal(size=(96, 256)).astype(np.float32) * 0.02)
    ref = x @ w.T

    def err(triple):
        return ((x @ _dequant(triple, bits).T - ref) ** 2).mean().item()

    rtn = err(mx.quantize(w, group_size=64, bits=bits))
    # Plenty of well-conditioned data here: the paper's 1% damping. (A range search per group
    # would add more on these Gaussian weights; on the real model GPTQ does better without.)
    assert err(gptq(w, Hessian(x.T @ x, damp=0.01), bits, 64, dtype=mx.float32)) < 0.75 * rtn


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_in_activation_order_stays_a_valid_grouped_matrix(bits):
    """Act-order visits columns out of order with group grids fixed beforehand: still an
    ordinary affine group-quantized matrix (every weight on its group's grid), still better
    than RTN on the layer's output."""
    x = _correlated(1024, 256, seed=2)
    w = mx.array(np.random.default_rng(3).normal(size=(96, 256)).astype(np.float32) * 0.02)
    h = Hessian(x.T @ x, damp=0.01, act_order=True)
    assert sorted(h.perm.tolist()) == list(range(256)) and not np.all(h.perm == np.arange(256))
    packed, s, b = gptq(w, h, bits, 64, dtype=mx.float32)
    wq = _dequant((packed, s, b), bits)
    codes = (wq - mx.repeat(b, 64, axis=1)) / mx.repeat(s, 64, axis=1)
    assert mx.allclose(codes, mx.round(codes), atol=1e-3).item()
    assert codes.min().item() > -1e-3 and codes.max().item() < 2**bits - 1 + 1e-3
    rtn = ((x @ _dequant(mx.quantize(w, group_size=64, bits=bits), bits).T - x @ w.T) ** 2).mean()
    assert ((x @ wq.T - x @ w.T) ** 2).mean().item() < 0.6 * rtn.item()


def test_inverse_cholesky_matches_float64_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 120)) * rng.lognormal(0, 1, size=120)
    h = (x.T @ x).astype(np.float32)
    h[7, :] = h[:, 7] = 0  # a dead input channel
    ref = h.astype(np.float64)
    ref[7, 7] = 1.0
    ref[np.diag_indices(120)] += 0.01 * np.mean(np.diag(ref))
    expected = np.linalg.cholesky(np.linalg.inv(ref)).T
    u = inverse_cholesky(h, 0.01)
    assert np.allclose(u, np.triu(u))
    np.testing.assert_allclose(u, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_awq_folds_leave_unquantized_logits_unchanged():
    """Random positive scales, folded at all four sites (with GQA heads tied)."""
    cfg = tiny_config()  # 4 query heads share 2 kv heads
    model = random_model(cfg)
    before = np.array(model(IDS))
    key = mx.random.key(7)
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        d, h = cfg["hidden_size"], cfg["intermediate_size"]
        s = mx.exp(mx.random.normal((d,), key=key))
        awq.fold_into_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
        s = mx.exp(mx.random.normal((d,), key=key))
        awq.fold_into_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s)
        o_in = attn.n_heads * attn.head_dim
        s_v, s_o = awq.tie_heads(mx.exp(mx.random.normal((o_in,), key=key)), 4, 2)
        awq.fold_into_linear(attn.v_proj, attn.o_proj, s_v, s_o)
        s = mx.exp(mx.random.normal((h,), key=key))
        awq.fold_into_linear(mlp.up_proj, mlp.down_proj, s, s)
    np.testing.assert_allclose(np.array(model(IDS)), before, rtol=1e-4, atol=1e-4)


def test_awq_searched_scales_leave_unquantized_logits_unchanged():
    model = random_model(tiny_config(hidden_size=128, intermediate_size=256))
    before = np.array(model(IDS))
    h = model.model.embed_tokens(mx.random.randint(0, 256, (2, 32), key=mx.random.key(3)))
    params = dict.fromkeys(
        ["self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + ["mlp." + p for p in ("gate_proj", "up_proj", "down_proj")],
        {"bits": 3, "group_size": 64},
    )
    changed = False
    for block in model.layers:
        norm_before = np.array(block.input_layernorm.weight)
        scale_block(block, collect(block, h, hessian=False), params, 4, 2)
        changed |= not np.allclose(np.array(block.input_layernorm.weight), norm_before)
        h = block(h, "causal")
    assert changed, "the search chose no scaling at all; the test would prove nothing"
    np.testing.assert_allclose(np.array(model(IDS)), before, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("methods") / "src")
    cfg = tiny_config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )  # fmt: skip
    write_folder(path, cfg, shards=2, dtype=mx.bfloat16)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("calib") / "calib.jsonl")
    with open(path, "w") as f:
        for name in ("json", "os", "random"):
            f.write(json.dumps({"text": open(sys.modules[name].__file__).read()[:3000]}) + "\n")
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_loads_in_mlx_lm_and_qmlx_with_same_logits(src, calib_file, method, tmp_path):
    import mlx_lm

    dst = convert(
        src, str(tmp_path / method), bits=3, method=method, calib=calib_file,
        calib_samples=4, calib_seq_len=64, progress=False,
    )  # fmt: skip
    ours = np.array(load_model(dst, dtype="float32")(IDS))
    theirs, _ = mlx_lm.load(dst)
    theirs.set_dtype(mx.float32)
    np.testing.assert_allclose(ours, np.array(theirs(IDS).astype(mx.float32)), atol=1e-4)
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["quantization"]["bits"] == 3


def test_default_calibration_is_the_standard_library_without_the_evaluation_text(src):
    files = stdlib_files()
    assert len(files) > 100 and not any(f.endswith(os.sep + "textwrap.py") for f in files)
    tokens = calibration_tokens(Tokenizer.from_folder(src), None, 3, 50)
    assert tokens.shape == (3, 50)


def test_calibration_refusals_name_the_file(src, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ConvertError, match=r"bad.jsonl:2: expected an object"):
        read_texts(str(bad))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ConvertError, match="short.txt: has 4 tokens"):
        calibration_tokens(Tokenizer.from_folder(src), str(short), 4, 64)
    with pytest.raises(ConvertError, match="--method"):
        convert(src, str(tmp_path / "x"), method="nope", progress=False)
    assert not os.path.exists(tmp_path / "x")


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def test_quality_matches_numpy_on_full_logits():
    cfg = tiny_config()
    ref, other = random_model(cfg, seed=0), random_model(cfg, seed=1)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, 40)]
    q = compare(other, ref, ids, ctx=16)  # windows of 16, 16 and 8 tokens
    kl, agree, nq, nr, n = 0.0, 0, 0.0, 0.0, 0
    for start in range(0, len(ids), 16):
        w = ids[start : start + 16]
        lq = _log_softmax(np.array(other(mx.array([w[:-1]]))[0], dtype=np.float64))
        lr = _log_softmax(np.array(ref(mx.array([w[:-1]]))[0], dtype=np.float64))
        kl += (np.exp(lr) * (lr - lq)).sum()
        agree += (lq.argmax(-1) == lr.argmax(-1)).sum()
        t = np.array(w[1:])
        nq -= lq[np.arange(len(t)), t].sum()
        nr -= lr[np.arange(len(t)), t].sum()
        n += len(t)
    assert q.n == n == 37
    np.testing.assert_allclose([q.kl, q.top1, q.nll_model, q.nll_reference],
                               [kl / n, agree / n, nq / n, nr / n], rtol=1e-4)  # fmt: skip
    same = compare(ref, ref, ids)
    assert same.kl == pytest.approx(0, abs=1e-5) and same.top1 == 1.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qmlx", *args], capture_output=True, text=True, timeout=300)


def test_cli_quality_table_and_one_line_refusal(src, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(open(sys.modules["json"].__file__).read()[:2000])
    r = _cli("quality", "-m", src, "-r", src, "--files", str(text), "--max-tokens", "100")
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "100.00%" in r.stdout and "+0.00%" in r.stdout
    # The tiny tokenizer has no merges: a Hangul syllable is 3 byte tokens, so 101 tokens end
    # inside a character; the same tokenizer must still be recognized as the same.
    korean = tmp_path / "ko.txt"
    korean.write_text("한국어 문장을 토큰으로 나눕니다. " * 20, encoding="utf-8")
    r = _cli("quality", "-m", src, "-r", src, "--files", str(korean), "--max-tokens", "101")
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other"
    shutil.copytree(src, other)
    with open(other / "tokenizer.json") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same model, a tokenizer with other ids
    with open(other / "tokenizer.json", "w") as f:
        json.dump(tok, f)
    r = _cli("quality", "-m", src, "-r", str(other), "--files", str(text), "--max-tokens", "100")
    assert r.returncode == 2 and "splits" in r.stderr and "t.txt" in r.stderr, r.stderr
    r = _cli("quality", "-m", src, "-r", src, "--files", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_auto_recipe_spends_mixed_budget_on_the_most_damaged_layers():
    from qmlx.quant.recipes import choose_by_sensitivity, plan

    n_layers, d, h = 8, 128, 256
    layers = {"model.embed_tokens": d}
    for i in range(n_layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
            layers[f"model.layers.{i}.{p}"] = d
        layers[f"model.layers.{i}.mlp.down_proj"] = h
    numel = {p: d * (h if p.endswith(("gate_proj", "up_proj")) else d) for p in layers}
    numel.update({p: d * h for p in layers if p.endswith("down_proj")})
    rng = np.random.default_rng(0)
    damage = {p: {"damage": float(rng.random()), "numel": numel[p]} for p in layers
              if p.startswith("model.layers.")}  # fmt: skip
    damage["model.layers.3.mlp.gate_proj"]["damage"] = 1e6  # far the worst
    fixed = plan(layers, n_layers, 4, 64, "mixed-4-6")
    auto = choose_by_sensitivity(layers, n_layers, 4, 6, 64, damage)

    def high(cfg):
        return {p for p, v in cfg.items() if isinstance(v, dict) and v["bits"] == 6}

    assert "model.layers.3.mlp.gate_proj" in high(auto)
    assert "model.embed_tokens" in high(auto)
    blocks = lambda cfg: sum(numel[p] for p in high(cfg) if p.startswith("model.layers."))  # noqa: E731
    assert 0 < blocks(auto) <= blocks(fixed)
    # Nothing left out could still have fit and has more damage per weight than a chosen one.
    chosen = [p for p in high(auto) if p in damage]
    worst_kept = min(damage[p]["damage"] / numel[p] for p in chosen)
    left = blocks(fixed) - blocks(auto)
    assert all(
        damage[p]["damage"] / numel[p] <= worst_kept or numel[p] > left
        for p in damage if p not in chosen
    )  # fmt: skip


def test_auto_recipe_converts_and_loads_in_mlx_lm(calib_file, tmp_path):
    import mlx_lm

    src = str(tmp_path / "src3")  # with 3 blocks, mixed-3-6 gives block 2 high bits: a budget
    write_folder(src, tiny_config(hidden_size=128, intermediate_size=256, num_hidden_layers=3))
    dst = convert(
        src, str(tmp_path / "auto"), bits=3, recipe="auto-3-6", method="gptq", calib=calib_file,
        calib_samples=4, calib_seq_len=64, progress=False,
    )  # fmt: skip
    with open(os.path.join(dst, "config.json")) as f:
        q = json.load(f)["quantization"]
    assert any(isinstance(v, dict) and v["bits"] == 6 and ".layers." in k for k, v in q.items())
    theirs, _ = mlx_lm.load(dst)
    theirs.set_dtype(mx.float32)
    ours = np.array(load_model(dst, dtype="float32")(IDS))
    np.testing.assert_allclose(ours, np.array(theirs(IDS).astype(mx.float32)), atol=1e-4)
    with pytest.raises(ConvertError, match="--recipe auto-3-6 measures"):
        convert(src, str(tmp_path / "x"), bits=3, recipe="auto-3-6", method="rtn", progress=False)


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tied") / "src")
    cfg = tiny_config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, torch_dtype="bfloat16",
        vocab_size=1024,
    )  # fmt: skip
    write_folder(path, cfg, shards=2, dtype=mx.bfloat16)
    return path


def _tensors(folder):
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(mx.load(os.path.join(folder, name)))
    return out


def test_gptq_head_is_calibrated_on_final_hidden_states(tied_src, calib_file, tmp_path):
    """A tied head, written last into the first of several shards: the file is whole, loads
    alike in mlx-lm and qmlx, and the head's logits err less than round-to-nearest's."""
    import mlx_lm

    dst = convert(
        tied_src, str(tmp_path / "gptq"), bits=3, method="gptq", calib=calib_file,
        calib_samples=4, calib_seq_len=64, shard_size="40KB", calib_head=True, progress=False,
    )  # fmt: skip
    files = [n for n in os.listdir(dst) if n.endswith(".safetensors")]
    assert len(files) > 2
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        assert json.load(f)["weight_map"]["model.embed_tokens.weight"] == sorted(files)[0]
    ours = np.array(load_model(dst, dtype="float32")(IDS))
    theirs, _ = mlx_lm.load(dst)
    theirs.set_dtype(mx.float32)
    np.testing.assert_allclose(ours, np.array(theirs(IDS).astype(mx.float32)), atol=1e-4)

    src = load_model(tied_src, dtype="float32")
    tokens = calibration_tokens(Tokenizer.from_folder(tied_src), calib_file, 4, 64)
    x = src.model(tokens).reshape(-1, 128)  # the head's inputs (unquantized blocks)
    w = src.model.embed_tokens.weight
    q = _tensors(dst)
    key = "model.embed_tokens."
    head = _dequant((q[key + "weight"], q[key + "scales"], q[key + "biases"]), 3)
    rtn = _dequant(mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=3), 3)
    err = lambda v: mx.square(x @ (v - w).T).mean().item()  # noqa: E731
    assert err(head) < 0.8 * err(rtn)


def test_head_is_round_to_nearest_without_calib_head(tied_src, calib_file, tmp_path):
    dst = convert(
        tied_src, str(tmp_path / "gptq"), bits=4, method="gptq", calib=calib_file,
        calib_samples=4, calib_seq_len=64, progress=False,
    )  # fmt: skip
    w = load_model(tied_src, dtype="bfloat16").model.embed_tokens.weight
    packed, s, b = mx.quantize(w, group_size=64, bits=4)
    q = _tensors(dst)
    assert np.array_equal(np.array(q["model.embed_tokens.weight"]), np.array(packed))
    r = _cli("convert", tied_src, str(tmp_path / "awq"), "--method", "awq", "--calib-head")
    assert r.returncode == 2 and "--calib-head needs --method gptq" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "awq")


def test_sequential_gptq_lowers_block_output_error():
    """Site by site (o_proj/down_proj calibrated on the already-quantized q/k/v, gate/up
    outputs), the block's output on the calibration inputs is closer to the float block's."""
    from qmlx.quant import calibrate

    model = random_model(tiny_config(hidden_size=128, intermediate_size=256))
    h = model.model.embed_tokens(mx.random.randint(0, 256, (4, 64), key=mx.random.key(0)))
    block = model.layers[0]
    ref = calibrate.run_block(block, h)
    params = dict.fromkeys(calibrate.LINEARS, {"bits": 3, "group_size": 64})
    errors = {}
    for sequential in (False, True):
        _, y = calibrate.quantize_block(block, h, params, "gptq", 4, 2, mx.float32, sequential=sequential)
        errors[sequential] = mx.square(y - ref).mean().item()
    assert errors[True] < 0.98 * errors[False]
