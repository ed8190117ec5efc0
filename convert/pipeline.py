"""`convert()`: read a source tensor by tensor, quantize it, stream it into shards.

Peak memory is one block of rows of one tensor (plus the interpreter), whatever the model size:
tensors are read in row blocks at known file offsets, quantized (groups never span rows, so a
block quantizes exactly as the whole would), and written straight into pre-planned shards.
The output is built in a hidden folder beside DST and renamed into place only when complete,
so an error or Ctrl-C never leaves a half-written DST.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import mlx.core as mx

from qmlx.config import ModelConfig
from qmlx.folder import DTYPES, parse_dtype
from qmlx.quant import check_params, layer_params, plan, quantize
from qmlx.quant.calibrate import CALIBRATED, GPTQ_METHODS, METHODS
from qmlx.quant.recipes import choose_by_sensitivity, layer_index, measured_recipe
from qmlx.quant.search import quantize_searched
from qmlx.tokenizer import Tokenizer

from . import calibrated, card
from .calib import calibration_tokens
from .errors import ConvertError
from .layout import IGNORED_SUFFIXES, expected_tensors, layer_sort_key, quantizable, stack_experts
from .source_types import Source
from .sources import open_source
from .writer import (
    DTYPE_NAMES,
    OutTensor,
    ShardWriter,
    check_destination,
    complete_side_files,
    output_folder,
    parse_size,
)

# progress(description, bytes done, bytes in all): what convert() reports as it goes.
Progress = Callable[[str, int, int], None]
# Source rows are read, cast and quantized this many bytes (as float32) at a time.
BLOCK_BYTES = 16 * 2**20


def convert(
    src: str,
    dst: str,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    force: bool = False,
    dequantize: bool = False,
    progress: Progress | None = None,
    method: str = "rtn",
    calib: str | None = None,
    calib_samples: int = 32,
    calib_seq_len: int = 512,
    calib_head: bool = False,
) -> str:
    """Convert SRC (HF folder, hub id, quantized folder or .gguf) into a qmlx/MLX folder DST.

    Quantizes to `bits` with `group_size` (per `recipe`), or with `dequantize=True` writes
    unquantized weights in `dtype` (a quantized source is dequantized). `dtype` (float16,
    bfloat16, float32) is that of unquantized tensors, scales and biases; default: the
    source's `torch_dtype`. `method` picks how weights are rounded (see
    `qmlx.quant.calibrate.METHODS`); calibrated methods run `calib_samples` samples of
    `calib_seq_len` tokens from `calib` (a text/JSONL file or folder; default: Python's
    standard library) through the model block by block. `calib_head` (GPTQ methods) also
    quantizes the output head by GPTQ on the calibration text's final hidden states.
    `progress(description, done, total)` is called as source bytes are converted (None or
    False: not called); convert() itself prints nothing. Returns DST's path.
    """
    if progress is not None and progress is not False and not callable(progress):
        raise TypeError("progress is a callback (description, done, total) or None")
    if method not in METHODS:
        raise ConvertError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if dequantize and method in CALIBRATED:
        raise ConvertError(f"--method {method} quantizes; it has no use with --dequantize")
    if calib_head and method not in GPTQ_METHODS:
        raise ConvertError(f"--calib-head needs --method {' or '.join(GPTQ_METHODS)}")
    if not dequantize:
        check_params(bits, group_size, "--bits/--group-size")
    elif recipe is not None:
        raise ConvertError("--recipe chooses bits for quantized output; it has no use with --dequantize")
    max_shard = parse_size(shard_size)
    if dtype is not None:
        parse_dtype(dtype, "--dtype", ConvertError)
    dst = os.path.abspath(os.path.expanduser(str(dst)))
    check_destination(src, dst, force)

    source = open_source(src)
    if source.quantized and not dequantize:
        raise ConvertError(
            f"{src}: is already quantized; pass --dequantize to convert it back to unquantized "
            "weights (then quantize that folder again if you want other settings)"
        )
    config = ModelConfig.from_dict(source.config, source=f"{src}: config.json")
    if recipe == "dense-8" and not config.is_moe:
        raise ConvertError(
            f"--recipe dense-8 keeps a mixture of experts' shared layers at 8 bits; {src} is a dense "
            f"{config.model_type} model (use --bits 8, or head-8 / kv-8)"
        )
    if config.is_moe and method in CALIBRATED:
        raise ConvertError(
            f"--method {method} calibrates dense Qwen2 blocks; a qwen2_moe model converts with "
            f"--method {' or '.join(m for m in METHODS if m not in CALIBRATED)}"
        )
    tensors = _checked_tensors(source, config)
    dtype_name = dtype or _default_dtype(source.config)
    out_dtype = DTYPES[dtype_name]

    layers = {n.removesuffix(".weight"): t.shape[-1] for n, t in tensors.items() if quantizable(n, t.shape)}
    measured = None if dequantize else measured_recipe(recipe)
    if measured and method not in CALIBRATED:
        raise ConvertError(
            f"--recipe {recipe} measures layers on calibration text; use it with --method "
            f"{' or '.join(CALIBRATED)}"
        )
    quantization = None
    if not dequantize and not measured:
        quantization = plan(layers, config.num_hidden_layers, bits, group_size, recipe)
    n_params = sum(math.prod(t.shape) for t in tensors.values())

    old_cache_limit = mx.set_cache_limit(0)  # freed blocks go back to the OS, not a cache
    try:
        # Any failure, including Ctrl-C, leaves no trace: DST is untouched or absent.
        with output_folder(dst) as tmp:
            source.write_side_files(tmp)
            complete_side_files(tmp, source.config)
            tokens = None
            if method in CALIBRATED and not dequantize:
                tokens = calibration_tokens(Tokenizer.from_folder(tmp), calib, calib_samples, calib_seq_len)
            if measured:
                low, high = measured
                damage = calibrated.measure(tensors, config, tokens, low, group_size, out_dtype)
                quantization = choose_by_sensitivity(
                    layers, config.num_hidden_layers, low, high, group_size, damage
                )
            jobs = [_job(t, quantization, out_dtype) for t in tensors.values()]
            metadata = {"format": "mlx" if quantization else "pt"}
            writer = ShardWriter(tmp, [outs for _, outs, _ in jobs], max_shard, metadata)
            calib_state = None if tokens is None else (config, tokens, quantization, method)
            try:
                _run(jobs, out_dtype, writer, progress or None, method, calib_state, tensors, calib_head)
                weight_map = writer.close()
            finally:
                writer.abort()  # closes the open shard after a failure (a no-op after close)
            card.write_index(tmp, weight_map, writer.total_size, n_params)
            card.write_config(tmp, source.config, quantization, dtype_name)
            card.write_card(
                tmp,
                os.path.basename(dst),
                source.description,
                quantization,
                recipe,
                layers,
                writer.total_size,
                n_params,
                dtype_name,
            )
    finally:
        mx.set_cache_limit(old_cache_limit)
    return dst


def _default_dtype(config: dict) -> str:
    d = config.get("torch_dtype") or config.get("dtype")
    return d if d in DTYPES else "bfloat16"


def _checked_tensors(source: Source, config: ModelConfig) -> dict:
    """The source's tensors in model order, checked against what the config implies."""
    expected = expected_tensors(config)
    tensors = {}
    source_tensors = stack_experts(source.tensors, config) if config.is_moe else source.tensors
    for name, t in source_tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head is the embedding; some exporters save a copy anyway
        if name not in expected:
            raise ConvertError(f"{t.where}: unexpected tensor {name!r} (not part of a Qwen2 model)")
        if tuple(t.shape) != expected[name]:
            raise ConvertError(
                f"{t.where}: tensor {name!r} has shape {list(t.shape)}, "
                f"the config implies {list(expected[name])}"
            )
        tensors[name] = t
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{source.description}: tensor {missing[0]!r} is missing{more}")
    return dict(sorted(tensors.items(), key=lambda kv: layer_sort_key(kv[0])))


