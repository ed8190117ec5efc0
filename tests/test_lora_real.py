"""LoRA on the real fixture: a short QLoRA run on the 4-bit fixture, fuse, and PEFT export."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

import qmlx
from qmlx.lora.adapters import save_adapter
from qmlx.lora.apply import apply_lora, fuse_model, lora_modules
from qmlx.lora.layers import LoRALinear
from qmlx.lora.peft import export_peft
from qmlx.lora.run import prepare
from qmlx.lora.trainer import TrainConfig

pytestmark = pytest.mark.slow

MODULES = (textwrap, json, os.path, inspect, subprocess)


def _records() -> list[dict]:
    """Short real instruction pairs: a stdlib function -> its docstring's first words."""
    out = []
    for mod in MODULES:
        for name, fn in sorted(vars(mod).items()):
            doc = (inspect.getdoc(fn) or "") if inspect.isfunction(fn) and not name.startswith("_") else ""
            words = doc.split("\n\n")[0].split()[:10]
            if len(words) >= 5:
                out.append(
                    {
                        "messages": [
                            {"role": "system", "content": "Quote the docstring."},
                            {"role": "user", "content": f"{mod.__name__}.{name}"},
                            # A fixed answer shape (name, arrow, words) the base model does not
                            # predict, so a few steps show a clear drop in validation loss.
                            {"role": "assistant", "content": f"{name} -> " + " ".join(words)},
                        ]
                    }
                )
    return out


@pytest.fixture(scope="module")
def qlora_run(fixture_dir, tmp_path_factory):
    """The fixture converted to 4-bit by qmlx, and a 6-step QLoRA run on stdlib docstrings."""
    from convert import convert

    root = tmp_path_factory.mktemp("qlora")
    q4 = str(root / "q4")
    convert(fixture_dir, q4, bits=4, group_size=64)
    recs = _records()
    assert len(recs) >= 40
    data = root / "data"
    data.mkdir()
    valid, train = recs[::8][:4], [r for i, r in enumerate(recs) if i % 8]
    for split, rows in (("train", train), ("valid", valid)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(
        model=q4,
        data=str(data),
        rank=8,
        alpha=16.0,
        lr=1e-3,
        batch_size=2,
        iters=6,
        max_seq_len=48,
        warmup=1,
        val_every=6,
        save_every=6,
        report_every=4,
    )
    trainer = prepare(cfg, str(root / "adapter"), log=lambda m: None)
    events = list(trainer.run())
    return q4, str(root / "adapter"), events, valid


@pytest.fixture(scope="module")
def models(qlora_run):
    """(4-bit base, the same with the saved adapter loaded, tokenizer)."""
    q4, adapter, _, _ = qlora_run
    base, tok = qmlx.load(q4)
    tuned, _ = qmlx.load(q4, adapter=adapter)
    return base, tuned, tok


def test_short_qlora_run_lowers_validation_loss_and_changes_answers(qlora_run, models):
    _, _, events, valid = qlora_run
    vals = [e.values["val_loss"] for e in events if e.kind == "val"]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.3, vals
    base, tuned, tok = models
    prompt = tok.apply_chat_template(valid[0]["messages"][:2], add_generation_prompt=True)
    before = qmlx.generate(base, tok, prompt, max_tokens=8, temperature=0.0)
    after = qmlx.generate(tuned, tok, prompt, max_tokens=8, temperature=0.0)
    assert before != after


def test_fused_model_matches_the_adapter_within_quantization_error(qlora_run, models, real_model):
    _, _, _, valid = qlora_run
    base, tuned, tok = models
    ids = mx.array([tok.encode(tok.apply_chat_template(valid[1]["messages"], add_generation_prompt=False))])
    want = tuned(ids)
    effect = mx.abs(want - base(ids)).mean().item()
    # The yardstick: how far 4-bit quantization itself moves the fixture's logits.
    quant_error = mx.abs(base(ids) - real_model[0](ids)).mean().item()
    wrappers = lora_modules(tuned)
    errors = {}
    for bits in (8, None):  # None: the base's 4 bits
        fuse_model(tuned, bits=bits, group_size=64 if bits else None)
        assert not any(isinstance(m, LoRALinear) for _, m in tuned.named_modules())
        errors[bits] = mx.abs(tuned(ids) - want).mean().item()
        tuned.update_modules(tree_unflatten(wrappers))  # un-fuse: the wrappers are unchanged
    # Merged at 8 bits: within the base's own 4-bit quantization error.
    assert errors[8] < 0.5 * quant_error, (errors, quant_error)
    # Re-quantized at 4 bits, updates smaller than a quantization step are partly rounded
    # away; most of the adapter's effect survives.
    assert errors[None] < 0.6 * effect, (errors, effect)


PEFT_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps(logits[:, :2000].tolist()))
"""


def _peft_python(py: str) -> str:
    """The fixture venv's python once peft imports there (installing it if needed), else skip."""
    if subprocess.run([py, "-c", "import peft"], capture_output=True).returncode != 0:
        got = subprocess.run([py, "-m", "pip", "install", "-q", "peft"], capture_output=True, timeout=600)
        if got.returncode != 0:
            pytest.skip("peft is not installed in the fixture venv and could not be installed")
    return py


def test_peft_export_loads_in_peft_with_matching_logits(
    fixture_dir, fixture_venv_python, real_model, tmp_path
):
    py = _peft_python(fixture_venv_python)
    model, tok = qmlx.load(fixture_dir, dtype="float32")
    mx.random.seed(0)
    apply_lora(model, rank=4, alpha=8.0, targets=["q", "v", "o", "down"], num_layers=6)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_B = 0.02 * mx.random.normal(m.lora_B.shape)
    save_adapter(
        model,
        str(tmp_path / "ad"),
        {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "o", "down"], "num_layers": 6, "dropout": 0.0},
    )
    export_peft(
        str(tmp_path / "ad"),
        str(tmp_path / "peft"),
        base_model=fixture_dir,
        num_hidden_layers=len(model.layers),
    )
    ids = tok.encode("def fibonacci(n):\n    ")
    ours = np.array(model(mx.array([ids]))[0, :, :2000])
    base = np.array(real_model[0](mx.array([ids]))[0, :, :2000])
    assert np.abs(ours - base).max() > 0.05, "the adapter must matter for the comparison to mean anything"
    out = subprocess.run(
        [py, "-c", PEFT_CHECK, fixture_dir, str(tmp_path / "peft"), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(ours, theirs, atol=2e-3 * np.abs(theirs).max())
