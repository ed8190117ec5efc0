"""`qmlx convert`: output that both qmlx and mlx-lm load, streaming memory, every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_config, write_folder

import convert.pipeline
import convert.writer
from convert import ConvertError
from convert import convert as run_convert
from qmlx.config import ConfigError
from qmlx.loader import load_model
from qmlx.quant import QuantizationError, QuantizedEmbedding, QuantizedLinear

IDS = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 200]])


def logits(folder: str) -> np.ndarray:
    return np.array(load_model(folder, dtype="float32")(IDS))


# qmlx vs mlx-lm logits on the 17 ids above. A quantized model runs them on qmlx's integer GEMV (x rounded to
# 15 bits per group, ~1e-4 of a product's largest value, tests/test_kernels.py), mlx-lm on MLX's float
# dequantization: through the tiny test models up to 4e-3 apart (measured), so 1e-2 for quantized folders.
QUANTIZED_ATOL = 1e-2


def mlx_lm_logits(folder: str) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(folder)
    model.set_dtype(mx.float32)
    return np.array(model(IDS).astype(mx.float32))


@pytest.fixture
def src(tmp_path) -> str:
    """A tiny bf16 Qwen2 folder in HF layout (untied head, 3 shards)."""
    path = str(tmp_path / "src")
    cfg = tiny_config(tie_word_embeddings=False, num_hidden_layers=3, torch_dtype="bfloat16")
    write_folder(path, cfg, shards=3, dtype=mx.bfloat16)
    return path


@pytest.fixture
def tied_src(tmp_path) -> str:
    path = str(tmp_path / "tied")
    write_folder(path, tiny_config(torch_dtype="bfloat16"), shards=2, dtype=mx.bfloat16)
    return path


def _mlx_lm_convert(src: str, dst: str, **kw) -> None:
    from mlx_lm import convert as mlx_lm_convert

    mlx_lm_convert(src, dst, quantize=True, **kw)


def _tensors(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(mx.load(os.path.join(folder, f)))
    return out


# ---------------------------------------------------------------- output and interop


def test_output_folder_has_everything(src, tmp_path):
    dst = str(tmp_path / "q4")
    assert run_convert(src, dst, progress=False) == dst
    files = set(os.listdir(dst))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= files
    assert {"tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= files
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert "model.layers.0.mlp.up_proj.scales" in index["weight_map"]
    with open(os.path.join(dst, "README.md")) as f:
        card = f.read()
    assert "bits per weight" in card and src in card
    # No temporary folders left beside DST.
    assert sorted(os.listdir(tmp_path)) == ["q4", "src"]


def test_qmlx_output_loads_in_mlx_lm_with_same_logits(src, tmp_path):
    dst = str(tmp_path / "q")
    run_convert(src, dst, bits=4, group_size=32, recipe="head-8", progress=False)
    model = load_model(dst, dtype="float32")
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    assert model.layers[0].mlp.up_proj.bits == 4 and model.layers[0].mlp.up_proj.group_size == 32
    np.testing.assert_allclose(logits(dst), mlx_lm_logits(dst), atol=QUANTIZED_ATOL)


def test_mlx_lm_output_loads_in_qmlx_with_same_logits(src, tmp_path):
    dst = str(tmp_path / "m")
    _mlx_lm_convert(src, dst, q_bits=4, q_group_size=64, quant_predicate="mixed_3_6")
    model = load_model(dst, dtype="float32")
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    np.testing.assert_allclose(logits(dst), mlx_lm_logits(dst), atol=1e-4)


def test_rtn_gives_the_same_bytes_as_mlx_lm_convert(tied_src, tmp_path):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    run_convert(tied_src, ours, bits=8, group_size=32, progress=False, method="rtn")
    _mlx_lm_convert(tied_src, theirs, q_bits=8, q_group_size=32)
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name


def test_tied_model_quantizes_the_embedding_used_as_head(tied_src, tmp_path):
    dst = str(tmp_path / "q")
    run_convert(tied_src, dst, bits=6, progress=False)
    model = load_model(dst, dtype="float32")
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert not hasattr(model, "lm_head")
    assert "lm_head.weight" not in _tensors(dst)
    np.testing.assert_allclose(logits(dst), mlx_lm_logits(dst), atol=1e-4)


def test_small_shard_size_splits_into_shards(src, tmp_path):
    dst = str(tmp_path / "q")
    run_convert(src, dst, bits=8, shard_size="60KB", progress=False)
    shards = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in shards:
        assert os.path.getsize(os.path.join(dst, f)) < 60_000 + 16_000  # one tensor may overflow
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    sizes = sum(v.nbytes for v in _tensors(dst).values())
    assert index["metadata"]["total_size"] == sizes
    np.testing.assert_allclose(logits(dst), mlx_lm_logits(dst), atol=QUANTIZED_ATOL)


def test_dequantize_round_trip(src, tmp_path):
    q8, back = str(tmp_path / "q8"), str(tmp_path / "back")
    run_convert(src, q8, bits=8, progress=False)
    run_convert(q8, back, dequantize=True, progress=False)
    with open(os.path.join(back, "config.json")) as f:
        config = json.load(f)
    assert "quantization" not in config and config["torch_dtype"] == "bfloat16"
    weights = _tensors(back)
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.bfloat16
    assert not any(k.endswith(".scales") for k in weights)
    packed = _tensors(q8)
    p = "model.layers.1.self_attn.o_proj"
    expected = mx.dequantize(
        packed[p + ".weight"], packed[p + ".scales"], packed[p + ".biases"], group_size=64, bits=8
    )
    assert mx.array_equal(weights[p + ".weight"], expected).item()
    assert logits(back).shape == logits(q8).shape


def test_dtype_flag_sets_unquantized_tensors_and_scales(src, tmp_path):
    dst = str(tmp_path / "q")
    run_convert(src, dst, dtype="float16", progress=False)
    weights = _tensors(dst)
    assert weights["model.norm.weight"].dtype == mx.float16
    assert weights["model.layers.0.mlp.up_proj.scales"].dtype == mx.float16


def test_force_replaces_existing_destination(src, tmp_path):
    dst = str(tmp_path / "q")
    run_convert(src, dst, bits=8, progress=False)
    run_convert(src, dst, bits=4, force=True, progress=False)
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["quantization"]["bits"] == 4


# ---------------------------------------------------------------- refusals


def test_refuses_existing_destination(src, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        run_convert(src, str(dst), progress=False)


def test_refuses_destination_inside_source(src):
    with pytest.raises(ConvertError, match="outside SRC"):
        run_convert(src, os.path.join(src, "out"), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"bits": 7}, QuantizationError, "bits 7"),
        ({"group_size": 48}, QuantizationError, "group_size 48"),
        ({"recipe": "best"}, QuantizationError, "--recipe 'best'"),
        ({"shard_size": "lots"}, ConvertError, "--shard-size"),
        ({"dtype": "int8"}, ConvertError, "--dtype 'int8'"),
        ({"dequantize": True, "recipe": "head-8"}, ConvertError, "--recipe .* --dequantize"),
    ],
)
def test_refuses_bad_settings(src, tmp_path, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        run_convert(src, str(tmp_path / "q"), progress=False, **kwargs)
    assert not os.path.exists(tmp_path / "q")


def _rewrite_shard(folder: str, edit) -> str:
    """Apply `edit(dict)` to the first shard's tensors and keep the index in step."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shard = sorted(set(index["weight_map"].values()))[0]
    path = os.path.join(folder, shard)
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(path).items()}
    edit(tensors)
    from safetensors.numpy import save_file

    save_file(tensors, path)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return path


