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
