"""Qwen2-MoE (model_type qwen2_moe) on tiny random configs: the config's rules, the forward pass against
an independent NumPy reference (every token through its experts one at a time), the quantized experts
on both product paths, both checkpoint layouts, streaming conversion, and generation with caches."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from reference_numpy import forward as np_forward
from tiny import hf_expert_names, random_model, tiny_moe_config, write_folder

import convert.layout
import convert.pipeline
import qmlx
import qmlx.kernels
import qmlx.quant.layers
from convert import ConvertError
from convert import convert as run_convert
from qmlx.config import ConfigError, ModelConfig
from qmlx.errors import UserError
from qmlx.loader import load_model
from qmlx.model import MLP, SparseMoE
from qmlx.quant import QuantizedSwitchLinear
from qmlx.quant.apply import quantize_model
from qmlx.quant.groups import dequantize, quantize

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "configs")
IDS = [5, 17, 250, 3, 99, 42, 7, 180, 64, 11, 200, 1, 5, 5, 17]


def np_weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# ------------------------------------------------------------------ config


def test_missing_moe_fields_take_transformers_defaults():
    cfg = tiny_moe_config()
    for k in (
        "num_experts",
        "moe_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
        "decoder_sparse_step",
    ):
        del cfg[k]
    c = ModelConfig.from_dict(cfg)
    assert (c.num_experts, c.moe_intermediate_size, c.norm_topk_prob, c.mlp_only_layers) == (
        60,
        1408,
        False,
        [],
    )
    assert c.decoder_sparse_step == 1 and c.qkv_bias is True and c.is_moe
    dense = ModelConfig.from_dict(
        {k: v for k, v in cfg.items() if k != "model_type"} | {"model_type": "qwen2"}
    )
    assert dense.num_experts is None and not dense.is_moe and not dense.sparse_layer(0)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("num_experts_per_tok", 9, "must not exceed num_experts"),
        ("num_experts_per_tok", 0, "positive integer"),
        ("moe_intermediate_size", "64", "positive integer"),
        ("decoder_sparse_step", 0, "positive integer"),
        ("norm_topk_prob", "yes", "true or false"),
        ("mlp_only_layers", [7], "outside 0..3"),
        ("mlp_only_layers", 2, "list of layer numbers"),
        ("shared_expert_intermediate_size", 0, "positive integer"),
        ("num_experts", -1, "non-negative"),
    ],
)
def test_bad_moe_fields_are_refused_by_name(field, value, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(tiny_moe_config(**{field: value}), source="m/config.json")
    assert f"m/config.json: field '{field}'" in str(e.value) and words in str(e.value)


def test_sparse_layers_follow_step_and_mlp_only_layers():
    c = ModelConfig.from_dict(
        tiny_moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    )
    assert [c.sparse_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    model = random_model(tiny_moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [isinstance(b.mlp, SparseMoE) for b in model.layers] == [c.sparse_layer(i) for i in range(6)]
    assert all(isinstance(b.mlp, MLP) for i, b in enumerate(model.layers) if not c.sparse_layer(i))
    c0 = ModelConfig.from_dict(tiny_moe_config(num_experts=0, num_experts_per_tok=1))
    assert not any(c0.sparse_layer(i) for i in range(4))


def test_57b_parameter_counts():
    """Qwen2-57B-A14B's published shape: 57.4B parameters, 14.2B of them active per token (8 of 64 experts)."""
    c = ModelConfig.from_dict(
        dict(
            model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
            moe_intermediate_size=2560, shared_expert_intermediate_size=20480, vocab_size=151936,
            tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
        )
    )  # fmt: skip
    total, active = c.parameter_counts()
    assert round(total / 1e9, 1) == 57.4 and round(active / 1e9, 1) == 14.2
    a27 = ModelConfig.from_dict(
        dict(
            model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
            num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
            moe_intermediate_size=1408, shared_expert_intermediate_size=5632, vocab_size=151936,
            tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192,
        )
    )  # fmt: skip
    assert a27.summary() == (
        "qwen2_moe, 24 layers, 14.3B parameters (2.7B active per token: 4 of 60 experts and a shared expert)"
    )  # Qwen1.5-MoE-A2.7B's published 14.3B / 2.7B
    with open(os.path.join(CONFIGS, "qwen2.5-7b-instruct.json")) as f:
        dense = ModelConfig.from_dict(json.load(f))
    assert dense.parameter_counts()[0] == dense.parameter_counts()[1]
    assert round(dense.parameter_counts()[0] / 1e9, 2) == 7.62


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": True},
        {"decoder_sparse_step": 2, "mlp_only_layers": [3]},
        {"tie_word_embeddings": True, "qkv_bias": False},
        {"num_experts_per_tok": 1},
    ],
    ids=["defaults", "norm-topk", "step2-mlp-only", "tied-no-qkv-bias", "top1"],
)
def test_forward_matches_reference(overrides):
    cfg = tiny_moe_config(**overrides)
    model = random_model(cfg, seed=3)
    got = np.array(model(mx.array([IDS]))[0])
    want = np_forward(cfg, np_weights(model), IDS)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_only_the_chosen_experts_matter(monkeypatch):
    """Zeroing the experts the router did not pick for a prompt leaves its logits unchanged."""
    cfg = tiny_moe_config(num_hidden_layers=1)
    model = random_model(cfg, seed=5)
    moe, ids = model.layers[0].mlp, mx.array([IDS[:3]])  # 3 tokens choose at most 6 of the 8 experts
    chosen = set()
    gather_linear = qmlx.kernels.gather_linear

    def recording(x, weight, indices):
        chosen.update(np.array(indices).reshape(-1).tolist())
        return gather_linear(x, weight, indices)

    monkeypatch.setattr(qmlx.kernels, "gather_linear", recording)
    before = np.array(model(ids))
    unused = sorted(set(range(cfg["num_experts"])) - chosen)
    assert len(chosen) <= 6 and unused
    for proj in (moe.switch_mlp.gate_proj, moe.switch_mlp.up_proj, moe.switch_mlp.down_proj):
        w = np.array(proj.weight)
        w[unused] = 0
        proj.weight = mx.array(w)
    np.testing.assert_array_equal(np.array(model(ids)), before)
    w = np.array(moe.switch_mlp.up_proj.weight)
    w[sorted(chosen)[0]] = 0
    moe.switch_mlp.up_proj.weight = mx.array(w)
    assert not np.array_equal(np.array(model(ids)), before)


