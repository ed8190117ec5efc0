"""qmlx's CPU kernels (qmlx/kernels): the quantized product against a float64 NumPy reference, its
gradient against autograd of the dense product, dispatch and fallbacks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from qmlx import kernels
from qmlx.quant import layers as qlayers

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
SB_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
ROWS = (1, 2, 3, 4, 5, 7, 33, 300)


def test_kernels_are_built_and_used_here():
    """On Linux x86-64 with a compiler (this machine, CI) the extension must be built and chosen."""
    assert kernels.available(), kernels.status
    assert qlayers.use_kernels()
    if platform.machine() in ("x86_64", "AMD64"):
        assert kernels._ext.isa() in ("avx512vnni", "avx512", "avx2", "generic")


def _packed(n, k, bits, gs, sb_dtype, seed):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    s, b = s.astype(sb_dtype), b.astype(sb_dtype)
    # The float64 reference: W from the packed values exactly as stored (scale/bias in their own dtype).
    wd = np.array(
        mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits),
        dtype=np.float64,
    )
    return q, s, b, wd


def _x(shape, dtype, seed):
    x = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)
    return x, np.array(x.astype(mx.float32), dtype=np.float64)


INT_ISAS = ("avx512vnni", "avx512", "avx2")  # instruction sets whose GEMV multiplies in integers


def _int_path(bits, rows, transpose) -> bool:
    """Where the kernels multiply 4- or 8-bit weights by x rounded to 15-bit integers per group (AVX-512
    VNNI, AVX-512, AVX2; the GEMV side): the product is then exact up to that rounding, ~1e-4 of the
    output's largest value."""
    return kernels._ext.isa() in INT_ISAS and bits in (4, 8) and transpose and rows <= GEMV_MAX_ROWS


GEMV_MAX_ROWS = 32  # qmm.cpp's gemv_max_rows(): up to this many rows x·Wᵀ streams the weights (GEMV side)


@pytest.mark.parametrize("bits", (4, 8))
def test_each_row_of_a_batch_is_the_row_alone(bits):
    """A batch of decoding requests is one product of B rows; every row must come out bit for bit as it
    would alone (batched greedy decoding = unbatched), whatever B is and however the GEMV blocks the rows."""
    q, s, b, _ = _packed(197, 256, bits, 64, mx.bfloat16, seed=bits)
    for rows in (2, 4, 5, 8, 13, GEMV_MAX_ROWS):
        for xdt in (mx.float32, mx.bfloat16):
            x, _ = _x((rows, 256), xdt, seed=rows)
            y = kernels.quantized_matmul(x, q, s, b, group_size=64, bits=bits)
            alone = mx.concatenate(
                [
                    kernels.quantized_matmul(x[i : i + 1], q, s, b, group_size=64, bits=bits)
                    for i in range(rows)
                ]
            )
            assert mx.array_equal(y, alone).item(), f"rows={rows} x={xdt}"


@pytest.mark.parametrize("bits", (4, 8))
def test_a_matrix_split_over_several_gemv_tasks(bits):
    """W large enough for the GEMV to split its rows into several ~128 KB tasks run by the pool, and a row
    count no multiple of the 4 rows the kernel takes at a time: every output row still matches float64."""
    n, k = 1203, 1024  # 4-bit rows of 512 bytes: 256 rows a task, 5 tasks, the last one 179 rows
    q, s, b, wd = _packed(n, k, bits, 64, mx.bfloat16, seed=50 + bits)
    for rows in (1, 3):
        x, xr = _x((rows, k), mx.float32, seed=rows)
        y = kernels.quantized_matmul(x, q, s, b, group_size=64, bits=bits)
        err = _rel_err(y, xr @ wd.T)
        assert err < (1e-4 if _int_path(bits, rows, True) else 2e-6), f"rows={rows}: {err:.2e}"


