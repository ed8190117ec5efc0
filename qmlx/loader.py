"""Files -> (model, tokenizer): resolve a folder or hub id, check the weights, build the model.

Weights are read lazily (see qmlx/safetensors.py) and cast to the compute dtype one layer at
a time, so peak memory while loading stays near the size of the loaded model.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig
from .device import parse_dtype, tree_nbytes, wire_memory
from .errors import UserError
from .folder import read_json, resolve
from .model import Model
from .safetensors import WeightsError, folder_index, load_folder
from .tokenizer import Tokenizer


def load_config(folder: str) -> ModelConfig:
    return ModelConfig.from_file(os.path.join(folder, "config.json"))


def generation_config(folder: str) -> dict:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    d = read_json(path, ConfigError)
    return d if isinstance(d, dict) else {}


def _check_weights(model: nn.Module, weights: dict, infos: dict, folder: str) -> None:
    """Every parameter present with the right shape; nothing unexpected."""
    expected = dict(tree_flatten(model.parameters()))
    where = lambda name: infos[name].file if name in infos else folder  # noqa: E731
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{folder}: tensor {missing[0]!r} is missing from the weights{more}")
    for name, w in weights.items():
        if name not in expected:
            raise WeightsError(f"{where(name)}: unexpected tensor {name!r} (not part of this model)")
        if tuple(w.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{where(name)}: tensor {name!r} has shape {list(w.shape)}, "
                f"the config implies {list(expected[name].shape)}"
            )
        want_int = not mx.issubdtype(expected[name].dtype, mx.floating)
        is_int = not mx.issubdtype(w.dtype, mx.floating)
        if want_int != is_int:
            raise WeightsError(
                f"{where(name)}: tensor {name!r} has dtype {w.dtype}, expected {expected[name].dtype}"
            )


_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _stage_names(names, layers: range, ends: bool) -> dict[str, str]:
    """{name in a stage model: checkpoint name} for the tensors a pipeline stage holds.

    A stage holds the blocks in `layers`, renumbered from 0, plus (with `ends`) everything
    outside the blocks: the embedding, the final norm and the head.
    """
    out = {}
    for name in names:
        m = _BLOCK.match(name)
        if m is None:
            if ends:
                out[name] = name
        elif int(m[1]) in layers:
            out[f"model.layers.{int(m[1]) - layers.start}.{m[2]}"] = name
    return out


def _keep_stage(model: Model, layers: range, ends: bool) -> None:
    """Drop the modules a pipeline stage does not hold, before any weight is materialised."""
    model.model.layers = model.model.layers[layers.start : layers.stop]
    if not ends:
        for owner, name in ((model.model, "embed_tokens"), (model.model, "norm"), (model, "lm_head")):
            owner.pop(name, None)


def load_model(
    folder: str, dtype=None, lazy: bool = False, layers: range | None = None, ends: bool = True
) -> Model:
    """Build the model of a folder and load its weights (cast to `dtype`, default per device).

    With `layers`, build one pipeline stage instead (see qmlx/distributed.py): only the blocks
    in `layers` (numbered from 0 in the stage) and, with `ends`, the embedding, norm and head.
    Only the shards holding those tensors are opened, and only those tensors are read.
    """
    config = load_config(folder)
    dtype = parse_dtype(dtype)
    model = Model(config)
    infos = folder_index(folder)
    if layers is not None:
        if not (0 <= layers.start < layers.stop <= config.num_hidden_layers):
            raise ValueError(f"layers {layers} is not within the model's {config.num_hidden_layers}")
        _keep_stage(model, layers, ends)
        names = _stage_names(infos, layers, ends)
        raw = load_folder(folder, {old: infos[old] for old in names.values()})
        weights = model.sanitize({new: raw[old] for new, old in names.items()})
        infos = {new: infos[old] for new, old in names.items()}
    else:
        weights = model.sanitize(load_folder(folder, infos))
    if config.quantization is not None:
        from .quant import quantize_model

        quantize_model(model, config.quantization, set(weights))
    _check_weights(model, weights, infos, folder)
    # Floating tensors take the compute dtype; packed quantized weights stay integers. On the CPU kernels a
    # quantized layer's 16-bit scales and biases stay as stored: the kernels read them as they are (exactly
    # what float32 copies hold), and a decode step streams 36 instead of 40 bytes per 64 weights at 4 bits.
    keep = _stored_scales_kept(config)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not (keep and _is_scale(k, v)) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=False)
    if keep:
        from .quant.layers import QuantizedEmbedding

        for _, module in model.named_modules():
            if isinstance(module, QuantizedEmbedding) and module.scales.dtype != dtype:
                module.out_dtype = dtype  # the rows it looks up feed a `dtype` model
    if not lazy:
        # One layer at a time, so at most one layer's source-dtype copy is alive at once.
        if "embed_tokens" in model.model:
            mx.eval(model.model.embed_tokens.parameters())
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    model.eval()
    wire_memory(tree_nbytes(model.parameters()))  # no-op on the CPU backend
    return model


def load(path_or_repo: str, dtype=None, lazy: bool = False) -> tuple[Model, Tokenizer]:
    """Load a Qwen2 model and its tokenizer from a folder or a hub repo id.

    `dtype=None` picks per device: float32 on the CPU backend, bfloat16 on a GPU. (A LoRA
    adapter is put over the model by `qmlx.load`, above the loader.)
    """
    folder = resolve(path_or_repo)
    model = load_model(folder, dtype=dtype, lazy=lazy)
    return model, tokenizer_for(folder, model.config)


def load_draft_model(path: str, tokenizer, dtype=None):
    """Load a draft model for `--draft-model`, refusing one whose tokenizer differs."""
    draft, draft_tokenizer = load(path, dtype=dtype)
    probe = "def f(x):\n    return x  # 你好, ünïcode"
    if draft_tokenizer.vocab_size != tokenizer.vocab_size or draft_tokenizer.encode(
        probe
    ) != tokenizer.encode(probe):
        raise UserError(
            f"--draft-model {path}: its tokenizer differs from the model's; "
            "a draft model must share the tokenizer (e.g. a smaller Qwen2.5 of the same family)"
        )
    return draft


def tokenizer_for(folder: str, config: ModelConfig) -> Tokenizer:
    """The folder's tokenizer, stopping at the config's and generation_config.json's EOS ids."""
    gen = generation_config(folder)
    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    return Tokenizer.from_folder(folder, eos_token_ids=config.eos_ids + gen_eos, generation_defaults=gen)


def _stored_scales_kept(config) -> bool:
    """Whether quantized layers keep their checkpoint's 16-bit scales (the CPU kernels read them as stored)."""
    if config.quantization is None:
        return False
    from .quant.layers import use_kernels

    return use_kernels()


def _is_scale(name: str, v: mx.array) -> bool:
    return name.endswith((".scales", ".biases")) and v.dtype in (mx.bfloat16, mx.float16)
