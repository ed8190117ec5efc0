"""Where weights come from: a Hugging Face folder, a hub repo id, or a quantized qmlx/MLX folder.

Every source presents the same thing to the converter: the model's config.json as a dict, and
its tensors by Hugging Face name, each readable in blocks of rows. Reading is done with plain
file reads at known offsets (not memory maps, whose touched pages would count against the
process's memory), so a block costs its own size and nothing more. GGUF files are in gguf.py.
"""

from __future__ import annotations

import json
import math
import os

import mlx.core as mx
import numpy as np

from qmlx.config import ModelConfig
from qmlx.folder import read_json, resolve
from qmlx.quant import dequantize, layer_params
from qmlx.safetensors import folder_index

from .errors import ConvertError
from .gguf import open_gguf
from .source_types import Source, SourceTensor
from .writer import copy_side_files

# What to do when a hub id cannot be downloaded (the end of resolve's message).
OFFLINE_HINT = (
    "download the model elsewhere and pass its folder, e.g. `qmlx convert ~/models/Qwen2.5-0.5B-Instruct OUT`"
)
# safetensors dtype -> (numpy dtype of the raw bytes, the MLX dtype they hold)
READABLE = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
}


def read_rows(path: str, offset: int, dtype: str, shape: tuple[int, ...], start: int, end: int):
    """Rows [start, end) of a raw little-endian tensor stored at `offset` in `path`."""
    np_dtype, mx_dtype = READABLE[dtype]
    row = math.prod(shape[1:])
    count = (end - start) * row
    with open(path, "rb") as f:
        f.seek(offset + start * row * np.dtype(np_dtype).itemsize)
        data = np.fromfile(f, dtype=np_dtype, count=count)
    if data.size != count:
        raise ConvertError(f"{path}: truncated while reading a tensor (file changed during conversion?)")
    a = mx.array(data.reshape((end - start,) + tuple(shape[1:])))
    return a.view(mx_dtype) if mx_dtype == mx.bfloat16 else a


def _data_offsets(path: str) -> dict[str, int]:
    """Absolute file offset of each tensor's data (headers were already checked by qmlx)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def open_source(src: str) -> Source:
    """Open SRC (folder, hub id or .gguf file) as a `Source`."""
    path = resolve(src, allow_file=True, error=ConvertError, offline_hint=OFFLINE_HINT)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return open_gguf(path)
        raise ConvertError(f"{path}: expected a model folder or a .gguf file")
    return open_folder(path, description=str(src))


def open_folder(folder: str, description: str | None = None) -> Source:
    """A Hugging Face (or qmlx/MLX quantized) folder: config.json + safetensors."""
    config_path = os.path.join(folder, "config.json")
    config = ModelConfig.from_file(config_path)  # refuses non-Qwen2 models, naming the field
    raw_config = read_json(config_path, ConvertError)
    infos = folder_index(folder)
    offsets: dict[str, int] = {}
    for file in sorted({i.file for i in infos.values()}):
        offsets.update(_data_offsets(file))
    for info in infos.values():
        if info.dtype not in READABLE:
            raise ConvertError(
                f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; "
                "qmlx convert reads F32, F16 and BF16 weights"
            )

    def plain(name: str) -> SourceTensor:
        i = infos[name]
        return SourceTensor(
            name,
            i.shape,
            i.nbytes,
            lambda s, e, i=i: read_rows(i.file, offsets[i.name], i.dtype, i.shape, s, e),
            i.file,
        )

    tensors: dict[str, SourceTensor] = {}
    quantized = config.quantization is not None
    packed_parts = set()
    if quantized:
        for name in infos:
            if name.endswith(".scales"):
                path = name[: -len(".scales")]
                tensors[path + ".weight"] = _dequantized(path, infos, offsets, config, config_path)
                packed_parts.update({path + ".weight", path + ".scales", path + ".biases"})
    for name, info in infos.items():
        if name not in packed_parts:
            if info.dtype == "U32":
                raise ConvertError(
                    f"{info.file}: tensor {name!r} is packed (U32) but has no "
                    f"{name.removesuffix('.weight')}.scales"
                )
            tensors[name] = plain(name)

    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and not os.path.isfile(
        os.path.join(folder, "vocab.json")
    ):
        raise ConvertError(f"{folder}: no tokenizer.json (the converted model would have no tokenizer)")
    return Source(
        description=description or folder,
        config=raw_config,
        tensors=tensors,
        quantized=quantized,
        write_side_files=lambda dst: copy_side_files(folder, dst),
    )


def _dequantized(path: str, infos, offsets, config: ModelConfig, config_path: str) -> SourceTensor:
    """The dense weight behind a packed (weight, scales, biases) triple, read in rows."""
    parts = {}
    for part in ("weight", "scales", "biases"):
        name = f"{path}.{part}"
        if name not in infos:
            raise ConvertError(f"{os.path.dirname(config_path)}: tensor {name!r} is missing")
        parts[part] = infos[name]
    params = layer_params(config.quantization, path, config_path)
    if params is None:
        raise ConvertError(f"{config_path}: layer {path!r} has scales but its quantization entry is false")
    bits, group_size = params["bits"], params["group_size"]
    packed, scales = parts["weight"], parts["scales"]
    lead, cols = tuple(scales.shape[:-1]), scales.shape[-1] * group_size  # lead: (rows,) or (experts, rows)
    if packed.dtype != "U32" or tuple(packed.shape) != (*lead, cols * bits // 32):
        raise ConvertError(
            f"{packed.file}: tensor {packed.name!r} has shape {list(packed.shape)} ({packed.dtype}), "
            f"which does not match {bits}-bit groups of {group_size} for scales {list(scales.shape)}"
        )

    def read(s: int, e: int) -> mx.array:
        w, sc, b = (read_rows(i.file, offsets[i.name], i.dtype, i.shape, s, e) for i in parts.values())
        return dequantize(w, sc, b, bits, group_size)

    nbytes = sum(i.nbytes for i in parts.values())
    return SourceTensor(f"{path}.weight", (*lead, cols), nbytes, read, packed.file)