def _rel_err(y, ref):
    y = np.array(y.astype(mx.float32), dtype=np.float64)
    return np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("sb_dtype", SB_DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_product_matches_float64_reference(bits, gs, sb_dtype):
    """Every bits x group size x scale dtype, rows 1…300 (GEMV and GEMM sides), non-power-of-two
    shapes, both products (x·Wᵀ and x·W), float32 and bfloat16 activations."""
    n, k = 197, 3 * gs + 128 if gs < 128 else 384  # 197 output rows: not a multiple of any panel width
    q, s, b, wd = _packed(n, k, bits, gs, sb_dtype, seed=bits * 100 + gs)
    for rows in ROWS:
        for transpose in (True, False):
            for xdt, tol in (
                (mx.float32, 1e-4 if _int_path(bits, rows, transpose) else 2e-6),
                (mx.bfloat16, 8e-3),
            ):
                x, xr = _x((rows, k if transpose else n), xdt, seed=rows)
                y = kernels.quantized_matmul(x, q, s, b, transpose=transpose, group_size=gs, bits=bits)
                ref = xr @ (wd.T if transpose else wd)
                assert y.dtype == xdt and y.shape == ref.shape
                err = _rel_err(y, ref)
                assert err < tol, f"rows={rows} transpose={transpose} x={xdt}: relative error {err:.2e}"


def test_leading_dimensions_and_float16_activations():
    q, s, b, wd = _packed(96, 256, 4, 64, mx.float16, seed=1)
    x, xr = _x((2, 3, 5, 256), mx.float16, seed=2)
    y = kernels.quantized_matmul(x, q, s, b, group_size=64, bits=4)
    assert y.shape == (2, 3, 5, 96) and y.dtype == mx.float16
    assert _rel_err(y, xr @ wd.T) < 2e-3


def test_non_contiguous_input():
    q, s, b, wd = _packed(64, 256, 8, 32, mx.float32, seed=3)
    x, xr = _x((256, 6), mx.float32, seed=4)
    y = kernels.quantized_matmul(x.T, q, s, b, group_size=32, bits=8)  # a transposed view
    assert _rel_err(y, xr.T @ wd.T) < (1e-4 if _int_path(8, 6, True) else 2e-6)


@pytest.mark.parametrize("rows", [1, 24])
@pytest.mark.parametrize("bits", [4, 8])
def test_gradient_matches_autograd_of_the_dense_product(bits, rows):
    """LoRA's backward pass over a frozen quantized base: d/dx of the kernel's product equals autograd
    through x @ dequantize(W)ᵀ; the vjp is the product with W (the other kernel direction)."""
    q, s, b, _ = _packed(160, 320 if bits == 8 else 256, bits, 32 if bits == 8 else 64, mx.bfloat16, seed=5)
    gs = 32 if bits == 8 else 64
    w = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    x = mx.random.normal((2, rows, w.shape[1]), key=mx.random.key(6))
    t = mx.random.normal((2, rows, 160), key=mx.random.key(7))
    ours = mx.grad(
        lambda x: mx.square(kernels.quantized_matmul(x, q, s, b, group_size=gs, bits=bits) - t).sum()
    )(x)
    ref = mx.grad(lambda x: mx.square(x @ w.T - t).sum())(x)
    tol = (
        1e-3 if _int_path(bits, rows, True) else 1e-4
    )  # the forward product's error is in the loss's gradient
    assert mx.allclose(ours, ref, rtol=tol, atol=tol).item()
    # forward-mode too
    v = mx.random.normal(x.shape, key=mx.random.key(8))
    _, jv = mx.jvp(lambda x: kernels.quantized_matmul(x, q, s, b, group_size=gs, bits=bits), [x], [v])
    assert mx.allclose(jv[0], v @ w.T, rtol=tol, atol=tol).item()


def test_compiles_and_is_lazy():
    q, s, b, wd = _packed(64, 128, 4, 32, mx.float32, seed=9)
    f = mx.compile(lambda x: mx.maximum(kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4), 0.0))
    x, xr = _x((3, 128), mx.float32, seed=10)
    assert _rel_err(f(x), np.maximum(xr @ wd.T, 0.0)) < (1e-4 if _int_path(4, 3, True) else 2e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=7), "bits must be"),
        (dict(group_size=16), "group_size must be"),
        (dict(x_cols=100), "last dimension"),
        (dict(scale_rows=63), "scales and biases must have shape"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(kwargs, message):
    q, s, b, _ = _packed(64, 128, 4, 32, mx.float32, seed=11)
    if "scale_rows" in kwargs:
        s = s[: kwargs["scale_rows"]]
    x = mx.zeros((1, kwargs.get("x_cols", 128)))
    with pytest.raises(ValueError, match=message):
        kernels.quantized_matmul(
            x, q, s, b, group_size=kwargs.get("group_size", 32), bits=kwargs.get("bits", 4)
        )


ISA_CHECK = """
import sys, numpy as np, mlx.core as mx
from qmlx import kernels
assert kernels._ext.isa() == sys.argv[1], kernels.status
worst = 0.0
for bits in (4, 8):
    for gs in (32, 64, 128):
        for sb in (mx.float32, mx.bfloat16, mx.float16):
            rng = np.random.default_rng(bits * gs)
            n, k = 203, 3 * 128
            q, s, b = mx.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05), group_size=gs, bits=bits)
            s, b = s.astype(sb), b.astype(sb)
            wd = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits), dtype=np.float64)
            for rows in (1, 3, 4, 6):
                x = rng.standard_normal((rows, k)).astype(np.float32)
                y = np.array(kernels.quantized_matmul(mx.array(x), q, s, b, group_size=gs, bits=bits), dtype=np.float64)
                ref = x.astype(np.float64) @ wd.T
                worst = max(worst, np.abs(y - ref).max() / np.abs(ref).max())
print(worst)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("isa", ("avx2", "avx512"))
def test_the_integer_gemv_of_each_x86_instruction_set(isa):
    """The AVX2 and AVX-512 (without VNNI) builds multiply 4- and 8-bit weights by x's 15-bit integers
    with vpmaddwd: every bits x group size x scale dtype and 1-6 rows against float64, in a fresh process
    with that instruction set forced (CI's CPU runs the VNNI build by default)."""
    have = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}[isa]
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if not all(f in flags for f in have):
        pytest.skip(f"this CPU has no {isa}")
    p = subprocess.run(
        [sys.executable, "-c", ISA_CHECK, isa],
        env={**os.environ, "QMLX_KERNELS_ISA": isa},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert float(p.stdout.strip()) < 1e-4


def test_threads_and_instruction_sets_agree():
    """The same product with 1 thread and with the generic (SSE2/NEON, float) kernels, in fresh processes
    (the 1-row product of the default kernels may round x to 16-bit integers per group: ~2e-4 of max |y|)."""
    code = (
        "import qmlx, mlx.core as mx, numpy as np\n"
        "from qmlx import kernels\n"
        "w = mx.random.normal((300, 256), key=mx.random.key(0))\n"
        "q, s, b = mx.quantize(w, group_size=64, bits=4)\n"
        "x = mx.random.normal((9, 256), key=mx.random.key(1))\n"
        "y = mx.concatenate([kernels.quantized_matmul(x[:1], q, s, b), kernels.quantized_matmul(x, q, s, b)])\n"
        "print(kernels.status); np.save(__import__('sys').argv[1], np.array(y))\n"
    )
    results = {}
    for name, env in {
        "default": {},
        "one thread": {"QMLX_THREADS": "1"},
        "generic": {"QMLX_KERNELS_ISA": "generic"},
    }.items():
        out = f"{os.environ.get('TMPDIR', '/tmp')}/qk-{os.getpid()}-{name.replace(' ', '')}.npy"
        p = subprocess.run(
            [sys.executable, "-c", code, out],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        results[name] = (p.stdout.strip(), np.load(out))
        os.unlink(out)
    assert "1 threads" in results["one thread"][0] and "generic" in results["generic"][0]
    ref = results["default"][1]
    for name in ("one thread", "generic"):
        assert np.abs(results[name][1] - ref).max() <= 5e-4 * np.abs(ref).max(), name


def test_turned_off_by_environment():
    p = subprocess.run(
        [sys.executable, "-m", "qmlx", "--version"],
        env={**os.environ, "QMLX_KERNELS": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "QMLX_KERNELS=0" in p.stdout, p.stdout + p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "qmlx", "--version"], capture_output=True, text=True, timeout=120
    )
    assert "quantized matmuls: qmlx " in p.stdout, p.stdout


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_rms_norm_matches_mlx_and_its_gradient(dtype):
    x = mx.random.normal((3, 5, 96), key=mx.random.key(12)).astype(dtype)
    w = (1.0 + 0.1 * mx.random.normal((96,), key=mx.random.key(13))).astype(dtype)
    ours, ref = kernels._ext.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert mx.allclose(ours.astype(mx.float32), ref.astype(mx.float32), rtol=tol, atol=tol).item()
    xt = x.astype(mx.float32).transpose(1, 0, 2)  # a strided view
    assert mx.allclose(
        kernels._ext.rms_norm(xt, w.astype(mx.float32), 1e-6),
        mx.fast.rms_norm(xt, w.astype(mx.float32), 1e-6),
        rtol=1e-5,
        atol=1e-5,
    ).item()
    xf, wf = x.astype(mx.float32), w.astype(mx.float32)
    g = mx.grad(lambda x, w: (kernels._ext.rms_norm(x, w, 1e-6) ** 2).sum(), argnums=(0, 1))(xf, wf)
    r = mx.grad(lambda x, w: (mx.fast.rms_norm(x, w, 1e-6) ** 2).sum(), argnums=(0, 1))(xf, wf)
    assert all(mx.allclose(a, b, rtol=1e-4, atol=1e-4).item() for a, b in zip(g, r))


@pytest.mark.parametrize("freqs", [None, "custom"])
@pytest.mark.parametrize("offset", [0, 7, 4095])
def test_rope_matches_mlx_and_its_gradient(offset, freqs):
    x = mx.random.normal((2, 4, 6, 64), key=mx.random.key(14)).transpose(0, 2, 1, 3)  # (B, H, L, D) view
    f = None if freqs is None else mx.array([1.5**i for i in range(32)], mx.float32)
    base = None if f is not None else 10000.0
    ours = kernels._ext.rope(x, 64, base or 0.0, 1.0, [offset], [] if f is None else f.tolist())
    theirs = mx.fast.rope(x, 64, traditional=False, base=base, scale=1.0, offset=offset, freqs=f)
    # float64 reference: angles lose precision in float32 as positions grow, MLX's as well as ours
    inv = 10000.0 ** (-np.arange(32) / 32) if f is None else 1.0 / np.array(f, dtype=np.float64)
    th = np.arange(offset, offset + 4)[:, None] * inv
    xn = np.array(x, dtype=np.float64)
    a, b = xn[..., :32], xn[..., 32:]
    ref = np.concatenate([a * np.cos(th) - b * np.sin(th), a * np.sin(th) + b * np.cos(th)], axis=-1)
    ours_err, mlx_err = np.abs(np.array(ours) - ref).max(), np.abs(np.array(theirs) - ref).max()
    assert ours_err <= max(mlx_err, 1e-6) * 1.01 and ours_err < 1e-3, (ours_err, mlx_err)
    part = kernels._ext.rope(x, 32, 10000.0, 1.0, [offset])  # partial rotary: the rest passes through
    assert mx.allclose(
        part,
        mx.fast.rope(x, 32, traditional=False, base=10000.0, scale=1.0, offset=offset),
        rtol=1e-3,
        atol=1e-3,
    ).item()
    t = mx.random.normal(x.shape, key=mx.random.key(15))
    g = mx.grad(lambda x: (kernels._ext.rope(x, 64, 10000.0, 1.0, [offset]) * t).sum())(x)
    r = mx.grad(
        lambda x: (mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=offset) * t).sum()
    )(x)
    assert mx.allclose(g, r, rtol=1e-3, atol=1e-3).item()
    bf = kernels._ext.rope(x.astype(mx.bfloat16), 64, 10000.0, 1.0, [offset])
    assert bf.dtype == mx.bfloat16


def test_rope_with_one_offset_per_batch_row_is_each_row_alone():
    """A batch of decoding requests, each at its own position: row b rotated at offsets[b], bit for bit as the
    row alone (batched greedy decoding = unbatched), forward and backward; wrong offset counts are refused."""
    x = mx.random.normal((3, 2, 5, 64), key=mx.random.key(17))
    offsets = [0, 9, 300]
    y = kernels.rope(x, 64, base=10000.0, offset=offsets)
    for b, o in enumerate(offsets):
        assert mx.array_equal(y[b : b + 1], kernels.rope(x[b : b + 1], 64, base=10000.0, offset=o)).item()
    t = mx.random.normal(x.shape, key=mx.random.key(18))
    g = mx.grad(lambda x: (kernels.rope(x, 64, base=10000.0, offset=offsets) * t).sum())(x)
    for b, o in enumerate(offsets):
        tb = t[b : b + 1]
        gb = mx.grad(lambda x, o=o, tb=tb: (kernels.rope(x, 64, base=10000.0, offset=o) * tb).sum())(
            x[b : b + 1]
        )
        assert mx.array_equal(g[b : b + 1], gb).item()
    with pytest.raises(ValueError, match="one per index"):
        kernels._ext.rope(x, 64, 10000.0, 1.0, [1, 2])


def test_silu_mul_matches_mlx_and_its_gradient():
    g = 4 * mx.random.normal((3, 7, 100), key=mx.random.key(16))
    u = mx.random.normal((3, 7, 100), key=mx.random.key(17))
    ref = lambda g, u: g * mx.sigmoid(g) * u  # noqa: E731
    assert mx.allclose(kernels._ext.silu_mul(g, u), ref(g, u), rtol=1e-5, atol=1e-6).item()
    assert mx.allclose(
        kernels._ext.silu_mul(g[:, ::2], u[:, ::2]), ref(g[:, ::2], u[:, ::2]), rtol=1e-5, atol=1e-6
    ).item()
    ours = mx.grad(lambda g, u: kernels._ext.silu_mul(g, u).sum(), argnums=(0, 1))(g, u)
    theirs = mx.grad(lambda g, u: ref(g, u).sum(), argnums=(0, 1))(g, u)
    assert all(mx.allclose(a, b, rtol=1e-5, atol=1e-5).item() for a, b in zip(ours, theirs))
    big = mx.array([-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0])  # the exp's clamps
    assert mx.allclose(kernels._ext.silu_mul(big, mx.ones_like(big)), ref(big, mx.ones_like(big))).item()


@pytest.mark.parametrize("shape", [(1, 14, 1, 37), (2, 2, 14, 9, 9), (1, 2, 35, 300)])
def test_attention_matches_mlx_sdpa_with_and_without_the_causal_mask(shape):
    """kernels.attention (matmuls around qmlx's softmax) against mx.fast.scaled_dot_product_attention, GQA
    included, and the softmax's gradient against autograd of MLX's."""
    B, L, S = shape[0], shape[-2], shape[-1]
    H_kv, H = 2, 14
    q = mx.random.normal((B, H, L, 64), key=mx.random.key(18))
    k = mx.random.normal((B, H_kv, S, 64), key=mx.random.key(19))
    v = mx.random.normal((B, H_kv, S, 64), key=mx.random.key(20))
    for mask in (None, "causal") if L > 1 else (None,):
        ours = kernels.attention(q, k, v, 0.125, mask)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        assert mx.allclose(ours, ref, rtol=1e-4, atol=1e-5).item(), mask
    x = mx.random.normal((3, 5, 8), key=mx.random.key(21))
    t = mx.random.normal((3, 5, 8), key=mx.random.key(22))
    causal = mx.triu(mx.full((5, 8), -mx.inf), k=4)  # row l sees keys 0 .. 3 + l
    ours = mx.grad(lambda x: (kernels._ext.softmax(x, 0.5, 5) * t).sum())(x)
    theirs = mx.grad(lambda x: (mx.softmax(0.5 * x + causal, axis=-1) * t).sum())(x)
    assert mx.allclose(
        kernels._ext.softmax(x, 0.5, 5), mx.softmax(0.5 * x + causal, axis=-1), atol=1e-6
    ).item()
    assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-6).item()


def test_float_matmul_and_linear_match_mlx():
    """The kernels' float GEMM (attention's two products, a float model's prompt): strided and
    bfloat16 operands, and the float layers' result through kernels.linear."""
    a = mx.random.normal((2, 3, 37, 64), key=mx.random.key(23))
    bt = mx.random.normal((2, 3, 45, 64), key=mx.random.key(24)).swapaxes(-1, -2)  # kᵀ: a transposed view
    assert mx.allclose(kernels._ext.matmul(a, bt), a @ bt, rtol=1e-5, atol=1e-4).item()
    ab = a.astype(mx.bfloat16)
    assert mx.allclose(kernels._ext.matmul(ab, bt), ab.astype(mx.float32) @ bt, rtol=1e-5, atol=1e-4).item()
    w = mx.random.normal((300, 64), key=mx.random.key(25))
    b = mx.random.normal((300,), key=mx.random.key(26))
    x = mx.random.normal((2, 9, 64), key=mx.random.key(27))
    assert mx.allclose(kernels.linear(x, w, b), x @ w.T + b, rtol=1e-5, atol=1e-4).item()
    g = mx.grad(lambda a: kernels._ext.matmul(a, bt).sum())(a)
    assert mx.allclose(g, mx.grad(lambda a: (a @ bt).sum())(a), rtol=1e-5, atol=1e-4).item()


@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 7])
def test_bias_in_the_product_matches_adding_it_after(rows, x_dtype):
    """quantized_matmul(..., bias=b) = x · Wᵀ + b (float64 reference), in the dtype x + b would have;
    gradients in x and in the bias as autograd of the dense product gives them."""
    q, s, b, wd = _packed(197, 256, 4, 64, mx.float32, seed=21)
    bias = mx.array(np.random.default_rng(22).standard_normal(197).astype(np.float32))
    x, xr = _x((rows, 256), x_dtype, seed=23)
    y = kernels.quantized_matmul(x, q, s, b, group_size=64, bits=4, bias=bias.astype(x_dtype))
    assert y.dtype == x_dtype and y.shape == (rows, 197)
    ref = xr @ wd.T + np.array(bias.astype(x_dtype).astype(mx.float32), dtype=np.float64)
    tol = 8e-3 if x_dtype == mx.bfloat16 else (1e-4 if _int_path(4, rows, True) else 2e-6)
    assert _rel_err(y, ref) < tol
    assert kernels.quantized_matmul(x, q, s, b, group_size=64, bits=4, bias=bias).dtype == mx.float32

    w = mx.array(wd.astype(np.float32))
    t = mx.random.normal((rows, 197), key=mx.random.key(24))
    xf = x.astype(mx.float32)
    ours = mx.grad(
        lambda x, c: mx.square(kernels.quantized_matmul(x, q, s, b, group_size=64, bits=4, bias=c) - t).sum(),
        argnums=(0, 1),
    )(xf, bias)
    ref_g = mx.grad(lambda x, c: mx.square(x @ w.T + c - t).sum(), argnums=(0, 1))(xf, bias)
    for a, r in zip(ours, ref_g, strict=True):
        assert mx.allclose(a, r, rtol=1e-3, atol=1e-3).item()
    # forward mode in the bias
    v = mx.random.normal(bias.shape, key=mx.random.key(25))
    _, jv = mx.jvp(
        lambda c: kernels.quantized_matmul(xf, q, s, b, group_size=64, bits=4, bias=c), [bias], [v]
    )
    assert jv[0].shape == (rows, 197) and mx.allclose(jv[0], mx.broadcast_to(v, (rows, 197))).item()


