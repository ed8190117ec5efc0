"""Writing a model folder: the destination check, a hidden work folder renamed into place only
when complete, streamed safetensors shards, and the side files (tokenizer, chat template,
generation config) that travel with the weights. `qmlx convert` and `qmlx fuse` both write
through here.

`mx.save_safetensors` needs every array of a file in memory at once. Instead, the converter
knows every output tensor's dtype and shape before computing any of them (quantized shapes follow
from bits and group size), so each shard's header can be written first and the data then streamed
into place one block of rows at a time. Peak memory is a block, not a shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from qmlx.folder import SIDE_FILES, read_json

from .errors import ConvertError

DTYPE_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int, flag: str = "--shard-size", allow_zero: bool = False) -> int:
    """Bytes for a size such as `5GB`, `500MB`, `2GiB` or a plain integer (decimal units); a
    ConvertError (a UserError) naming `flag` for anything else."""
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
    if unit not in UNITS or value < 0 or (value == 0 and not allow_zero):
        raise ConvertError(f"{flag} {text!r} is not a size (examples: 5GB, 500MB, 2GiB)")
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


def write_arrays(
    folder: str, groups: list[dict[str, mx.array]], max_bytes: int, metadata=None
) -> tuple[dict[str, str], int]:
    """Write in-memory tensors (F32, F16, BF16 or U32) into shards of `folder`, one group never
    split across shards; returns (weight map, total bytes) for the index."""
    planned = [
        [OutTensor(name, DTYPE_NAMES[a.dtype], tuple(a.shape)) for name, a in g.items()] for g in groups
    ]
    writer = ShardWriter(folder, planned, max_bytes, metadata)
    try:
        for group in groups:
            for name, a in group.items():
                mx.eval(a)
                writer.write(name, 0, a)
        return writer.close(), writer.total_size
    finally:
        writer.abort()  # closes the open file after a failure (a no-op after close)


# ---------------------------------------------------------------- the output folder


def check_destination(src: str, dst: str, force: bool) -> None:
    """Refuse a DST that is SRC, inside it or holds it, is a file, or exists without `force`."""
    src_path = os.path.abspath(os.path.expanduser(str(src)))
    dst = os.path.abspath(os.path.expanduser(str(dst)))
    if os.path.exists(src_path) and (
        dst == src_path or src_path.startswith(dst + os.sep) or dst.startswith(src_path + os.sep)
    ):
        raise ConvertError(f"{dst}: DST must be a new folder outside SRC ({src_path})")
    if os.path.isfile(dst):
        raise ConvertError(f"{dst}: exists and is a file; choose a folder name for DST")
    if os.path.exists(dst) and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it")


@contextlib.contextmanager
def output_folder(dst: str) -> Iterator[str]:
    """A hidden work folder beside DST, renamed to DST when the block completes.

    Any failure, including Ctrl-C, leaves no trace: DST is untouched (an old DST is replaced
    only once the new one is whole) or absent. Work folders that killed runs left are swept.
    """
    dst = os.path.abspath(os.path.expanduser(str(dst)))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    _sweep_stale_partials(dst)
    tmp = os.path.join(parent, f"{_partial_prefix(dst)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # Inside the try: a signal that lands as os.makedirs returns must not leave the folder behind.
        os.makedirs(tmp)
        yield tmp
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: str, dst: str) -> None:
    """Copy the side files (`qmlx.folder.SIDE_FILES`) that folder `src` has into `dst`."""
    for file in SIDE_FILES:
        p = os.path.join(src, file)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, file))


def complete_side_files(folder: str, config: dict) -> None:
    """Make sure a folder has a chat_template.jinja (from tokenizer_config.json's template) and a
    generation_config.json (from the config's BOS and EOS ids)."""
    template = os.path.join(folder, "chat_template.jinja")
    tok_config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(template) and os.path.exists(tok_config):
        t = read_json(tok_config, ConvertError)
        t = t.get("chat_template") if isinstance(t, dict) else None
        if isinstance(t, str):
            with open(template, "w", encoding="utf-8") as f:
                f.write(t)
    gen = os.path.join(folder, "generation_config.json")
    if not os.path.exists(gen):
        keys = ("bos_token_id", "eos_token_id")
        with open(gen, "w", encoding="utf-8") as f:
            json.dump({k: config[k] for k in keys if config.get(k) is not None}, f, indent=2)


def _partial_prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}.partial-"


def _sweep_stale_partials(dst: str) -> None:
    """Remove work folders of earlier runs writing DST whose process is gone.

    A run cleans up after itself on any exception or Ctrl-C; only a SIGKILL (or power loss)
    leaves its hidden `.DST.partial-PID-…` folder behind. Folders of a live PID (another run
    writing now) are left alone.
    """
    parent, prefix = os.path.dirname(dst), _partial_prefix(dst)
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _replace(tmp: str, dst: str) -> None:
    """Move the finished folder to DST (replacing an old DST only once the new one is whole)."""
    if os.path.exists(dst):
        trash = f"{tmp}.old"
        os.rename(dst, trash)
        os.rename(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dst)
