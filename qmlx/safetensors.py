"""Checked, lazy reading of safetensors files and sharded folders.

The header is parsed and validated here (sizes, offsets, dtypes) so that a truncated or
malformed file fails with a message naming the file and tensor, before MLX touches it. The
data itself is read lazily by `mx.load`: a tensor costs memory only when it is evaluated.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError


class WeightsError(UserError):
    """A weights file or folder that cannot be used; the message names the file and tensor."""


# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# Dtypes MLX can load directly.
LOADABLE = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64"}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header: ({name: TensorInfo}, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise WeightsError(f"{path}: not a safetensors file or truncated (header size {n})")
            raw = f.read(n)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a folder, expected a .safetensors file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    infos = {}
    for name, h in header.items():
        try:
            dtype, shape, (start, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPE_SIZES:
            raise WeightsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        count = 1
        for s in shape:
            count *= s
        nbytes = count * DTYPE_SIZES[dtype]
        if end - start != nbytes or start < 0:
            raise WeightsError(
                f"{path}: tensor {name!r} header is inconsistent ({dtype} {list(shape)} "
                f"needs {nbytes} bytes, offsets give {end - start})"
            )
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file holds {data_size} "
                "bytes of data (an interrupted download or copy?)"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, nbytes)
    return infos, meta


def load_tensors(path: str, infos: dict[str, TensorInfo] | None = None) -> dict[str, mx.array]:
    """Lazily load every tensor of one checked file."""
    infos = infos if infos is not None else read_header(path)[0]
    for info in infos.values():
        if info.dtype not in LOADABLE:
            raise WeightsError(f"{path}: tensor {info.name!r} has dtype {info.dtype}, which qmlx cannot read")
    try:
        return mx.load(path)
    except Exception as e:  # MLX raises a bare RuntimeError/ValueError; name the file.
        raise WeightsError(f"{path}: could not be read ({e})") from None


def folder_index(folder: str) -> dict[str, TensorInfo]:
    """All tensors of a model folder (one file or shards with an index), headers checked."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            if not os.path.exists(os.path.join(folder, file)):
                raise WeightsError(
                    f"{os.path.join(folder, file)}: shard listed in model.safetensors.index.json is missing"
                )
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        weight_map = None
    if not files:
        bins = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (
            " (pickle .bin checkpoints are not loaded, for safety: convert them to safetensors)"
            if bins
            else ""
        )
        raise WeightsError(f"{folder}: no .safetensors weights found{hint}")
    out: dict[str, TensorInfo] = {}
    for file in files:
        infos, _ = read_header(os.path.join(folder, file))
        for name, info in infos.items():
            if name in out:
                raise WeightsError(f"{info.file}: tensor {name!r} also appears in {out[name].file}")
            out[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in out:
                raise WeightsError(
                    f"{os.path.join(folder, file)}: tensor {name!r} listed in the index is not in the file"
                )
    return out


def load_folder(folder: str, infos: dict[str, TensorInfo] | None = None) -> dict[str, mx.array]:
    """Lazily load every tensor of a checked model folder."""
    infos = infos if infos is not None else folder_index(folder)
    by_file: dict[str, dict[str, TensorInfo]] = {}
    for info in infos.values():
        by_file.setdefault(info.file, {})[info.name] = info
    weights: dict[str, mx.array] = {}
    for file, file_infos in by_file.items():
        weights.update(load_tensors(file, file_infos))
    return weights
