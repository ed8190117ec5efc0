"""LoRA / QLoRA on tiny random models: the layer math, data masks, orderings, trainer, resume,
adapter files, fuse, the CLI and the memory estimate."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import tiny_config, write_folder

import qmlx
from qmlx.cli import main
from qmlx.lora.apply import apply_lora, checkpoint_blocks, fuse_model
from qmlx.lora.data import DataError, load_split
from qmlx.lora.estimate import estimate
from qmlx.lora.layers import LoRALinear
from qmlx.lora.order import Order
from qmlx.lora.score import loss_fn
from qmlx.lora.trainer import TrainConfig, Trainer
from qmlx.quant import QuantizedLinear, quantize_model
from qmlx.quant.groups import dequantize


def _randomize_b(model, seed=1):
    """Give every adapter a non-zero B so it changes the output."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_B = 0.05 * mx.random.normal(m.lora_B.shape)
    mx.eval(model.parameters())


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _chat(i):
    return {
        "messages": [
            {"role": "user", "content": f"q{i}" + " x" * (i % 7)},
            {"role": "assistant", "content": "ok" + " y" * (i % 5)},
        ]
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and a chat data folder."""
    root = tmp_path_factory.mktemp("lora")
    write_folder(str(root / "m"), tiny_config())
    (root / "data").mkdir()
    _write_jsonl(root / "data" / "train.jsonl", [_chat(i) for i in range(32)])
    _write_jsonl(root / "data" / "valid.jsonl", [_chat(100 + i) for i in range(6)])
    return root


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("quantized", [False, True])
def test_lora_linear_is_base_plus_scaled_low_rank_update(quantized):
    mx.random.seed(0)
    base = nn.Linear(64, 32, bias=True)
    if quantized:
        base = QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = mx.random.normal((3, 5, 64))
    assert mx.array_equal(layer(x), base(x)), "B starts at zero: a fresh adapter is a no-op"
    layer.lora_B = mx.random.normal((32, 4))
    w = dequantize(base.weight, base.scales, base.biases, 4, 32) if quantized else base.weight
    xn, wn = np.array(x, np.float64), np.array(w, np.float64)
    a, b = np.array(layer.lora_A, np.float64), np.array(layer.lora_B, np.float64)
    want = xn @ wn.T + np.array(base.bias) + 2.0 * (xn @ a.T) @ b.T
    # 15 rows of x: a quantized product on the kernels' integer GEMV path, exact up to x rounded to 15 bits
    # per group (~1e-4 of the largest output, tests/test_kernels.py), so checked at 1e-3 there.
    tol = 1e-3 if quantized else 1e-4
    np.testing.assert_allclose(np.array(layer(x)), want, rtol=tol, atol=tol)
    # Fusing gives one layer computing the same thing; a quantized base is re-quantized, so
    # it computes x·Q(W + scale·B·A)ᵀ, with Q MLX's own 4-bit round trip.
    fused = layer.fuse()
    assert isinstance(fused, QuantizedLinear) == quantized
    if quantized:
        merged = mx.array(wn + 2.0 * b @ a, mx.float32)
        wn = np.array(mx.dequantize(*mx.quantize(merged, group_size=32, bits=4), group_size=32, bits=4))
        want = xn @ wn.T + np.array(base.bias)
    np.testing.assert_allclose(np.array(fused(x)), want, rtol=tol, atol=tol)


def test_only_adapters_train_and_gradients_reach_them(tiny):
    model, _ = qmlx.load(str(tiny / "m"))
    quantize_model(model, {"bits": 4, "group_size": 32})
    apply_lora(model, rank=4, alpha=8.0, targets=["q", "v", "down"])
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith(("lora_A", "lora_B")) for k in names)
    assert len(names) == 2 * 3 * 2  # A and B x 3 targets x 2 blocks
    _randomize_b(model)
    tokens = mx.array([[5, 6, 7, 8, 9, 10]])
    _, grads = nn.value_and_grad(model, loss_fn)(model, tokens, mx.ones(tokens.shape, mx.bool_))
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(names)
    assert all(mx.abs(g).max().item() > 0 for g in flat.values())


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for ckpt in (False, True):
        model, _ = qmlx.load(str(tiny / "m"))
        mx.random.seed(3)
        apply_lora(model, rank=4, alpha=8.0)
        _randomize_b(model)
        if ckpt:
            checkpoint_blocks(model)
        tokens = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
        (_, _), g = nn.value_and_grad(model, loss_fn)(model, tokens, mx.ones(tokens.shape, mx.bool_))
        grads.append(dict(tree_flatten(g)))
    for k in grads[0]:
        np.testing.assert_allclose(np.array(grads[1][k]), np.array(grads[0][k]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- data
def test_chat_mask_covers_exactly_the_assistant_turns(tiny, tmp_path):
    _, tok = qmlx.load(str(tiny / "m"))
    rec = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "bye"},
        ]
    }
    _write_jsonl(tmp_path / "train.jsonl", [rec])
    ds = load_split(str(tmp_path / "train.jsonl"), tok, 512)
    s = ds.samples[0]
    assert ds.format == "chat"
    full = tok.apply_chat_template(rec["messages"], add_generation_prompt=False)
    assert tok.decode(s.tokens.tolist()) == full
    trained = tok.decode(s.tokens[s.mask].tolist())
    assert trained == "hello<|im_end|>\nbye<|im_end|>\n"
    # --train-on-prompt trains on everything
    assert load_split(str(tmp_path / "train.jsonl"), tok, 512, train_on_prompt=True).samples[0].mask.all()


def test_completion_and_text_formats_and_truncation(tiny, tmp_path):
    _, tok = qmlx.load(str(tiny / "m"))
    _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    s = load_split(str(tmp_path / "c.jsonl"), tok, 512).samples[0]
    assert tok.decode(s.tokens[s.mask].tolist()) == "4<|im_end|>\n"
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a" * 50}, {"text": "b" * 5}])
    ds = load_split(str(tmp_path / "t.jsonl"), tok, 20)
    assert ds.format == "text" and ds.truncated == 1
    assert ds.lengths.tolist() == [20, 6]  # 5 bytes + end of text
    assert all(s.mask.all() for s in ds.samples)


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"text": "ok"}', "{not json"], ":2: not valid JSON"),
        (
            ['{"text": "ok"}', '{"prompt": "a", "completion": "b"}'],
            ":2: a completion record in a file of text",
        ),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: no assistant message"),
        (['{"foo": 1}'], ":1: needs one of 'messages'"),
        (["[1, 2]"], ":1: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tiny, tmp_path, lines, needle):
    _, tok = qmlx.load(str(tiny / "m"))
    _write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=needle) as e:
        load_split(str(tmp_path / "train.jsonl"), tok, 64)
    assert str(tmp_path / "train.jsonl") in str(e.value)


# ---------------------------------------------------------------- orderings
def test_orderings():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 64)
    diff = rng.random(64)
    o = Order("random", lengths, 4, seed=1)
    epoch = np.concatenate([o.batch(i) for i in range(o.batches_per_epoch)])
    assert sorted(epoch.tolist()) == list(range(64)), "an epoch sees every sample once"
    spread = np.mean([np.ptp(lengths[o.batch(i)]) for i in range(16)])
    assert spread < np.ptp(lengths) / 4, "batches group similar lengths"
    assert not np.array_equal(o.batch(0), Order("random", lengths, 4, seed=2).batch(0))
    easy = Order("easy-to-hard", lengths, 4, difficulty=diff)
    first, last = easy.batch(0), easy.batch(easy.batches_per_epoch - 1)
    assert diff[first].max() < diff[last].min()
    hard = Order("hard-to-easy", lengths, 4, difficulty=diff)
    assert diff[hard.batch(0)].min() > diff[hard.batch(hard.batches_per_epoch - 1)].max()
    ad = Order("adaptive", lengths, 4, seed=0, difficulty=diff, band=(0.25, 0.75))
    lo, hi = np.quantile(diff, [0.25, 0.75])
    for step in range(10):
        assert ((diff[ad.batch(step)] >= lo) & (diff[ad.batch(step)] <= hi)).all()


# ---------------------------------------------------------------- trainer and resume
def _trainer(tiny, out, order="random", iters=8, **kw):
    from qmlx.lora.data import load_data
    from qmlx.lora.score import sample_losses

    model, tok = qmlx.load(str(tiny / "m"))
    data = load_data(str(tiny / "data"), tok, 64)
    scores = None if order == "random" else sample_losses(model, data["train"], 4)
    mx.random.seed(0)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.1)
    os.makedirs(out, exist_ok=True)
    cfg = TrainConfig(
        model=str(tiny / "m"),
        iters=iters,
        lr=5e-3,
        batch_size=4,
        grad_accum=2,
        warmup=2,
        report_every=1,
        val_every=3,
        save_every=3,
        order=order,
        rescore_every=2,
        rescore_pool=12,
        dropout=0.1,
        rank=4,
        alpha=8.0,
        **kw,
    )
    return Trainer(model, data, cfg, str(out), scores)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("in_band")) for r in rows]


@pytest.mark.parametrize("order", ["random", "adaptive"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny, tmp_path, order):
    full = _trainer(tiny, tmp_path / "full", order)
    list(full.run())
    # "Killed" after step 5: checkpoint at 3, metrics logged up to 5.
    part = _trainer(tiny, tmp_path / "part", order)
    for ev in part.run():
        if ev.step == 5:
            break
    resumed = _trainer(tiny, tmp_path / "part", order)
    resumed.load_checkpoint(str(tmp_path / "part" / "checkpoints" / "step-000003"))
    list(resumed.run())
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    vals = [v for _, _, v, _ in _losses(tmp_path / "full") if v is not None]
    assert vals[-1] < vals[0], "training lowers the validation loss"


# ---------------------------------------------------------------- CLI: train, use, fuse, export
def test_cli_train_generate_fuse(tiny, tmp_path, capsys, monkeypatch):
    import qmlx.lora.score as score

    monkeypatch.setattr(score, "CACHE_DIR", str(tmp_path / "cache"))
    m, data, out = str(tiny / "m"), str(tiny / "data"), str(tmp_path / "ad")
    assert (
        main(
            [
                "lora",
                "--model",
                m,
                "--data",
                data,
                "--iters",
                "6",
                "--lr",
                "1e-2",
                "--batch-size",
                "4",
                "--adapter-path",
                out,
                "--save-every",
                "3",
                "--val-every",
                "3",
                "--order",
                "easy-to-hard",
                "--grad-checkpoint",
            ]
        )
        == 0
    )
    assert {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "train_config.json"} <= set(
        os.listdir(out)
    )
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-000003", "step-000006"]
    # The difficulties were computed once, cached, and are the base model's per-sample losses.
    (cached,) = os.listdir(tmp_path / "cache")
    base, tok = qmlx.load(m)
    from qmlx.lora.data import load_data

    want = score.sample_losses(base, load_data(data, tok, 2048)["train"], batch_size=1)
    np.testing.assert_allclose(json.loads((tmp_path / "cache" / cached).read_text()), want, rtol=1e-4)
    tuned, _ = qmlx.load(m, adapter=out)
    ids = mx.array([tok.encode("<|im_start|>user\nq3 x x<|im_end|>\n<|im_start|>assistant\n")])
    assert mx.abs(tuned(ids) - base(ids)).max().item() > 1e-3
    capsys.readouterr()
    assert main(["generate", "-m", m, "--adapter", out, "-p", "q3", "-n", "4", "--temp", "0"]) == 0
    text = capsys.readouterr().out.strip()
    assert (
        text
        == qmlx.generate(
            tuned,
            tok,
            tok.apply_chat_template([{"role": "user", "content": "q3"}]),
            max_tokens=4,
            temperature=0.0,
        ).strip()
    )
    # Fused dense == adapter; fused and quantized == adapter within 8-bit error.
    assert main(["fuse", "-m", m, "--adapter", out, str(tmp_path / "f"), "--dtype", "float32"]) == 0
    fused, _ = qmlx.load(str(tmp_path / "f"))
    np.testing.assert_allclose(np.array(fused(ids)), np.array(tuned(ids)), atol=1e-4)
    assert (
        main(["fuse", "-m", m, "--adapter", out, str(tmp_path / "f8"), "--bits", "8", "--group-size", "32"])
        == 0
    )
    q8, _ = qmlx.load(str(tmp_path / "f8"))
    assert q8.config.quantization["bits"] == 8
    err = mx.abs(q8(ids) - tuned(ids)).max().item()
    assert err < 0.05 * mx.abs(tuned(ids)).max().item()
    # A resumed finished run with more --iters continues from its last checkpoint.
    assert main(["lora", "--resume", out, "--iters", "7"]) == 0
    assert "step-000007" in os.listdir(os.path.join(out, "checkpoints"))


def test_fuse_of_a_quantized_base_requantizes(tiny, tmp_path):
    q = str(tmp_path / "q")
    from convert import convert

    convert(str(tiny / "m"), q, bits=4, group_size=32)
    ids = mx.array([[5, 6, 7, 8, 9]])
    outs = {}
    for bits in (None, 8):
        model, _ = qmlx.load(q)
        mx.random.seed(0)
        apply_lora(model, rank=4, alpha=8.0)
        _randomize_b(model)
        want = model(ids)
        fuse_model(model, bits=bits, group_size=32 if bits else None)
        assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
        layer = model.layers[0].self_attn.q_proj
        assert isinstance(layer, QuantizedLinear) and layer.bits == (bits or 4)
        outs[bits] = (model(ids), want)
    # At 8 bits the merged weights are close to base + update (the per-layer math is exact,
    # see test_lora_linear_is_base_plus_scaled_low_rank_update).
    got, want = outs[8]
    assert mx.abs(got - want).mean().item() < 0.05 * mx.abs(want).mean().item()


def test_fused_folder_has_the_side_files_of_a_converted_one(tiny, tmp_path):
    """Fuse writes through the converter's writer: chat_template.json and the rest travel too."""
    import shutil

    from convert import convert
    from qmlx.folder import SIDE_FILES
    from qmlx.lora.adapters import save_adapter
    from qmlx.lora.fuse import fuse

    base = tmp_path / "base"
    shutil.copytree(tiny / "m", base)
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    model, _ = qmlx.load(str(base))
    apply_lora(model, rank=4, alpha=8.0, targets=["q"])
    save_adapter(model, str(tmp_path / "ad"), {"rank": 4, "alpha": 8.0, "targets": ["q"]})
    fused = fuse(str(base), str(tmp_path / "ad"), str(tmp_path / "f"))
    convert(str(base), str(tmp_path / "c"), dequantize=True)
    side = lambda d: {f for f in os.listdir(d) if f in SIDE_FILES}  # noqa: E731
    assert "chat_template.json" in side(fused)
    assert side(fused) == side(tmp_path / "c")
    assert (base / "chat_template.json").read_text() == (tmp_path / "f" / "chat_template.json").read_text()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["lora", "--model", "M", "--data", "nowhere"], "--data nowhere: no such folder"),
        (["lora", "--model", "M", "--data", "D", "--targets", "q,zz"], "--targets: unknown target 'zz'"),
        (["lora", "--model", "M", "--data", "D", "--band", "0.9"], "--band must be two quantiles"),
        (["lora", "--model", "M", "--data", "D", "--batch-size", "64"], "fewer than --batch-size 64"),
        (["lora", "--resume", "nowhere"], "--resume nowhere: no train_config.json"),
        (["generate", "-m", "M", "--adapter", "nowhere", "-p", "x"], "--adapter nowhere: no such folder"),
        (["fuse", "-m", "M", "--adapter", "nowhere", "DST"], "--adapter nowhere: no such folder"),
    ],
)
def test_cli_user_errors_are_one_line_with_status_2(tiny, tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    argv = [str(tiny / "m") if a == "M" else str(tiny / "data") if a == "D" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Progress lines may come first; the error is one line, and no traceback.
    assert needle in err[-1] and err[-1].startswith("qmlx ") and not any("Traceback" in e for e in err)
    assert not os.listdir(tmp_path), "a refused run writes nothing"


def test_adapter_folder_checked_against_the_model(tiny, tmp_path):
    model, _ = qmlx.load(str(tiny / "m"))
    apply_lora(model, rank=4, alpha=8.0, targets=["q"])
    from qmlx.lora.adapters import AdapterError, save_adapter

    save_adapter(model, str(tmp_path), {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]})
    with pytest.raises(AdapterError, match="lacks 'model.layers.0.self_attn.v_proj.lora_A'"):
        qmlx.load(str(tiny / "m"), adapter=str(tmp_path))


# ---------------------------------------------------------------- estimate
@pytest.mark.parametrize("bits", [None, 4])
def test_estimate_counts_match_a_built_model(tiny, bits):
    """Weight bytes and adapter parameters from shapes alone equal those of a real model."""
    cfg = tiny_config()
    model, _ = qmlx.load(str(tiny / "m"))
    if bits:
        quantize_model(model, {"bits": bits, "group_size": 32})
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    apply_lora(model, rank=4, alpha=8.0, targets=["q", "k", "down"])
    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    e = estimate(
        cfg, bits, 32, rank=4, targets=["q", "k", "down"], dtype_bytes=4, scale_bytes=4
    )  # quantized in memory: float32 scales
    assert e.adapter_params == n
    assert e.weights == weights
    assert e.total_checkpointed <= e.total


def test_estimate_cli_for_a_config_file(capsys):
    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "fixtures", "configs", "qwen2.5-7b-instruct.json"
    )
    if not os.path.exists(path):
        pytest.skip("shared configs not present")
    assert (
        main(
            [
                "lora",
                "--estimate",
                "--model",
                path,
                "--bits",
                "4",
                "--batch-size",
                "8",
                "--max-seq-len",
                "512",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "--grad-checkpoint" in out and "total" in out and "20.2M params" in out


def test_chunked_loss_gives_the_same_loss_and_gradients(tiny):
    import qmlx.lora.score as score

    model, _ = qmlx.load(str(tiny / "m"))
    mx.random.seed(3)
    apply_lora(model, rank=4, alpha=8.0)
    _randomize_b(model)
    tokens = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]])
    mask = mx.array([[0, 0, 1, 1, 1, 1, 1, 1, 1]] * 2).astype(mx.bool_)

    def loss(chunk):
        def f(model, t, m):
            ce, w = score.token_losses(model, t, m, chunk=chunk)
            return ce.sum() / w.sum()

        return nn.value_and_grad(model, f)(model, tokens, mask)

    (whole, g1), (chunked, g2) = loss(10_000), loss(4)  # 4 tokens = 2 positions per chunk
    assert abs(whole.item() - chunked.item()) < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=k)


def test_resume_after_a_real_kill(tiny, tmp_path):
    """SIGKILL a `qmlx lora` process mid-run; `--resume` then logs what an unkilled run logs."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [
        "--model",
        str(tiny / "m"),
        "--data",
        str(tiny / "data"),
        "--iters",
        "60",
        "--lr",
        "5e-3",
        "--batch-size",
        "4",
        "--dropout",
        "0.1",
        "--save-every",
        "5",
        "--val-every",
        "10",
        "--report-every",
        "1",
        "--warmup",
        "3",
    ]
    env = {**os.environ, "PYTHONPATH": root}
    lora = [sys.executable, "-m", "qmlx", "lora"]
    subprocess.run(
        lora + args + ["--adapter-path", str(tmp_path / "full")], env=env, check=True, capture_output=True
    )
    proc = subprocess.Popen(
        lora + args + ["--adapter-path", str(tmp_path / "cut")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "cut" / "checkpoints"
    while proc.poll() is None and not (ckpts / "step-000010").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut" / "adapters.safetensors").exists()
    subprocess.run(lora + ["--resume", str(tmp_path / "cut")], env=env, check=True, capture_output=True)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
