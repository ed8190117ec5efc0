"""Loading folders: happy path and every refusal, each naming the file, tensor or field."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_config, write_folder

import qmlx
from qmlx.config import ConfigError, ModelConfig
from qmlx.folder import ModelNotFound
from qmlx.safetensors import WeightsError


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "tiny"
    model = write_folder(str(path), tiny_config(tie_word_embeddings=False), shards=3)
    return str(path), model


IDS = mx.array([[1, 2, 3, 4, 5]])


def test_load_sharded_folder_gives_same_logits(folder):
    path, model = folder
    loaded, tok = qmlx.load(path, dtype="float32")
    np.testing.assert_allclose(np.array(loaded(IDS)), np.array(model(IDS)), atol=1e-5)
    assert tok.eos_token_ids == [258]


def test_dtype_default_is_float32_on_cpu(folder):
    path, _ = folder
    loaded, _ = qmlx.load(path)
    expected = mx.bfloat16 if mx.metal.is_available() else mx.float32
    assert loaded.model.embed_tokens.weight.dtype == expected


def test_bf16_weights_are_cast_to_compute_dtype(tmp_path):
    write_folder(str(tmp_path), tiny_config(), dtype=mx.bfloat16)
    loaded, _ = qmlx.load(str(tmp_path), dtype="float32")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == mx.float32


def _shard(path, i=0):
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    return sorted(set(index["weight_map"].values()))[i]


def test_missing_shard(folder):
    path, _ = folder
    name = _shard(path, 1)
    os.remove(os.path.join(path, name))
    with pytest.raises(WeightsError, match=f"{name}.*missing"):
        qmlx.load(path)


def test_truncated_shard(folder):
    path, _ = folder
    file = os.path.join(path, _shard(path))
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(WeightsError, match="truncated"):
        qmlx.load(path)


def test_garbage_shard(folder):
    path, _ = folder
    with open(os.path.join(path, _shard(path)), "wb") as f:
        f.write(b"<html>not found</html>")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        qmlx.load(path)


def test_wrong_shape_names_tensor(tmp_path):
    write_folder(str(tmp_path), tiny_config(intermediate_size=96))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(WeightsError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        qmlx.load(str(tmp_path))


def test_missing_tensor_names_it(tmp_path):
    write_folder(str(tmp_path), tiny_config(tie_word_embeddings=True))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["tie_word_embeddings"] = False  # now lm_head.weight is expected but absent
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(WeightsError, match="lm_head.weight.*missing"):
        qmlx.load(str(tmp_path))


def test_unexpected_tensor_names_it(tmp_path):
    write_folder(str(tmp_path), tiny_config(num_hidden_layers=3))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["num_hidden_layers"] = 2
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.2\."):
        qmlx.load(str(tmp_path))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model_type", "llama", "model_type.*Qwen2"),
        ("num_key_value_heads", 3, "num_key_value_heads"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_scaling", {"type": "longrope", "factor": 2.0}, "rope_scaling.*longrope"),
        ("hidden_size", -4, "hidden_size"),
        ("use_sliding_window", True, "use_sliding_window"),
    ],
)
def test_bad_config_field_is_named(tmp_path, field, value, match):
    write_folder(str(tmp_path), tiny_config())
    cfg = json.load(open(tmp_path / "config.json"))
    cfg[field] = value
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ConfigError, match=match) as e:
        qmlx.load(str(tmp_path))
    assert "config.json" in str(e.value)


def test_config_missing_required_field():
    cfg = tiny_config()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(cfg)


def test_not_json_config(tmp_path):
    write_folder(str(tmp_path), tiny_config())
    (tmp_path / "config.json").write_text("{ nope")
    with pytest.raises(ConfigError, match="config.json.*JSON"):
        qmlx.load(str(tmp_path))


def test_unknown_config_keys_are_ignored():
    cfg = tiny_config(some_future_field=123, transformers_version="9.9")
    assert ModelConfig.from_dict(cfg).hidden_size == 64


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="pickle"):
        qmlx.load(str(tmp_path))


def test_no_such_folder(tmp_path):
    with pytest.raises(ModelNotFound, match="no such folder"):
        qmlx.load(str(tmp_path / "nope"))


def test_hub_id_offline_explains(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="pass the path of a downloaded model folder"):
        qmlx.load("Qwen/Qwen2.5-0.5B-Instruct-does-not-exist")


def test_a_file_is_not_a_folder(folder):
    path, _ = folder
    with pytest.raises(ModelNotFound, match="is a file"):
        qmlx.load(os.path.join(path, "config.json"))


def test_folder_without_tokenizer(folder):
    path, _ = folder
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(qmlx.tokenizer.TokenizerError, match="tokenizer.json"):
        qmlx.load(path)


def test_generation_config_eos_ids_are_added(folder):
    path, _ = folder
    json.dump(
        {"eos_token_id": [258, 256], "temperature": 0.5},
        open(os.path.join(path, "generation_config.json"), "w"),
    )
    _, tok = qmlx.load(path)
    assert tok.eos_token_ids == [256, 258]
    assert tok.generation_defaults["temperature"] == 0.5


def test_single_file_without_index(tmp_path):
    model = write_folder(str(tmp_path), tiny_config(), shards=1)
    os.remove(tmp_path / "model.safetensors.index.json")
    shutil.move(tmp_path / "model-00001-of-00001.safetensors", tmp_path / "model.safetensors")
    loaded, _ = qmlx.load(str(tmp_path))
    np.testing.assert_allclose(np.array(loaded(IDS)), np.array(model(IDS)), atol=1e-5)


# ------------------------------------------------------------------ 16-bit scales on the CPU kernels


@pytest.fixture(scope="module")
def q4_bf16(tmp_path_factory):
    """A tiny bf16 model (tied embedding: the head is the quantized table) converted to 4-bit g32."""
    from convert import convert

    root = tmp_path_factory.mktemp("q4bf16")
    write_folder(str(root / "src"), tiny_config(torch_dtype="bfloat16"), dtype=mx.bfloat16)
    convert(str(root / "src"), str(root / "q"), bits=4, group_size=32, progress=False)
    return str(root / "q")


def _quantized(model):
    return [m for _, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")]


@pytest.mark.skipif(not qmlx.kernels.available() or not qmlx.kernels.on_cpu(), reason="needs the CPU kernels")
def test_the_cpu_kernels_keep_stored_16_bit_scales_and_compute_the_same_logits(q4_bf16):
    model, tok = qmlx.load(q4_bf16)  # float32 on the CPU
    layers = _quantized(model)
    assert layers and all(m.scales.dtype == mx.bfloat16 and m.biases.dtype == mx.bfloat16 for m in layers)
    assert model.model.norm.weight.dtype == mx.float32
    ids = mx.array([[1, 5, 9, 2, 33, 7, 100, 3, 8, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70] * 3])
    h = model.model.embed_tokens(ids)
    assert h.dtype == mx.float32
    kept = np.array(model(ids))
    for m in layers:  # the float32 copies the loader made before: the same numbers, twice the bytes
        m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
        if hasattr(m, "out_dtype"):
            m.out_dtype = None
    assert np.array_equal(np.array(model.model.embed_tokens(ids)), np.array(h))
    assert np.array_equal(np.array(model(ids)), kept)  # bit for bit, prompt (60 rows) and GEMV shapes
    few = np.array(model(ids[:, :3]))  # 3 rows: the GEMV
    for m in layers:
        m.scales, m.biases = m.scales.astype(mx.bfloat16), m.biases.astype(mx.bfloat16)
        if hasattr(m, "out_dtype"):
            m.out_dtype = mx.float32
    assert np.array_equal(np.array(model(ids[:, :3])), few)


def test_without_the_kernels_scales_take_the_compute_dtype(q4_bf16, monkeypatch):
    monkeypatch.setattr(qmlx.kernels, "available", lambda: False)
    model, _ = qmlx.load(q4_bf16)
    assert all(m.scales.dtype == mx.float32 for m in _quantized(model))
    assert model.model.embed_tokens.out_dtype is None


def test_dequantize_rows_in_float32_from_16_bit_scales_is_not_rounded(monkeypatch):
    w = mx.random.normal((64, 96), key=mx.random.key(0))
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    s16, b16 = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    ids = mx.array([3, 0, 63, 17])
    want = mx.dequantize(wq, s16.astype(mx.float32), b16.astype(mx.float32), group_size=32, bits=4)[ids]
    for ext in (qmlx.kernels._ext, None):  # the C++ op, and MLX's ops where it is not built
        monkeypatch.setattr(qmlx.kernels, "_ext", ext)
        got = qmlx.kernels.dequantize_rows(wq, s16, b16, ids, group_size=32, bits=4, dtype=mx.float32)
        assert got.dtype == mx.float32 and np.array_equal(np.array(got), np.array(want))
        plain = qmlx.kernels.dequantize_rows(wq, s16, b16, ids, group_size=32, bits=4)
        assert plain.dtype == mx.bfloat16


@pytest.mark.skipif(not qmlx.kernels.available() or not qmlx.kernels.on_cpu(), reason="needs the CPU kernels")
def test_mlx_s_own_ops_get_float_scales_when_a_kept_16_bit_model_falls_back(q4_bf16, monkeypatch):
    import qmlx.quant.layers as qlayers

    model, _ = qmlx.load(q4_bf16)
    ids = mx.array([[1, 5, 9, 2, 33, 7, 100, 3, 44, 45, 46, 47]])
    ours = np.array(model(ids))
    # MLX's quantized matmul (3 rows) and the dense path (12 rows: its dequantize would round W to bf16)
    monkeypatch.setattr(qlayers, "use_kernels", lambda: False)
    for n in (ids, ids[:, :3]):
        theirs = np.array(model(n))
        rel = np.abs(theirs - ours[:, : n.shape[1]]).max() / np.abs(ours).max()
        assert theirs.dtype == np.float32 and rel < 1e-3, rel  # the kernels round x to 15 bits per group