def _job(t, quantization: dict | None, out_dtype):
    """(source tensor, its output tensors, layer params or None)."""
    path = t.name.removesuffix(".weight")
    params = None
    if quantization is not None and quantizable(t.name, t.shape):
        params = layer_params(quantization, path)
    dname = DTYPE_NAMES[out_dtype]
    if params is None:
        return t, [OutTensor(t.name, dname, tuple(t.shape))], None
    *lead, cols = t.shape  # (rows, cols), or (experts, rows, cols) for stacked experts
    groups = cols // params["group_size"]
    outs = [
        OutTensor(f"{path}.weight", "U32", (*lead, cols * params["bits"] // 32)),
        OutTensor(f"{path}.scales", dname, (*lead, groups)),
        OutTensor(f"{path}.biases", dname, (*lead, groups)),
    ]
    return t, outs, params


def _run(
    jobs,
    out_dtype,
    writer: ShardWriter,
    progress: Progress | None,
    method,
    calib_state,
    tensors,
    calib_head: bool = False,
) -> None:
    """Write every job's outputs; with `calib_state`, decoder blocks go through calibration
    (and with `calib_head`, the output head too, after them). `progress` hears of each step."""
    total = sum(t.nbytes for t, _, _ in jobs)
    done_bytes = 0
    description = "converting"

    def report(what: str | None = None) -> None:
        nonlocal description
        description = what or description
        if progress is not None:
            progress(description, done_bytes, total)

    report()
    h, done, head = None, set(), None
    head_name = calibrated.head_name(calib_state[0]) if calib_head and calib_state else None
    for i, (t, outs, params) in enumerate(jobs):
        report(f"tensor {i + 1}/{len(jobs)}")
        index = layer_index(t.name)
        if t.name == head_name and params is not None:
            head = (t, outs, params)  # needs the last block's outputs: done after the blocks
            continue
        if calib_state is None or index is None:
            # Embeddings and head are rounded to nearest unless --calib-head: the data-free
            # range search made the tied head worse.
            rounding = "rtn" if method in CALIBRATED else method
            _convert_tensor(t, outs, params, out_dtype, writer, rounding)
        elif index not in done:
            config, tokens, quantization, method = calib_state
            if h is None:
                h = calibrated.embed(tensors[calibrated.EMBED], tokens, out_dtype)
            report(f"calibrating block {index + 1}")
            h = calibrated.convert_block(index, tensors, config, h, quantization, method, out_dtype, writer)
            done.add(index)
        done_bytes += t.nbytes
        report()
    if head is not None:
        report("calibrating the head")
        calibrated.convert_head(*head, h, tensors, calib_state[0], out_dtype, writer)
        done_bytes += head[0].nbytes
        report()


def _convert_tensor(t, outs, params, out_dtype, writer: ShardWriter, method="rtn") -> None:
    """Read, cast, (quantize) and write one tensor, a block of rows at a time.

    Quantizing after the cast matches what loading in `out_dtype` and quantizing would give
    (mlx-lm's order), so `rtn` produces the same bytes as mlx-lm from the same source; `clip`
    searches each group's range (row-local too, so blocks still quantize as the whole would).
    """
    rows = t.shape[0]
    row_elems = math.prod(t.shape[1:])
    step = max(1, BLOCK_BYTES // (4 * row_elems)) if len(t.shape) > 1 else rows
    for start in range(0, rows, step):
        block = t.read(start, min(start + step, rows)).astype(out_dtype)
        if params is None:
            mx.eval(block)
            writer.write(outs[0].name, start, block)
            continue
        if method == "rtn":
            parts = quantize(block, params["bits"], params["group_size"])
        else:
            parts = quantize_searched(block, params["bits"], params["group_size"], dtype=out_dtype)
        mx.eval(parts)
        for spec, part in zip(outs, parts):
            writer.write(spec.name, start, part)
