"""Streaming safetensors shards: headers planned up front, tensor data written block by block.

`mx.save_safetensors` needs every array of a file in memory at once. Instead, the converter
knows every output tensor's dtype and shape before computing any of them (quantized shapes follow
from bits and group size), so each shard's header can be written first and the data then streamed
into place one block of rows at a time. Peak memory is a block, not a shard.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import ConvertError

DTYPE_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes for a size such as `5GB`, `500MB`, `2GiB` or a plain integer (decimal units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        s = str(text).strip().upper().replace(" ", "")
        digits = len(s) - len(s.lstrip("0123456789."))
        value, unit = s[:digits], s[digits:]
        try:
            value = float(value)
        except ValueError:
            value = -1
    if unit not in UNITS or value <= 0:
        raise ConvertError(f"--shard-size {text!r} is not a size (examples: 5GB, 500MB, 2GiB)")
    return int(value * UNITS[unit])


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * ITEMSIZE[self.dtype]


def to_bytes(a: mx.array) -> memoryview:
    """The raw little-endian bytes of an evaluated array (bfloat16 through a uint16 view)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(a))


class ShardWriter:
    """Writes planned tensors into shards of at most `max_bytes` (a larger tensor gets its own).

    `groups` lists the outputs of each source tensor; a group is never split across shards, so
    the converter has one file open at a time.
    """

    def __init__(self, folder: str, groups: list[list[OutTensor]], max_bytes: int, metadata=None):
        self.folder = folder
        self.metadata = {"format": "mlx", **(metadata or {})}
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for group in groups:
            g = sum(t.nbytes for t in group)
            if shards[-1] and size + g > max_bytes:
                shards.append([])
                size = 0
            shards[-1].extend(group)
            size += g
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.where: dict[str, tuple[int, int, OutTensor]] = {}  # name -> (shard, file offset, spec)
        self.headers: list[bytes] = []
        for i, shard in enumerate(shards):
            header, offset = self._header(shard)
            self.headers.append(header)
            for t in shard:
                self.where[t.name] = (i, 8 + len(header) + offset[t.name], t)
        self.written = {name: 0 for name in self.where}
        self.total_size = sum(t.nbytes for s in shards for t in s)
        self._file = None
        self._current = -1
        self._started: set[int] = set()

    def _header(self, shard: list[OutTensor]) -> tuple[bytes, dict[str, int]]:
        entries: dict = {"__metadata__": self.metadata}
        offsets, pos = {}, 0
        for t in shard:
            entries[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [pos, pos + t.nbytes],
            }
            offsets[t.name] = pos
            pos += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        # The safetensors format pads the header so the data starts 8-byte aligned.
        raw += b" " * (-len(raw) % 8)
        return raw, offsets

    def _open(self, shard: int) -> None:
        """Open a shard for writing: created with its header the first time, reopened in place
        after (a tensor may be written after later shards, e.g. a head calibrated last)."""
        self._close_current()
        path = os.path.join(self.folder, self.files[shard])
        if shard in self._started:
            self._file = open(path, "r+b")
        else:
            self._file = open(path, "wb")
            header = self.headers[shard]
            self._file.write(len(header).to_bytes(8, "little"))
            self._file.write(header)
            self._started.add(shard)
        self._current = shard

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, row_start: int, block: mx.array) -> None:
        """Write an evaluated block of rows of tensor `name`, starting at row `row_start`."""
        shard, offset, spec = self.where[name]
        if DTYPE_NAMES.get(block.dtype) != spec.dtype:
            raise AssertionError(f"{name}: block dtype {block.dtype} does not match {spec.dtype}")
        if shard != self._current:
            self._open(shard)
        data = to_bytes(block)
        self._file.seek(offset + row_start * spec.row_bytes)
        self._file.write(data)
        self.written[name] += data.nbytes

    def close(self) -> dict[str, str]:
        """Finish the last shard, check that every byte was written, return the weight map."""
        self._close_current()
        for name, (_, _, spec) in self.where.items():
            if self.written[name] != spec.nbytes:
                raise AssertionError(f"{name}: wrote {self.written[name]} of {spec.nbytes} bytes")
        return {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard}

    def abort(self) -> None:
        """Close any open file (the caller removes the folder)."""
        self._close_current()