def test_refuses_unsupported_dtype(src, tmp_path):
    def to_float64(t):
        name = next(iter(t))
        t[name] = t[name].astype(np.float64)

    path = _rewrite_shard(src, to_float64)
    with pytest.raises(ConvertError, match=f"{path}: tensor .* has dtype F64"):
        run_convert(src, str(tmp_path / "q"), progress=False)


def test_refuses_missing_tensor(src, tmp_path):
    _rewrite_shard(src, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ConvertError, match="tensor 'model.layers.0.mlp.up_proj.weight' is missing"):
        run_convert(src, str(tmp_path / "q"), progress=False)


def test_refuses_unexpected_tensor(src, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)

    _rewrite_shard(src, add)
    with pytest.raises(ConvertError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        run_convert(src, str(tmp_path / "q"), progress=False)


def test_refuses_misshapen_tensor(src, tmp_path):
    def shrink(t):
        name = next(k for k in t if k.endswith("proj.weight"))
        t[name] = t[name][:-1]

    _rewrite_shard(src, shrink)
    with pytest.raises(ConvertError, match="has shape .* the config implies"):
        run_convert(src, str(tmp_path / "q"), progress=False)


def test_refuses_a_model_that_is_not_qwen2(src, tmp_path):
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "llama"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        run_convert(src, str(tmp_path / "q"), progress=False)


def test_refuses_quantized_source_without_dequantize(src, tmp_path):
    q = str(tmp_path / "q")
    run_convert(src, q, progress=False)
    with pytest.raises(ConvertError, match="already quantized; pass --dequantize"):
        run_convert(q, str(tmp_path / "q2"), progress=False)


def test_refuses_missing_source(tmp_path):
    with pytest.raises(ConvertError, match="no such file or folder"):
        run_convert(str(tmp_path / "nope"), str(tmp_path / "q"), progress=False)


def test_offline_hub_id_says_how_to_pass_a_folder(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConvertError, match="If you are offline.*pass its folder"):
        run_convert("Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path / "q"), progress=False)


# ---------------------------------------------------------------- interruption


def Interrupt(n: int):
    """A ShardWriter.write that presses Ctrl-C on its n-th call."""
    original = convert.writer.ShardWriter.write
    calls = []

    def write(writer, *args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(writer, *args)

    return write


def test_interrupted_conversion_leaves_no_destination(src, tmp_path, monkeypatch):
    monkeypatch.setattr(convert.writer.ShardWriter, "write", Interrupt(10))
    with pytest.raises(KeyboardInterrupt):
        run_convert(src, str(tmp_path / "q"), shard_size="60KB", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_interrupted_forced_conversion_keeps_the_old_destination(src, tmp_path, monkeypatch):
    dst = str(tmp_path / "q")
    run_convert(src, dst, bits=8, progress=False)
    before = {f: os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)}
    monkeypatch.setattr(convert.writer.ShardWriter, "write", Interrupt(5))
    with pytest.raises(KeyboardInterrupt):
        run_convert(src, dst, bits=4, force=True, progress=False)
    assert {f: os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)} == before
    assert sorted(os.listdir(tmp_path)) == ["q", "src"]


def test_failure_while_writing_side_files_leaves_no_destination(src, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(convert.pipeline.card, "write_card", broken)
    with pytest.raises(OSError):
        run_convert(src, str(tmp_path / "q"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


KILLED_MIDWAY = """
import sys, time
import qmlx, convert.writer
from convert import convert as run
def write(self, *args):
    print("writing", flush=True)
    time.sleep(600)  # killed here
convert.writer.ShardWriter.write = write
run(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_conversion_leaves_only_a_hidden_folder_that_the_next_run_removes(src, tmp_path):
    dst = str(tmp_path / "q")
    p = subprocess.Popen([sys.executable, "-c", KILLED_MIDWAY, src, dst], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.kill()  # SIGKILL: no cleanup code can run
        p.wait()
    left = sorted(os.listdir(tmp_path))
    assert left[0].startswith(f".q.partial-{p.pid}-") and left[1:] == ["src"]
    # Another conversion's live work folder is not touched.
    live = tmp_path / f".q.partial-{os.getpid()}-0000"
    live.mkdir()
    run_convert(src, dst, progress=False)
    assert sorted(os.listdir(tmp_path)) == [live.name, "q", "src"]


# ---------------------------------------------------------------- command line


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmlx.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_convert_and_perplexity(src, tmp_path):
    dst = str(tmp_path / "q")
    r = _cli("convert", src, dst, "--bits", "8", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 20)
    r = _cli("perplexity", "--model", dst, "--file", str(text), "--ctx", "64")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ") and float(last.split()[-1]) > 1


def test_progress_goes_to_the_callback_and_convert_prints_nothing(src, tmp_path, capfd):
    calls = []
    run_convert(src, str(tmp_path / "q"), progress=lambda *a: calls.append(a))
    assert capfd.readouterr() == ("", "")
    (total,) = {t for _, _, t in calls}
    done = [d for _, d, _ in calls]
    assert done[0] == 0 and done[-1] == total > 0 and done == sorted(done)
    assert calls[0][0] == "converting" and any(what.startswith("tensor ") for what, _, _ in calls)


def test_cli_refusal_is_one_line_with_status_2(src, tmp_path):
    (tmp_path / "q").mkdir()
    r = _cli("convert", src, str(tmp_path / "q"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"qmlx convert: error: {tmp_path / 'q'}: already exists; pass --force to replace it"
    ]


# ---------------------------------------------------------------- the real checkpoint

# Peak RSS via VmHWM on Linux: ru_maxrss would include this (large) pytest process, which
# the child is forked from; that is how session 1's CI measured 2300 MB instead of ~80 MB.
PEAK_RSS = """
import resource, sys
import qmlx
from convert import convert
recipe = sys.argv[4] if len(sys.argv) > 4 else None
convert(sys.argv[1], sys.argv[2], bits=int(sys.argv[3]), group_size=64, recipe=recipe, progress=False)
if sys.platform.startswith("linux"):
    print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
else:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _convert_in_subprocess(src: str, dst: str, bits: int, recipe: str | None = None) -> int:
    """Convert in a fresh process and return its peak RSS in bytes."""
    r = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, src, dst, str(bits), *([recipe] if recipe else [])],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fixture_q(fixture_dir, tmp_path_factory):
    """The fixture converted at 4 and 8 bits (g64), with each conversion's peak RSS."""
    base = tmp_path_factory.mktemp("fixture-q")
    out = {}
    for bits in (4, 8):
        dst = str(base / f"q{bits}")
        out[bits] = (dst, _convert_in_subprocess(fixture_dir, dst, bits))
    return out


@pytest.mark.slow
def test_fixture_conversion_peak_memory_is_a_quarter_of_the_source(fixture_dir, fixture_q):
    source = sum(
        os.path.getsize(os.path.join(fixture_dir, f))
        for f in os.listdir(fixture_dir)
        if f.endswith(".safetensors")
    )
    for bits, (_, peak) in fixture_q.items():
        assert peak <= 0.25 * source, f"{bits}-bit: peak RSS {peak / 1e6:.0f} MB"


@pytest.mark.slow
def test_fixture_conversion_loads_in_mlx_lm_with_same_logits(fixture_q):
    dst, _ = fixture_q[4]
    # 1.1e-2 measured (max |logit| 17.6): qmlx's integer GEMV vs MLX's float product (QUANTIZED_ATOL);
    # with the prompt on the float GEMM (QMLX_GEMV_MAX_ROWS=4) the two agree within 1.1e-4.
    np.testing.assert_allclose(logits(dst), mlx_lm_logits(dst), atol=3e-2, rtol=1e-3)


def _python_text_perplexity(folder: str, reference: dict) -> tuple[float, float]:
    """(perplexity of `folder`, the bf16 reference's) on the first 1024 tokens of the code text."""
    from test_evaluate import TEXTS

    import qmlx
    from qmlx.evaluate import perplexity

    entry = next(t for t in reference["texts"] if t["file"].startswith("python"))
    model, tokenizer = qmlx.load(folder, dtype="float32")
    with open(os.path.join(TEXTS, entry["file"]), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())[: entry["tokens"]]
    return perplexity(model, ids)[0], entry["ppl"]


@pytest.mark.slow
def test_fixture_8bit_perplexity_within_half_a_percent_of_bf16(fixture_q, reference):
    ppl, bf16 = _python_text_perplexity(fixture_q[8][0], reference)
    assert ppl <= bf16 * 1.005, f"8-bit ppl {ppl:.3f} vs bf16 {bf16}"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="target not met: uniform 4-bit g64 is +10% on this text (the fixture is itself "
    "dequantized from a GGUF, and 0.5B models are the most sensitive); see docs/quantization.md",
)
def test_fixture_uniform_4bit_perplexity_within_6_percent_of_bf16(fixture_q, reference):
    ppl, bf16 = _python_text_perplexity(fixture_q[4][0], reference)
    assert ppl <= bf16 * 1.06, f"4-bit ppl {ppl:.3f} vs bf16 {bf16}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["kv-8", "mixed-4-6"])
def test_fixture_4bit_recipe_perplexity_within_6_percent_of_bf16(recipe, fixture_dir, reference, tmp_path):
    """kv-8: 4-bit g64 with k/v projections at 8 bits (4.55 bits/weight), the cheap way to the
    target; mixed-4-6: sensitive layers, embeddings and head at 6 bits (5.3 bits/weight)."""
    dst = str(tmp_path / recipe)
    _convert_in_subprocess(fixture_dir, dst, 4, recipe=recipe)
    ppl, bf16 = _python_text_perplexity(dst, reference)
    assert ppl <= bf16 * 1.06, f"{recipe} ppl {ppl:.3f} vs bf16 {bf16}"


# ---------------------------------------------------------------- GGUF

GGUF_CONFIG = dict(
    hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    torch_dtype="bfloat16", tie_word_embeddings=True,
)  # fmt: skip
# One tensor of each supported kind, so every dequantizer is exercised (K-quants need 256 columns).
GGUF_TYPES = {
    "token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q6_K",
    "attn_output": "F16", "ffn_gate": "BF16", "ffn_up": "Q8_0", "ffn_down": "Q4_K",
}  # fmt: skip


def write_gguf(path: str, arch: str = "qwen2", override: dict | None = None) -> dict:
    """A tiny qwen2 GGUF from a random model; returns the dequantized weights by HF name."""
    import gguf
    from gguf.quants import dequantize, quantize
    from tiny import random_model

    from convert.gguf import BLOCK_NAMES, TOP_NAMES

    cfg = tiny_config(**GGUF_CONFIG)
    weights = dict(tree_flatten_params(random_model(cfg)))
    to_gguf = {v: k for k, v in TOP_NAMES.items()}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = [bytes_to_unicode_char(b) for b in range(256)]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab"]
    types = [1] * 256 + [3, 3, 3, 1]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    types += [5] * (cfg["vocab_size"] - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(258)
    w.add_bos_token_id(256)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    dequantized = {}
    for name, value in weights.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            short = next(k for k, v in BLOCK_NAMES.items() if v == rest)
            gname = f"blk.{i}.{short}"
        else:
            gname = to_gguf[name]
        x = np.array(value, dtype=np.float32)
        kind = (override or {}).get(gname.split(".")[-2], GGUF_TYPES.get(gname.split(".")[-2]))
        if x.ndim == 1 or kind is None:
            kind = "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            data = x
        elif kind == "F16":
            data = x.astype(np.float16)
        elif kind in ("Q4_K", "Q6_K", "IQ4_NL"):
            data = random_blocks(x.shape, qtype)  # gguf cannot quantize these; any valid block does
        else:
            data = quantize(x, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype)
        dequantized[name] = data.astype(np.float32) if kind in ("F32", "F16") else dequantize(data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized


def random_blocks(shape: tuple[int, int], qtype) -> np.ndarray:
    """Random blocks of a GGUF quant type, with sane float16 scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    # Where each type keeps its float16 scale(s): Q4_K d, dmin first; Q6_K d last; IQ4_NL d first.
    spots = {"Q4_K": [0, 2], "Q6_K": [size - 2], "IQ4_NL": [0]}[qtype.name]
    for at in spots:
        data[..., at : at + 2] = scale
    return data.reshape(shape[0], -1)


def tree_flatten_params(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def bytes_to_unicode_char(b: int) -> str:
    from qmlx.tokenizer import byte_decoder

    return {v: k for k, v in byte_decoder().items()}[b]


def write_hf_twin(folder: str, weights: dict) -> None:
    """The HF folder holding the same (dequantized) weights as a GGUF, in bf16."""
    write_folder(folder, tiny_config(**GGUF_CONFIG), shards=1, dtype=mx.bfloat16)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        (shard,) = set(json.load(f)["weight_map"].values())
    mx.save_safetensors(
        os.path.join(folder, shard),
        {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
    )


def test_gguf_converts_like_the_same_weights_in_hf_layout(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    weights = write_gguf(gguf_path)
    twin = str(tmp_path / "twin")
    write_hf_twin(twin, weights)
    a, b = str(tmp_path / "from-gguf"), str(tmp_path / "from-hf")
    run_convert(gguf_path, a, bits=4, progress=False)
    run_convert(twin, b, bits=4, progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert mx.array_equal(ta[name], tb[name]).item(), name
    with open(os.path.join(a, "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 256
    assert config["rms_norm_eps"] == 1e-6
    np.testing.assert_allclose(logits(a), logits(b), atol=1e-5)


def test_gguf_tokenizer_and_template_are_rebuilt(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf(gguf_path)
    dst = str(tmp_path / "q")
    run_convert(gguf_path, dst, bits=8, progress=False)
    from qmlx.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(dst)
    text = "hi <|im_end|> about"
    ids = tok.encode(text)
    assert 258 in ids and 259 in ids and tok.decode(ids) == text  # the merge "a b" applies
    with open(os.path.join(dst, "chat_template.jinja")) as f:
        assert f.read().startswith("{% for m in")
    with open(os.path.join(dst, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [258, 256]


def test_gguf_dequantize_writes_bf16(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    weights = write_gguf(gguf_path)
    dst = str(tmp_path / "bf16")
    run_convert(gguf_path, dst, dequantize=True, progress=False)
    out = _tensors(dst)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert out[name].dtype == mx.bfloat16
    assert mx.array_equal(out[name], mx.array(weights[name]).astype(mx.bfloat16)).item()


def test_refuses_unknown_gguf_type(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf(gguf_path, override={"attn_q": "IQ4_NL"})
    with pytest.raises(ConvertError, match="'blk.0.attn_q.weight' has GGUF type IQ4_NL"):
        run_convert(gguf_path, str(tmp_path / "q"), progress=False)
    assert not os.path.exists(tmp_path / "q")


def test_refuses_gguf_of_another_architecture(tmp_path):
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf(gguf_path, arch="llama")
    with pytest.raises(ConvertError, match="general.architecture is 'llama'"):
        run_convert(gguf_path, str(tmp_path / "q"), progress=False)


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ConvertError, match="not a GGUF file"):
        run_convert(str(bad), str(tmp_path / "q"), progress=False)


FIXTURE_GGUF = os.environ.get(
    "QMLX_FIXTURE_GGUF",
    os.path.expanduser("~/.cache/qmlx-fixtures/qwen2.5-coder-0.5b-instruct.gguf"),
)


@pytest.mark.slow
def test_fixture_gguf_matches_the_hf_folder_conversion(fixture_dir, fixture_q, tmp_path):
    """The fixture folder was dequantized from this GGUF; both must convert to the same model.

    Byte-equal q_proj/k_proj also shows that llama.cpp applies no rotary row permutation to qwen2.
    """
    if not os.path.exists(FIXTURE_GGUF):
        pytest.skip(f"{FIXTURE_GGUF} not found: run scripts/fetch_fixture_gguf.py")
    import qmlx

    dst = str(tmp_path / "gguf-q4")
    run_convert(FIXTURE_GGUF, dst, bits=4, group_size=64, progress=False)
    hf_q4 = fixture_q[4][0]
    a, b = _tensors(dst), _tensors(hf_q4)
    assert set(a) == set(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    prompt = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    texts = []
    for folder in (dst, hf_q4):
        model, tok = qmlx.load(folder, dtype="float32")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True)
        # Plain greedy: the GGUF carries no sampling defaults (the HF folder's repetition_penalty).
        texts.append(qmlx.generate(model, tok, text, max_tokens=24, temperature=0.0, repetition_penalty=1.0))
    assert texts[0] == texts[1]
