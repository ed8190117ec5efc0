"""Tiny random checkpoints: qmlx logits equal transformers' Qwen2ForCausalLM on the same files.

transformers and torch come from the fixture's own venv (the project's venv stays light).
"""

import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_config, write_folder

import qmlx

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import numpy as np, torch
from transformers import Qwen2ForCausalLM
ids = json.loads(sys.argv[2])
for folder in sys.argv[1].split(","):
    m = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        np.save(folder + "/hf_logits.npy", m(torch.tensor([ids])).logits[0].numpy())
"""

CONFIGS = {
    "gqa-4-1-tied": tiny_config(num_attention_heads=4, num_key_value_heads=1),
    "gqa-8-2-untied": tiny_config(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-untied": tiny_config(num_key_value_heads=4, tie_word_embeddings=False),
    "yarn": tiny_config(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        max_position_embeddings=128,
    ),
}


def test_logits_match_transformers(tmp_path, fixture_venv_python):
    ids = [int(i) for i in np.random.RandomState(1).randint(0, 256, size=80)]
    folders = {}
    for name, cfg in CONFIGS.items():
        folders[name] = str(tmp_path / name)
        write_folder(folders[name], cfg, seed=hash(name) % 1000)
    subprocess.run(
        [fixture_venv_python, "-c", SCRIPT, ",".join(folders.values()), json.dumps([int(i) for i in ids])],
        check=True, capture_output=True,
    )  # fmt: skip
    for name, folder in folders.items():
        model, _ = qmlx.load(folder, dtype="float32")
        got = np.array(model(mx.array([ids]))[0])
        want = np.load(folder + "/hf_logits.npy")
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3, err_msg=name)
