"""Affine group quantization: error bounds, both matmul paths, the model swap, recipes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from tiny import random_model, tiny_config

from qmlx import kernels
from qmlx.quant import (
    QuantizationError,
    QuantizedEmbedding,
    QuantizedLinear,
    bits_per_weight,
    dequantize,
    plan,
    quantize,
    quantize_model,
)
from qmlx.quant import layers as qlayers
from qmlx.quant.recipes import is_sensitive_layer, layer_params

ALL_BITS = (2, 3, 4, 5, 6, 8)
ALL_GROUPS = (32, 64, 128)


@pytest.fixture
def dense_path(monkeypatch):
    """Force the dequantize-then-matmul path (the CPU's prompt path without qmlx's kernels)."""
    monkeypatch.setattr(qlayers, "use_kernels", lambda: False)
    monkeypatch.setattr(qlayers, "use_dense", lambda rows: True)


@pytest.fixture
def packed_path(monkeypatch):
    """Force mx.quantized_matmul (what Metal uses, and the CPU's decode path without qmlx's kernels)."""
    monkeypatch.setattr(qlayers, "use_kernels", lambda: False)
    monkeypatch.setattr(qlayers, "use_dense", lambda rows: False)


@pytest.fixture
def kernel_path():
    """qmlx's CPU kernels (what the CPU backend uses when they are built: asserted in test_kernels.py)."""
    if not qlayers.use_kernels():
        pytest.fail("qmlx's kernels are not in use here: " + kernels.status)


def group_error_bound(scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """The largest reconstruction error the format allows, per group.

    One quantization step (the scale), not half of one: MLX shifts each group's grid so that
    zero is exactly representable, which can move the nearest level up to a full step away.
    Storing scale and bias in a 16-bit dtype adds their rounding: up to one unit in the last
    place of the bias and of the largest level, scale·(2^bits − 1).
    """
    s, b = mx.abs(scales.astype(mx.float32)), mx.abs(biases.astype(mx.float32))
    ulp = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[scales.dtype]
    return s + ulp * (b + s * (2**bits - 1))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", ALL_GROUPS)
def test_error_per_group_is_bounded(bits, group_size, dtype):
    mx.random.seed(bits * 1000 + group_size)
    w = (0.05 * mx.random.normal((32, 384)) + 0.01).astype(dtype)
    q, s, b = quantize(w, bits, group_size)
    assert q.dtype == mx.uint32 and q.shape == (32, 384 * bits // 32)
    assert s.shape == b.shape == (32, 384 // group_size) and s.dtype == dtype
    err = mx.abs(dequantize(q, s, b, bits, group_size).astype(mx.float32) - w.astype(mx.float32))
    worst = err.reshape(32, -1, group_size).max(axis=-1)
    assert mx.all(worst <= group_error_bound(s, b, bits)).item()


def test_more_bits_means_less_error():
    w = mx.random.normal((64, 256))
    errors = []
    for bits in ALL_BITS:
        q, s, b = quantize(w, bits, 64)
        errors.append(mx.abs(dequantize(q, s, b, bits, 64) - w).mean().item())
    assert errors == sorted(errors, reverse=True)


def test_same_packing_as_mlx():
    """MLX-community checkpoints hold mx.quantize output: our layer must read it unchanged."""
    mx.random.seed(1)
    ref = nn.QuantizedLinear(256, 96, bias=True, group_size=64, bits=5)
    ours = QuantizedLinear(256, 96, True, 64, 5)
    ours.load_weights(list(tree_flatten(ref.parameters())))
    x = mx.random.normal((1, 3, 256))
    assert mx.allclose(ours(x), ref(x), atol=1e-5).item()


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rows", [1, 4, 9, 128])
def test_dense_and_packed_paths_agree(bits, rows, monkeypatch):
    mx.random.seed(rows)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 384, bias=True), 64, bits)
    x = mx.random.normal((1, rows, 256))
    ours = layer(x)  # qmlx's kernels
    monkeypatch.setattr(qlayers, "use_kernels", lambda: False)
    monkeypatch.setattr(qlayers, "use_dense", lambda n: True)
    dense = layer(x)
    monkeypatch.setattr(qlayers, "use_dense", lambda n: False)
    packed = layer(x)
    assert dense.shape == packed.shape == ours.shape == (1, rows, 384)
    assert mx.allclose(dense, packed, atol=1e-4, rtol=1e-4).item()
    assert mx.allclose(ours, packed, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("out_block", [16384, 64])
@pytest.mark.parametrize("path", ["dense_path", "packed_path", "kernel_path"])
def test_input_gradient_through_a_frozen_quantized_layer(path, out_block, request, monkeypatch):
    """What LoRA training needs: d(loss)/dx through W, equal to the gradient through the
    dequantized matrix, on both paths (the dense one recomputes W in its backward pass)."""
    request.getfixturevalue(path)
    mx.random.seed(3)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 192, bias=True), 64, 4)
    w = dequantize(layer.weight, layer.scales, layer.biases, 4, 64)
    x = mx.random.normal((2, 24, 256))
    target = mx.random.normal((2, 24, 192))
    ours = mx.grad(lambda x: mx.square(layer(x) - target).sum())(x)
    ref = mx.grad(lambda x: mx.square(x @ w.T + layer.bias - target).sum())(x)
    assert mx.allclose(layer(x), x @ w.T + layer.bias, atol=1e-4).item()
    assert mx.allclose(ours, ref, atol=1e-3, rtol=1e-4).item()


