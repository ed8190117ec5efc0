"""Qwen2-MoE against independent implementations on tiny random checkpoints: transformers'
Qwen2MoeForCausalLM (logits, greedy text, and its own save → `qmlx convert` → load) and mlx-lm
(quantized checkpoints both ways).

transformers and torch come from the fixture's own venv (the project's venv stays light).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from test_convert import QUANTIZED_ATOL
from tiny import tiny_moe_config, write_folder

import qmlx
from convert import convert as run_convert
from qmlx.loader import load_model
from qmlx.quant import QuantizedSwitchLinear

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import numpy as np, torch
from transformers import Qwen2MoeForCausalLM
ids = json.loads(sys.argv[2])
for folder in sys.argv[1].split(","):
    m = Qwen2MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        np.save(folder + "/hf_logits.npy", m(torch.tensor([ids])).logits[0].numpy())
        out = m.generate(torch.tensor([ids[:6]]), max_new_tokens=12, do_sample=False)
    with open(folder + "/hf_greedy.json", "w") as f:
        json.dump(out[0, 6:].tolist(), f)
    m.save_pretrained(folder + "-saved")
"""

CONFIGS = {
    "defaults-untied": tiny_moe_config(),
    "norm-topk-tied": tiny_moe_config(norm_topk_prob=True, tie_word_embeddings=True),
    "step2-mlp-only": tiny_moe_config(decoder_sparse_step=2, mlp_only_layers=[3], num_experts_per_tok=3),
    "no-qkv-bias-mlp-only-0": tiny_moe_config(qkv_bias=False, mlp_only_layers=[0], norm_topk_prob=True),
}


def _greedy(model, tok, ids: list[int]) -> list[int]:
    events = qmlx.stream_generate(model, tok, ids, 12, temperature=0.0)
    return [e.token for e in events if e.token is not None]


def test_logits_greedy_text_and_converted_save_match_transformers(tmp_path, fixture_venv_python):
    ids = [int(i) for i in np.random.RandomState(1).randint(0, 256, size=40)]
    folders = {}
    for n, (name, cfg) in enumerate(CONFIGS.items()):
        folders[name] = str(tmp_path / name)
        write_folder(folders[name], cfg, seed=10 + n)
    p = subprocess.run(
        [fixture_venv_python, "-c", SCRIPT, ",".join(folders.values()), json.dumps(ids)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    for name, folder in folders.items():
        want = np.load(folder + "/hf_logits.npy")
        with open(folder + "/hf_greedy.json") as f:
            greedy = json.load(f)
        saved = os.listdir(folder + "-saved")
        assert any(f.endswith(".safetensors") for f in saved), name
        for f in os.listdir(folder):  # the model's save has no tokenizer: take the folder's
            if f.startswith("tokenizer"):
                shutil.copy(os.path.join(folder, f), folder + "-saved")
        converted = str(tmp_path / f"{name}-converted")
        run_convert(folder + "-saved", converted, dequantize=True, dtype="float32", progress=False)
        for where in (folder, converted):
            model, tok = qmlx.load(where, dtype="float32")
            got = np.array(model(mx.array([ids]))[0])
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{name}: {where}")
            got_greedy = _greedy(model, tok, ids[:6])
            assert got_greedy == greedy[: len(got_greedy)] and len(got_greedy) >= 1, (name, where)
            assert tok.decode(got_greedy) == tok.decode(greedy[: len(got_greedy)])


# mlx-lm's port ignores norm_topk_prob, decoder_sparse_step, mlp_only_layers and tied heads: a config on
# which it is right (all layers sparse, no renormalisation, untied).
MLX_LM_CONFIG = tiny_moe_config(shared_expert_intermediate_size=64)


def _mlx_lm_logits(folder: str, ids) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(folder)
    model.set_dtype(mx.float32)
    return np.array(model(ids)[0].astype(mx.float32))


@pytest.fixture(scope="module")
def mlx_lm_src(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("moe-mlx-lm") / "hf")
    write_folder(folder, MLX_LM_CONFIG, seed=4, dtype=mx.bfloat16)
    return folder


IDS = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 200]])


def test_mlx_lm_loads_our_quantized_moe(mlx_lm_src, tmp_path):
    dst = str(tmp_path / "ours")
    run_convert(mlx_lm_src, dst, bits=4, group_size=32, progress=False)
    ours = np.array(load_model(dst, dtype="float32")(IDS)[0])
    np.testing.assert_allclose(_mlx_lm_logits(dst, IDS), ours, atol=QUANTIZED_ATOL)


def test_mlx_lm_quantized_moe_loads_in_qmlx(mlx_lm_src, tmp_path):
    from mlx_lm import convert as mlx_lm_convert

    dst = str(tmp_path / "theirs")
    mlx_lm_convert(mlx_lm_src, dst, quantize=True, q_bits=4, q_group_size=32)
    model = load_model(dst, dtype="float32")
    assert isinstance(model.layers[0].mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    np.testing.assert_allclose(np.array(model(IDS)[0]), _mlx_lm_logits(dst, IDS), atol=QUANTIZED_ATOL)
