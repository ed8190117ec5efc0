"""What every kind of source presents to the converter: its config and its tensors, by name.

The folder sources (sources.py) and the GGUF source (gguf.py) both build these; the pipeline
reads only these, so neither source module needs the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class SourceTensor:
    """One logical tensor of the source: `read(start, end)` returns rows [start, end)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int  # bytes read from disk for the whole tensor (for progress)
    read: Callable[[int, int], mx.array]
    where: str  # the file it lives in, for messages


@dataclass
class Source:
    """What the converter needs from any kind of source."""

    description: str  # for the model card, e.g. the folder or repo id
    config: dict  # the config.json contents
    tensors: dict[str, SourceTensor]
    quantized: bool = False
    # Writes tokenizer files, generation config and chat template into a folder.
    write_side_files: Callable[[str], None] = lambda folder: None