@pytest.mark.parametrize("path", ["dense_path", "kernel_path"])
def test_backward_keeps_one_dequantized_matrix_at_a_time(path, request):
    """A deep stack of frozen 4-bit layers under autograd: the dense path must not keep every
    layer's float32 matrix from the forward pass until the backward pass (qmlx's kernels hold none)."""
    request.getfixturevalue(path)
    mx.random.seed(4)
    n, d = 16, 1024
    layers = [QuantizedLinear.from_linear(nn.Linear(d, d, bias=False), 64, 4) for _ in range(n)]
    mx.eval([layer.parameters() for layer in layers])
    x = mx.random.normal((32, d))
    mx.eval(x)

    def loss(x):
        for layer in layers:
            x = layer(x)
        return x.sum()

    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mx.grad(loss)(x))
    extra = mx.get_peak_memory() - before
    one_matrix = d * d * 4
    assert extra < 6 * one_matrix, f"{extra / one_matrix:.1f} float32 matrices alive at the peak"


def test_path_choice_follows_rows_on_cpu(monkeypatch):
    monkeypatch.setattr(qlayers, "on_cpu_backend", lambda: True)
    assert not qlayers.use_dense(1) and not qlayers.use_dense(qlayers.DENSE_MIN_ROWS)
    assert qlayers.use_dense(qlayers.DENSE_MIN_ROWS + 1)
    monkeypatch.setattr(qlayers, "on_cpu_backend", lambda: False)
    assert not qlayers.use_dense(4096)  # Metal keeps quantized_matmul


@pytest.mark.parametrize("path", ["dense_path", "packed_path", "kernel_path"])
def test_embedding_lookup_and_tied_head(path, request):
    request.getfixturevalue(path)
    emb = nn.Embedding(500, 128)
    q = QuantizedEmbedding.from_embedding(emb, 32, 8)
    dense = dequantize(q.weight, q.scales, q.biases, 8, 32)
    ids = mx.array([[3, 499, 0, 7]])
    # The kernels' lookup computes scale * q + bias as one fused multiply-add: within an ulp of MLX's.
    assert mx.allclose(q(ids), dense[ids], rtol=1e-6, atol=1e-7).item()
    x = mx.random.normal((1, 12, 128))
    # 12 rows: on the kernels' integer GEMV path (x rounded to 15 bits per group), ~1e-4 of max |y|.
    assert mx.allclose(q.as_linear(x), x @ dense.T, atol=1e-3).item()


def test_quantized_layers_are_frozen():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 64), 64, 4)
    assert tree_flatten(layer.trainable_parameters()) == []


def _layers(model) -> dict[str, int]:
    return {
        p: m.weight.shape[1] for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    }


def test_quantize_model_follows_global_and_per_layer_entries():
    model = random_model(tiny_config(tie_word_embeddings=False))
    q = {
        "group_size": 64,
        "bits": 4,
        "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
        "model.layers.1.self_attn.q_proj": False,
    }
    quantize_model(model, q)
    mlp0, attn1 = model.layers[0].mlp, model.layers[1].self_attn
    assert isinstance(mlp0.gate_proj, QuantizedLinear) and mlp0.gate_proj.bits == 4
    assert (mlp0.down_proj.bits, mlp0.down_proj.group_size) == (8, 32)
    assert isinstance(attn1.q_proj, nn.Linear) and not isinstance(attn1.q_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedLinear)


def test_quantized_model_stays_close_to_dense():
    cfg = tiny_config(hidden_size=128, intermediate_size=256)
    model = random_model(cfg)
    ids = mx.array([[1, 5, 9, 200, 3, 4, 7, 11, 13, 17, 19, 23]])
    ref = model(ids)
    quantize_model(model, {"group_size": 32, "bits": 8})
    # Random weights amplify error through the blocks; a real model does far better.
    assert mx.abs(model(ids) - ref).mean().item() < 0.05 * mx.abs(ref).mean().item()