# ------------------------------------------------------------------ quantized experts


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 64)])
@pytest.mark.parametrize("rows", [1, 7])
def test_quantized_experts_on_both_paths_equal_the_dequantized_product(bits, group_size, rows, monkeypatch):
    E, out_dims, in_dims, k = 6, 48, 128, 3
    rng = np.random.RandomState(bits + rows)
    w = mx.array(rng.randn(E, out_dims, in_dims).astype(np.float32))
    x = mx.array(rng.randn(rows, in_dims).astype(np.float32))
    idx = rng.randint(0, E, size=(rows, k))
    idx[0, :2] = 4  # the same expert twice in a row, and experts shared between rows
    indices = mx.array(idx.astype(np.int32))
    layer = QuantizedSwitchLinear(in_dims, out_dims, E, group_size, bits)
    layer.weight, layer.scales, layer.biases = quantize(w, bits, group_size)
    wq = np.array(dequantize(layer.weight, layer.scales, layer.biases, bits, group_size))
    want = np.einsum("ti,tjoi->tjo", np.array(x), wq[idx])
    fast = np.array(layer(x, indices))
    monkeypatch.setattr(qmlx.quant.layers, "use_kernels", lambda: False)
    gathered = np.array(layer(x, indices))
    assert fast.shape == gathered.shape == (rows, k, out_dims)
    scale = np.abs(want).max()
    np.testing.assert_allclose(gathered, want, atol=1e-4 * scale)
    np.testing.assert_allclose(fast, want, atol=2e-3 * scale)  # the kernels round x to 15 bits per group


