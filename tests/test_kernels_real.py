"""qmlx's CPU kernels on the real checkpoint at 4 and 8 bits: the same logits (1e-3 relative) and the
same greedy text as MLX's own path (mx.quantized_matmul for decode, dequantize + BLAS for prompts)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qmlx
from convert import convert as run_convert
from qmlx.generate import generate_step
from qmlx.quant import layers as qlayers

pytestmark = pytest.mark.slow

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "파이썬으로 리스트를 뒤집는 함수를 써 주세요. 然后用中文解释一下。"},
]


@pytest.fixture(scope="module", params=[4, 8])
def quantized(request, fixture_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp(f"q{request.param}") / "model")
    run_convert(fixture_dir, dst, bits=request.param, group_size=64, progress=False)
    return qmlx.load(dst)


def _run(model, ids, n, kernels: bool, monkeypatch):
    """Logits of the prompt's last position (one prompt pass) and n greedy tokens (decode passes)."""
    monkeypatch.setattr(qlayers, "use_kernels", (lambda: True) if kernels else (lambda: False))
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    tokens = [t for t, _ in generate_step(model, mx.array(ids), max_tokens=n)]
    return np.array(logits), tokens


def test_same_logits_and_greedy_text_as_mlx_kernels(quantized, monkeypatch):
    model, tok = quantized
    assert qlayers.use_kernels(), "qmlx's kernels must be in use on this machine"
    ids = tok.encode(tok.apply_chat_template(PROMPT, add_generation_prompt=True))
    ours, our_tokens = _run(model, ids, 48, True, monkeypatch)
    ref, ref_tokens = _run(model, ids, 48, False, monkeypatch)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-3, f"logits differ by {rel:.2e} of their largest magnitude"
    assert (ours[-1].argmax(), ours[0].argmax()) == (ref[-1].argmax(), ref[0].argmax())
    assert tok.decode(our_tokens) == tok.decode(ref_tokens)
    assert len(our_tokens) == 48