def test_loading_mode_quantizes_only_layers_with_scales():
    model = random_model(tiny_config())
    names = {"model.layers.0.mlp.up_proj.scales", "model.embed_tokens.scales"}
    quantize_model(model, {"group_size": 64, "bits": 4}, weight_names=names)
    assert isinstance(model.layers[0].mlp.up_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert not isinstance(model.layers[0].mlp.gate_proj, QuantizedLinear)
    assert model.layers[0].mlp.up_proj.weight.shape == (128, 64 * 4 // 32)


def test_tied_head_uses_quantized_embedding():
    model = random_model(tiny_config(tie_word_embeddings=True))
    quantize_model(model, {"group_size": 64, "bits": 8})
    emb = model.model.embed_tokens
    h = mx.random.normal((1, 2, 64))
    assert mx.array_equal(model.head(h), emb.as_linear(h)).item()


@pytest.mark.parametrize(
    "quantization, needle",
    [
        ({"group_size": 64, "bits": 7}, "bits 7"),
        ({"group_size": 48, "bits": 4}, "group_size 48"),
        ({"group_size": 64, "bits": 4, "model.norm": 3}, "'model.norm'"),
        ({"group_size": 64, "bits": 4, "lm_head": {"bits": 9}}, "'lm_head'"),
        ({"group_size": 64, "bits": 4, "lm_head": {"mode": "mxfp4"}}, "mode 'mxfp4'"),
    ],
)
def test_bad_settings_are_refused_by_name(quantization, needle):
    model = random_model(tiny_config(tie_word_embeddings=False))
    if "model.norm" in quantization:  # an entry for a layer that exists but is not quantizable
        quantization = {**quantization, "lm_head": quantization.pop("model.norm")}
        needle = "'lm_head'"
    with pytest.raises(QuantizationError, match=needle):
        quantize_model(model, quantization)


def test_layer_params_inherit_global_settings():
    q = {"bits": 4, "group_size": 64, "a": {"bits": 8}, "b": False}
    assert layer_params(q, "a") == {"bits": 8, "group_size": 64}
    assert layer_params(q, "b") is None
    assert layer_params(q, "c") == {"bits": 4, "group_size": 64}


def test_sensitive_layers_follow_the_ends_and_every_third():
    picked = [i for i in range(24) if is_sensitive_layer(i, 24)]
    assert picked[:3] == [0, 1, 2] and picked[-3:] == [21, 22, 23]
    assert 5 in picked and 8 in picked and 4 not in picked


def test_recipes():
    layers = {"model.embed_tokens": 896, "lm_head": 896}
    for i in range(24):
        for proj in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            layers[f"model.layers.{i}.{proj}"] = 4864 if "down" in proj else 896
    uniform = plan(layers, 24, bits=4, group_size=64)
    assert uniform == {"group_size": 64, "bits": 4, "mode": "affine"}
    head8 = plan(layers, 24, bits=4, group_size=64, recipe="head-8")
    assert head8["model.embed_tokens"] == head8["lm_head"] == {"group_size": 64, "bits": 8}
    assert "model.layers.0.mlp.down_proj" not in head8
    kv8 = plan({**layers, "model.layers.3.self_attn.k_proj": 896}, 24, bits=4, group_size=64, recipe="kv-8")
    high = {k for k, v in kv8.items() if isinstance(v, dict)}
    assert high == {f"model.layers.{i}.self_attn.v_proj" for i in range(24)} | {
        "model.layers.3.self_attn.k_proj"
    }
    assert kv8["model.layers.3.self_attn.k_proj"] == {"group_size": 64, "bits": 8} and kv8["bits"] == 4
    mixed = plan(layers, 24, bits=8, group_size=64, recipe="mixed-4-6")
    assert mixed["bits"] == 4  # the recipe's low bits, whatever --bits says
    assert mixed["model.layers.0.self_attn.v_proj"] == {"group_size": 64, "bits": 6}
    assert mixed["model.layers.0.mlp.down_proj"]["bits"] == 6
    assert "model.layers.0.self_attn.q_proj" not in mixed
    assert "model.layers.4.mlp.down_proj" not in mixed
    assert mixed["model.embed_tokens"]["bits"] == 6
    # Input dims that do not divide into groups stay dense, recorded as false.
    g128 = plan({**layers, "model.layers.0.mlp.down_proj": 4000}, 24, bits=4, group_size=128)
    assert g128["model.layers.0.mlp.down_proj"] is False
    assert "model.layers.1.mlp.down_proj" not in g128
    with pytest.raises(QuantizationError, match="--recipe 'mixed-6-4'"):
        plan(layers, 24, recipe="mixed-6-4")


def test_bits_per_weight_counts_scales_and_biases():
    assert bits_per_weight(4, 64) == 4.5
    assert bits_per_weight(8, 32) == 9.0