def test_quantize_model_quantizes_stacked_experts_but_not_the_router_at_its_own_bits():
    model = random_model(tiny_moe_config(), seed=1)
    quantize_model(
        model, {"group_size": 32, "bits": 4, "model.layers.0.mlp.gate": {"group_size": 32, "bits": 8}}
    )
    moe = model.layers[0].mlp
    assert isinstance(moe.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert moe.switch_mlp.gate_proj.bits == 4 and moe.gate.bits == 8
    assert moe.switch_mlp.down_proj.weight.shape == (8, 64, 64 * 4 // 32)


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("moe") / "hf")
    write_folder(folder, tiny_moe_config(decoder_sparse_step=2, mlp_only_layers=[3]), seed=2, shards=3)
    return folder


def test_hf_per_expert_layout_is_what_write_folder_wrote(moe_folder):
    names = set()
    for f in os.listdir(moe_folder):
        if f.endswith(".safetensors"):
            names |= set(mx.load(os.path.join(moe_folder, f)))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert not any(".switch_mlp." in n for n in names)


def test_both_layouts_load_to_the_same_logits(moe_folder, tmp_path):
    model = load_model(moe_folder, dtype="float32")
    stacked = str(tmp_path / "stacked")
    os.makedirs(stacked)
    weights = dict(tree_flatten(model.parameters()))
    assert "model.layers.1.mlp.switch_mlp.up_proj.weight" in weights
    mx.save_safetensors(os.path.join(stacked, "model.safetensors"), weights)
    with open(os.path.join(moe_folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(stacked, "config.json"), "w") as f:
        json.dump(config, f)
    ids = mx.array([IDS])
    np.testing.assert_array_equal(np.array(load_model(stacked, dtype="float32")(ids)), np.array(model(ids)))
    want = np_forward(config, np_weights(model), IDS)
    np.testing.assert_allclose(np.array(model(ids)[0]), want, atol=2e-3, rtol=1e-3)


def test_a_missing_expert_is_named(tmp_path):
    cfg = tiny_moe_config()
    model = random_model(cfg)
    weights = hf_expert_names(dict(tree_flatten(model.parameters())))
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(UserError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        model.sanitize(weights)
    weights = hf_expert_names(dict(tree_flatten(model.parameters())))
    weights["model.layers.2.mlp.experts.8.up_proj.weight"] = weights[
        "model.layers.2.mlp.experts.0.up_proj.weight"
    ]
    with pytest.raises(UserError, match=r"experts\.8\.up_proj.*8 experts"):
        model.sanitize(weights)


def test_convert_stacks_experts_with_the_same_logits(moe_folder, tmp_path):
    dst = str(tmp_path / "f32")
    run_convert(moe_folder, dst, dequantize=True, dtype="float32", progress=False)
    names = set(mx.load(os.path.join(dst, "model.safetensors")))
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in names
    assert not any(".experts." in n for n in names)
    ids = mx.array([IDS])
    np.testing.assert_array_equal(
        np.array(load_model(dst, dtype="float32")(ids)),
        np.array(load_model(moe_folder, dtype="float32")(ids)),
    )


def test_quantized_convert_equals_quantizing_in_memory(moe_folder, tmp_path, monkeypatch):
    """An expert block at a time (a block budget of one expert): the same bytes as quantizing the whole
    stacked tensor in memory."""
    monkeypatch.setattr(convert.pipeline, "BLOCK_BYTES", 64 * 64 * 4)
    reads = []
    original = convert.layout._stacked

    def counting(name, experts):
        t = original(name, experts)
        read = t.read

        def spy(start, end):
            reads.append(end - start)
            return read(start, end)

        return type(t)(t.name, t.shape, t.nbytes, spy, t.where)

    monkeypatch.setattr(convert.layout, "_stacked", counting)
    dst = str(tmp_path / "q4")
    run_convert(moe_folder, dst, bits=4, group_size=32, progress=False)
    assert reads and max(reads) == 1
    got = {}
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            got.update(mx.load(os.path.join(dst, f)))
    model = load_model(moe_folder, dtype="float32")
    quantize_model(model, {"group_size": 32, "bits": 4})
    want = dict(tree_flatten(model.parameters()))
    for name in ("weight", "scales", "biases"):
        key = f"model.layers.1.mlp.switch_mlp.down_proj.{name}"
        assert got[key].shape == want[key].shape
        np.testing.assert_array_equal(
            np.array(got[key].astype(mx.float32)), np.array(want[key].astype(mx.float32))
        )
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["quantization"]["bits"] == 4
    quantized = load_model(dst, dtype="float32")
    assert isinstance(quantized.layers[1].mlp.switch_mlp.up_proj, QuantizedSwitchLinear)


def test_convert_names_a_missing_expert_and_the_calibrated_refusal(moe_folder, tmp_path):
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    tensors = {}
    for f in os.listdir(moe_folder):
        if f.endswith(".safetensors"):
            tensors.update(mx.load(os.path.join(moe_folder, f)))
        elif f != "model.safetensors.index.json":
            with open(os.path.join(moe_folder, f), "rb") as src, open(os.path.join(broken, f), "wb") as out:
                out.write(src.read())
    del tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    mx.save_safetensors(os.path.join(broken, "model.safetensors"), tensors)
    with pytest.raises(ConvertError, match=r"model\.safetensors.*experts\.3\.gate_proj\.weight.*missing"):
        run_convert(broken, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(str(tmp_path / "out"))
    with pytest.raises(ConvertError, match="qwen2_moe"):
        run_convert(moe_folder, str(tmp_path / "gptq"), method="gptq", progress=False)


# ------------------------------------------------------------------ generation


def test_cached_decoding_equals_full_forward(moe_folder):
    model, tok = qmlx.load(moe_folder, dtype="float32")
    events = list(qmlx.stream_generate(model, tok, IDS, 10, temperature=0.0))
    got = [e.token for e in events if e.token is not None]
    ids = list(IDS)
    for _ in range(10):
        ids.append(int(np.argmax(np.array(model(mx.array([ids]))[0, -1]))))
    assert got == ids[len(IDS) :]


def test_batched_rows_equal_each_prompt_alone(moe_folder):
    from qmlx.batch import batch_generate

    model, tok = qmlx.load(moe_folder, dtype="float32")
    prompts = ["a", "hello world, how are", "x y z w"]
    results = batch_generate(model, tok, prompts, 8, temperature=0.0)
    for prompt, r in zip(prompts, results):
        alone = [
            e.token
            for e in qmlx.stream_generate(model, tok, prompt, 8, temperature=0.0)
            if e.token is not None
        ]
        assert r.tokens == alone, prompt


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_adapts_attention_and_the_shared_expert_and_gradients_reach_them(moe_folder, quantized):
    import mlx.nn as nn

    from qmlx.lora.apply import apply_lora
    from qmlx.lora.layers import LoRALinear
    from qmlx.lora.score import loss_fn

    model, _ = qmlx.load(moe_folder, dtype="float32")
    if quantized:
        quantize_model(model, {"bits": 4, "group_size": 32})
    apply_lora(model, rank=4, alpha=8.0, targets=["q", "v", "gate", "down"])
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert "model.layers.1.mlp.shared_expert.gate_proj.lora_A" in names  # sparse block
    assert "model.layers.0.mlp.gate_proj.lora_A" in names  # dense block (step 2)
    assert not any(".switch_mlp." in k or ".mlp.gate.lora" in k for k in names)
    assert len(names) == 2 * 4 * 4  # A and B x 4 targets x 4 blocks
    mx.random.seed(0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_B = 0.05 * mx.random.normal(m.lora_B.shape)
    tokens = mx.array([IDS])
    (loss, _), grads = nn.value_and_grad(model, loss_fn)(model, tokens, mx.ones(tokens.shape, mx.bool_))
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(names) and np.isfinite(loss.item())
    assert all(mx.abs(g).max().item() > 0 for g in flat.values())


@pytest.mark.parametrize("bits", [None, 4])
def test_estimate_counts_match_a_built_moe_model(moe_folder, bits):
    from qmlx.lora.apply import apply_lora
    from qmlx.lora.estimate import estimate

    with open(os.path.join(moe_folder, "config.json")) as f:
        cfg = json.load(f)
    model, _ = qmlx.load(moe_folder, dtype="float32")
    if bits:
        quantize_model(model, {"bits": bits, "group_size": 32})
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    apply_lora(model, rank=4, alpha=8.0, targets=["q", "k", "up", "down"])
    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    e = estimate(
        cfg, bits, 32, rank=4, targets=["q", "k", "up", "down"], dtype_bytes=4, scale_bytes=4
    )  # quantized in memory: float32 scales
    assert e.adapter_params == n
    assert e.weights == weights
    assert e.total_checkpointed <= e.total


def test_adapter_round_trip_and_peft_export_name_only_the_adapted_modules(moe_folder, tmp_path):
    import re

    from qmlx.lora.adapters import load_adapter, save_adapter
    from qmlx.lora.apply import apply_lora
    from qmlx.lora.peft import export_peft

    model, _ = qmlx.load(moe_folder, dtype="float32")
    apply_lora(model, rank=2, alpha=4.0, targets=["q", "up"])
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            m.lora_B = mx.ones(m.lora_B.shape) * 0.01
    want = np.array(model(mx.array([IDS])))
    folder = str(tmp_path / "adapter")
    save_adapter(model, folder, {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q", "up"]})
    again, _ = qmlx.load(moe_folder, dtype="float32")
    load_adapter(again, folder)
    np.testing.assert_array_equal(np.array(again(mx.array([IDS]))), want)
    with open(os.path.join(export_peft(folder, str(tmp_path / "peft")), "adapter_config.json")) as f:
        pattern = json.load(f)["target_modules"]
    hf_modules = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "k_proj")]
    hf_modules += ["model.layers.1.mlp.shared_expert.up_proj", "model.layers.1.mlp.experts.3.up_proj"]
    hf_modules += ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate", "model.layers.3.mlp.up_proj"]
    matched = [m for m in hf_modules if re.fullmatch(pattern, m)]
    assert matched == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)] + [
        "model.layers.1.mlp.shared_expert.up_proj", "model.layers.0.mlp.up_proj", "model.layers.3.mlp.up_proj"
    ]  # fmt: skip


def test_dense_8_recipe_keeps_everything_but_the_routed_experts_at_8_bits(moe_folder, tmp_path):
    dst = str(tmp_path / "d8")
    run_convert(moe_folder, dst, bits=4, group_size=32, recipe="dense-8", progress=False)
    with open(os.path.join(dst, "config.json")) as f:
        quant = json.load(f)["quantization"]
    model = load_model(dst, dtype="float32")
    bits = {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits")}
    assert bits["model.layers.1.mlp.switch_mlp.up_proj"] == 4 and quant["bits"] == 4
    assert all(b == 8 for p, b in bits.items() if ".switch_mlp." not in p)
    assert {"model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert.down_proj", "lm_head"} <= set(bits)
    ids = mx.array([IDS])
    full = np.array(load_model(moe_folder, dtype="float32")(ids))
    uniform = str(tmp_path / "u4")
    run_convert(moe_folder, uniform, bits=4, group_size=32, progress=False)
    err_dense8 = np.abs(np.array(model(ids)) - full).mean()
    err_uniform = np.abs(np.array(load_model(uniform, dtype="float32")(ids)) - full).mean()
    assert err_dense8 < err_uniform


def test_dense_8_is_refused_for_a_dense_model(tmp_path):
    from tiny import tiny_config

    write_folder(str(tmp_path / "dense"), tiny_config())
    with pytest.raises(ConvertError, match="dense-8.*dense qwen2 model"):
        run_convert(str(tmp_path / "dense"), str(tmp_path / "out"), recipe="dense-8", progress=False)


# ------------------------------------------------------------------ caches and serving


@pytest.fixture(scope="module")
def moe_q4(tmp_path_factory) -> str:
    """A 4-bit MoE with head_dim 32 (room for a quantized KV cache)."""
    root = tmp_path_factory.mktemp("moeq4")
    write_folder(str(root / "src"), tiny_moe_config(hidden_size=128, decoder_sparse_step=2), seed=6)
    dst = str(root / "q4")
    run_convert(str(root / "src"), dst, bits=4, group_size=32, progress=False)
    return dst


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 8, "kv_group_size": 32}, {"max_kv_size": 24}])
def test_saved_prompt_cache_continues_identically(moe_q4, tmp_path, kv):
    from qmlx.prompt_cache import PromptCache, fill_prompt_cache, load_prompt_cache, save_prompt_cache

    model, tok = qmlx.load(moe_q4)
    doc = tok.encode("a document that questions share")
    question = doc + tok.encode(" -- and the question?")
    path = str(tmp_path / "doc.safetensors")
    save_prompt_cache(path, fill_prompt_cache(model, doc, prefill_step=8, **kv), model)
    pc, _ = load_prompt_cache(path, model, kv)
    warm = [e.token for e in qmlx.stream_generate(model, tok, question, 12, temperature=0.0, prompt_cache=pc)]
    assert pc.reused == len(doc)
    cold = qmlx.stream_generate(model, tok, question, 12, temperature=0.0, prompt_cache=PromptCache(**kv))
    assert warm == [e.token for e in cold]


def test_served_chat_equals_local_generation(moe_q4):
    from fastapi.testclient import TestClient

    from qmlx.server import Engine, create_app

    model, tok = qmlx.load(moe_q4)
    engine = Engine(model, tok, "moe", max_concurrency=2)
    engine.start()
    try:
        client = TestClient(create_app(engine))
        messages = [{"role": "user", "content": "hi"}]
        r = client.post(
            "/v1/chat/completions", json={"messages": messages, "temperature": 0.0, "max_tokens": 10}
        )
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["message"]["content"]
    finally:
        engine.stop()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    want = "".join(e.text for e in qmlx.stream_generate(model, tok, prompt, 10, temperature=0.0))
    assert got == want