def test_bad_bias_is_refused():
    q, s, b, _ = _packed(64, 128, 4, 32, mx.float32, seed=26)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        kernels.quantized_matmul(mx.zeros((1, 128)), q, s, b, group_size=32, bits=4, bias=mx.zeros((63,)))
    with pytest.raises(ValueError, match="transposed product"):
        kernels.quantized_matmul(
            mx.zeros((1, 64)), q, s, b, transpose=False, group_size=32, bits=4, bias=mx.zeros((128,))
        )


@pytest.mark.parametrize("sb_dtype", SB_DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_rows_matches_the_dequantized_table(bits, gs, sb_dtype):
    q, s, b, wd = _packed(37, 2 * gs + 128, bits, gs, sb_dtype, seed=bits + gs)
    ids = mx.array([[0, 36, 5], [5, 17, 2]])
    out = kernels.dequantize_rows(q, s, b, ids, group_size=gs, bits=bits)
    assert out.shape == (2, 3, wd.shape[1]) and out.dtype == sb_dtype
    ref = wd[np.array(ids)]
    # scale * q + bias in float32, rounded to the scales' dtype (as mx.dequantize returns it)
    tol = 1e-6 if sb_dtype == mx.float32 else 8e-3
    assert np.abs(np.array(out.astype(mx.float32), dtype=np.float64) - ref).max() <= tol * np.abs(ref).max()


def test_dequantize_rows_outside_the_table_are_zeros():
    q, s, b, wd = _packed(8, 128, 4, 32, mx.float32, seed=30)
    out = np.array(kernels.dequantize_rows(q, s, b, mx.array([2, 8, -1]), group_size=32, bits=4))
    assert np.abs(out[0] - wd[2]).max() <= 1e-6 * np.abs(wd[2]).max()
    assert not out[1:].any()


def test_dequantize_rows_refuses_bad_arguments():
    q, s, b, _ = _packed(8, 128, 4, 32, mx.float32, seed=27)
    with pytest.raises(ValueError, match="ids must be an integer array"):
        kernels.dequantize_rows(q, s, b, mx.array([1.0]), group_size=32, bits=4)
    with pytest.raises(ValueError, match="group_size must be"):
        kernels.dequantize_rows(q, s, b, mx.array([1]), group_size=16, bits=4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_log_softmax_matches_float64_and_its_gradient(dtype):
    rng = np.random.default_rng(28)
    x = rng.standard_normal((3, 5, 1001)).astype(np.float32) * 8
    x[0, 0, :500] = -np.inf  # masked logits (a constraint): they stay -inf, the rest renormalise
    xm = mx.array(x).astype(dtype)
    xr = np.array(xm.astype(mx.float32), dtype=np.float64)
    y = kernels.log_softmax(xm)
    assert y.dtype == mx.float32 and y.shape == x.shape
    m = xr.max(-1, keepdims=True)
    ref = xr - (m + np.log(np.exp(xr - m).sum(-1, keepdims=True)))
    yn = np.array(y, dtype=np.float64)
    assert np.isneginf(yn[0, 0, :500]).all()
    finite = np.isfinite(ref)
    assert np.abs(yn[finite] - ref[finite]).max() < 2e-5
    # gradient against autograd of MLX's formula
    xf = mx.array(rng.standard_normal((4, 300)).astype(np.float32))
    t = mx.random.normal((4, 300), key=mx.random.key(29))
    ours = mx.grad(lambda x: (kernels.log_softmax(x) * t).sum())(xf)
    ref_g = mx.grad(lambda x: ((x - mx.logsumexp(x, axis=-1, keepdims=True)) * t).sum())(xf)
    assert mx.allclose(ours, ref_g, rtol=1e-5, atol=1e-5).item()


def test_attention_rows_is_each_row_alone_over_its_own_cache():
    """Decode attention of a batch whose rows have caches of different lengths (views into larger buffers,
    as a KV cache hands them back; one longer than a 512-key reduction block): each row bit for bit as the
    matmul-softmax-matmul of that row alone, and close to MLX's attention."""
    H, Hkv, D = 8, 2, 64
    lengths = [1, 37, 700]
    q = mx.random.normal((len(lengths), H, 1, D), key=mx.random.key(20))
    keys, values = [], []
    for i, S in enumerate(lengths):
        kb = mx.random.normal((1, Hkv, 1024, D), key=mx.random.key(21 + i))
        vb = mx.random.normal((1, Hkv, 1024, D), key=mx.random.key(31 + i))
        keys.append(kb[:, :, :S, :])
        values.append(vb[:, :, :S, :])
    out = kernels.attention_rows(q, keys, values, 0.125)
    assert out.shape == q.shape
    for b, (k, v) in enumerate(zip(keys, values)):
        qg = q[b : b + 1].reshape(1, Hkv, H // Hkv, D)
        probs = kernels._ext.softmax(kernels._ext.matmul(qg, k.swapaxes(-1, -2)), 0.125, 0)
        alone = kernels._ext.matmul(probs, v).reshape(1, H, 1, D)
        assert mx.array_equal(out[b : b + 1], alone).item(), b
        ref = mx.fast.scaled_dot_product_attention(q[b : b + 1], k, v, scale=0.125)
        assert mx.allclose(out[b : b + 1], ref, rtol=1e-5, atol=1e-5).item()
    with pytest.raises(ValueError, match="one keys and one values"):
        kernels._ext.attention_rows(q, keys[:2], values, 0.125)
    with pytest.raises(ValueError, match="float32"):
        kernels._ext.attention_rows(q, [k.astype(mx.bfloat16) for k in keys], values, 0.125)


def _stacked(E, n, k, bits, gs, sb_dtype, seed):
    parts = [_packed(n, k, bits, gs, sb_dtype, seed + e) for e in range(E)]
    return tuple(mx.stack([p[i] for p in parts]) for i in range(3)) + (np.stack([p[3] for p in parts]),)


@pytest.mark.parametrize(
    "bits,gs,sb_dtype", [(4, 64, mx.bfloat16), (8, 32, mx.float32), (3, 128, mx.float16)]
)
@pytest.mark.parametrize("tokens,k", [(1, 8), (5, 2), (300, 2)])
def test_gathered_experts_match_float64_reference(bits, gs, sb_dtype, tokens, k):
    """Stacked experts, each (token, choice) pair through its own expert: decode-sized groups (GEMV, one
    pass of the pool) and prefill-sized ones (GEMM, 300 tokens over 6 experts), float32 and bfloat16 x,
    an expert chosen twice by one token, an expert number outside the stack giving zeros."""
    E, n, K = 6, 197, 256
    q, s, b, wd = _stacked(E, n, K, bits, gs, sb_dtype, seed=bits)
    idx = np.random.default_rng(tokens).integers(0, E, size=(tokens, k)).astype(np.int32)
    idx[0, : min(k, 2)] = 3
    if tokens > 1:
        idx[1, 0] = E + 4  # outside: zeros
    for xdt, tol in ((mx.float32, 1e-4), (mx.bfloat16, 8e-3)):
        x, xr = _x((tokens, K), xdt, seed=tokens)
        y = kernels.gather_quantized_matmul(x, q, s, b, mx.array(idx), group_size=gs, bits=bits)
        assert y.shape == (tokens, k, n) and y.dtype == xdt
        ref = np.zeros((tokens, k, n))
        for t in range(tokens):
            for j in range(k):
                if idx[t, j] < E:
                    ref[t, j] = xr[t] @ wd[idx[t, j]].T
        assert _rel_err(y, ref) < tol, f"x={xdt}"
        if tokens > 1:
            assert not np.array(y[1, 0].astype(mx.float32)).any()


def test_gathered_experts_rows_are_the_plain_product_and_their_gradient_is_autograds():
    E, n, K = 4, 64, 128
    q, s, b, wd = _stacked(E, n, K, 4, 32, mx.float32, seed=7)
    x, _ = _x((3, K), mx.float32, seed=3)
    idx = mx.array([[2, 0], [1, 1], [3, 2]], dtype=mx.int32)
    y = kernels.gather_quantized_matmul(x, q, s, b, idx, group_size=32, bits=4)
    for t in range(3):
        for j in range(2):
            e = idx[t, j].item()
            alone = kernels.quantized_matmul(x[t : t + 1], q[e], s[e], b[e], group_size=32, bits=4)
            assert mx.array_equal(y[t, j][None], alone).item()  # the same kernels, bit for bit
    cot = mx.array(np.random.default_rng(0).standard_normal((3, 2, n)).astype(np.float32))

    def loss(x):
        return (kernels.gather_quantized_matmul(x, q, s, b, idx, group_size=32, bits=4) * cot).sum()

    w = mx.array(wd.astype(np.float32))

    def dense(x):
        return (mx.einsum("ti,tjoi->tjo", x, w[idx]) * cot).sum()

    np.testing.assert_allclose(np.array(mx.grad(loss)(x)), np.array(mx.grad(dense)(x)), atol=1e-4, rtol=1e-4)


def test_gathered_experts_refuse_bad_arguments():
    q, s, b, _ = _stacked(2, 64, 128, 4, 64, mx.float32, seed=1)
    x = mx.zeros((3, 128))
    idx = mx.zeros((3, 2), dtype=mx.int32)
    with pytest.raises(ValueError, match="3-D uint32"):
        kernels.gather_quantized_matmul(x, q[0], s[0], b[0], idx)
    with pytest.raises(ValueError, match="2-D with x's 3 rows"):
        kernels.gather_quantized_matmul(x, q, s, b, mx.zeros((2, 2), dtype=mx.int32))
    with pytest.raises(ValueError, match="integer array"):
        kernels.gather_quantized_matmul(x, q, s, b, mx.zeros((3, 2)))
    with pytest.raises(ValueError, match="last dimension is 64"):
        kernels.gather_quantized_matmul(mx.zeros((3, 64)), q, s, b, idx)
