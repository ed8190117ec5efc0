"""The block-by-block pass of calibrated conversion (AWQ, GPTQ): read a block, calibrate,
quantize, write, move on.

Only the calibration samples' hidden states (samples × length × hidden, e.g. 32 × 512 × 896
floats = 58 MB for the 0.5B model) and one block's weights and statistics are held at a time,
so memory stays bounded like the plain conversion's, whatever the number of blocks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qmlx.config import ModelConfig
from qmlx.model import Block
from qmlx.quant import layer_params
from qmlx.quant.calibrate import LINEARS, head_hessian, layer_damage, quantize_block
from qmlx.quant.gptq import Hessian, gptq

from .layout import quantizable

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
# Rows of the head GPTQ'd at once (float32): bounds the head pass's memory for any vocabulary.
HEAD_BLOCK_BYTES = 256 * 2**20


def head_name(config: ModelConfig) -> str:
    """The tensor that computes the logits: the embedding when the head is tied to it."""
    return EMBED if config.tie_word_embeddings else "lm_head.weight"


def embed(table, tokens: mx.array, out_dtype, block_rows: int = 8192) -> mx.array:
    """Embeddings of `tokens` (n, L), reading the table in row blocks (it may be huge)."""
    flat = tokens.reshape(-1)
    wanted = sorted(set(flat.tolist()))
    rows: dict[int, mx.array] = {}
    start = 0
    for end in range(block_rows, table.shape[0] + block_rows, block_rows):
        end = min(end, table.shape[0])
        ids = [i for i in wanted if start <= i < end]
        if ids:
            block = table.read(start, end).astype(out_dtype).astype(mx.float32)
            picked = block[mx.array(ids) - start]
            mx.eval(picked)
            rows.update({i: picked[k] for k, i in enumerate(ids)})
        start = end
    found = mx.stack([rows[i] for i in wanted])  # (unique ids, hidden)
    where = np.searchsorted(np.array(wanted), np.array(flat))
    return found[mx.array(where)].reshape(*tokens.shape, -1)


def _read(t) -> mx.array:
    return t.read(0, t.shape[0])


def block_params(quantization: dict, index: int, tensors: dict) -> dict:
    """{linear path inside the block: layer params or None} under the plan."""
    out = {}
    for path in LINEARS:
        name = f"model.layers.{index}.{path}.weight"
        q = quantizable(name, tensors[name].shape)
        out[path] = layer_params(quantization, name.removesuffix(".weight")) if q else None
    return out


def convert_block(
    index: int,
    tensors: dict,
    config: ModelConfig,
    h: mx.array,
    quantization: dict,
    method: str,
    out_dtype,
    writer,
) -> mx.array:
    """Calibrate, quantize and write block `index`; returns its output hidden states."""
    prefix = f"model.layers.{index}."
    block = Block(config)
    names = [n for n in tensors if n.startswith(prefix)]
    block.load_weights(
        [(n.removeprefix(prefix), _read(tensors[n]).astype(out_dtype).astype(mx.float32)) for n in names]
    )
    mx.eval(block.parameters())
    params = block_params(quantization, index, tensors)
    out, h_next = quantize_block(
        block,
        h,
        params,
        method,
        config.num_attention_heads,
        config.num_key_value_heads,
        out_dtype,
    )
    for path, arrays in out.items():
        base = prefix + path
        suffixes = (".weight",) if len(arrays) == 1 else (".weight", ".scales", ".biases")
        for suffix, a in zip(suffixes, arrays):
            writer.write(base + suffix, 0, a)
    # Norms and biases: AWQ may have rescaled them.
    for local, a in tree_flatten(block.parameters()):
        if local.endswith(".bias") or "layernorm" in local:
            a = a.astype(out_dtype)
            mx.eval(a)
            writer.write(prefix + local, 0, a)
    return h_next


def convert_head(
    t, outs, params: dict, h: mx.array, tensors: dict, config: ModelConfig, out_dtype, writer
) -> None:
    """GPTQ the output head on its calibration inputs (the final norm of h, the last block's
    outputs) and write it, a block of vocabulary rows at a time (GPTQ treats rows
    independently, so the blocks together are the whole matrix's result).

    A tied head is the embedding table too: its rows are then tuned for the logits, not the
    lookup. On the fixture (4-bit g64) the tied table alone costs +0.3% perplexity this way
    against +1.5% rounded to nearest when the calibration text is in the scored languages,
    but +2.3% when it is code only (docs/quantization.md); hence --calib-head is opt-in.
    """
    norm = _read(tensors[NORM]).astype(out_dtype).astype(mx.float32)
    hessian = Hessian(head_hessian(h, norm, config.rms_norm_eps))
    rows, cols = t.shape
    step = max(1, HEAD_BLOCK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        w = t.read(start, min(start + step, rows)).astype(out_dtype).astype(mx.float32)
        parts = gptq(w, hessian, params["bits"], params["group_size"], out_dtype)
        mx.eval(parts)
        for spec, part in zip(outs, parts):
            writer.write(spec.name, start, part)


def measure(
    tensors: dict,
    config: ModelConfig,
    tokens: mx.array,
    bits: int,
    group_size: int,
    out_dtype,
    samples: int = 8,
) -> dict:
    """{block layer path: {"damage", "numel"}}: each layer alone rounded to `bits`, measured on
    the first `samples` calibration samples, block by block (unquantized blocks between)."""
    h = embed(tensors[EMBED], tokens[:samples], out_dtype)
    out = {}
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        block = Block(config)
        block.load_weights(
            [
                (n.removeprefix(prefix), _read(t).astype(out_dtype).astype(mx.float32))
                for n, t in tensors.items()
                if n.startswith(prefix)
            ]
        )
        damage, h = layer_damage(block, h, bits, group_size)
        for path, d in damage.items():
            w = tensors[f"{prefix}{path}.weight"]
            out[prefix + path] = {"damage": d, "numel": w.shape[0] * w.shape[1]}
    return out
