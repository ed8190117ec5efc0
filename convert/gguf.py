"""GGUF files (llama.cpp) as a source: metadata → config.json, tensors → HF names, tokenizer.

Tensors are dequantized to float32 with the `gguf` package, one block of rows at a time read
with plain file reads (GGUF quant blocks run along rows, so any row range stands alone).
For qwen2, llama.cpp stores Q and K rows in Hugging Face order: unlike its llama conversion,
there is no rotary row permutation to undo (checked against the HF fixture in the tests).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import ConvertError
from .source_types import Source, SourceTensor

# Types dequantized here (gguf.quants implements each in numpy).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
# llama.cpp's per-block tensor names -> Hugging Face names.
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Qwen2's pre-tokenizer split (the `tokenizer.ggml.pre = qwen2` rule of llama.cpp).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4
# An output.weight this close to token_embd (relative RMS difference) is a re-quantized copy of
# a tied head; two quantizations of one matrix differ by a few percent, distinct matrices by ~140%.
TIED_TOLERANCE = 0.2


def hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


def open_gguf(path: str) -> Source:
    """A GGUF file of a qwen2 model as a converter source."""
    meta, infos = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise ConvertError(
            f"{path}: general.architecture is {arch!r}; qmlx converts Qwen2/Qwen2.5 models ('qwen2') from GGUF"
            + (" (convert a Qwen2-MoE from its Hugging Face or MLX folder)" if arch == "qwen2moe" else "")
        )
    tensors: dict[str, SourceTensor] = {}
    for info in infos:
        name = hf_name(info.name)
        if name is None:
            if info.name.endswith("rope_freqs.weight"):
                continue  # recomputed from the config
            raise ConvertError(f"{path}: tensor {info.name!r} has no Qwen2 counterpart")
        if info.kind not in SUPPORTED_TYPES or len(info.shape) not in (1, 2):
            raise ConvertError(
                f"{path}: tensor {info.name!r} has GGUF type {info.kind} and shape "
                f"{list(info.shape)}; qmlx converts 1-D and 2-D tensors of types "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        tensors[name] = _tensor(path, info, name)
    config = _config(meta, tensors)
    if "lm_head.weight" in tensors and _is_tied_copy(tensors):
        # Small Qwen2.5 models tie the head to the embedding (the hub's layout); llama.cpp
        # stores a separately quantized copy, which we drop to keep that layout.
        del tensors["lm_head.weight"]
        config["tie_word_embeddings"] = True
    return Source(
        description=path,
        config=config,
        tensors=tensors,
        write_side_files=lambda folder: _write_tokenizer(folder, meta, config),
    )


# ---------------------------------------------------------------- the file format
# A small reader of GGUF's header: gguf.GGUFReader turns every one of the 300K vocabulary
# strings into numpy arrays, which costs ~500 MB for a Qwen2 vocabulary; plain Python values
# cost a tenth of that.

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: str  # ggml type name, e.g. "Q4_K", or "type 42" if unknown to the gguf package
    type_id: int
    shape: tuple[int, ...]  # row-major (HF order): GGUF lists dims fastest first
    offset: int  # absolute file offset of the data
    row_bytes: int


class _Metadata(dict):
    path: str

    def require(self, key: str):
        if self.get(key) is None:
            raise ConvertError(f"{self.path}: GGUF metadata {key!r} is missing")
        return self[key]


class _Cursor:
    def __init__(self, f, path: str):
        self.f, self.path = f, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise ConvertError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.take("<Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise ConvertError(f"{self.path}: truncated GGUF header")
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS and item != 7:
                raw = self.f.read(count * struct.calcsize(_SCALARS[item]))
                return np.frombuffer(raw, dtype=np.dtype(_SCALARS[item])).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ConvertError(f"{self.path}: GGUF metadata has unknown value type {kind}")
        return self.take(_SCALARS[kind])


def read_gguf(path: str) -> tuple[_Metadata, list[GGUFTensor]]:
    """Metadata and tensor table of a GGUF file (versions 2 and 3, little-endian)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        c = _Cursor(f, path)
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (bad magic)")
        version = c.take("<I")
        if version not in (2, 3):
            raise ConvertError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta = _Metadata()
        meta.path = path
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("<I"))
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            raw.append((name, dims, c.take("<I"), c.take("<Q")))
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in raw:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            tensors.append(GGUFTensor(name, f"type {type_id}", type_id, (), 0, 0))
            continue
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))
        tensors.append(
            GGUFTensor(
                name,
                qtype.name,
                type_id,
                shape,
                data_start + offset,
                shape[-1] // block * block_bytes,
            )
        )
    return meta, tensors


def _tensor(path: str, info: GGUFTensor, name: str) -> SourceTensor:
    """A GGUF tensor read in rows: raw bytes at its offset, dequantized to float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.type_id)
    shape, row_bytes = info.shape, info.row_bytes
    # A 1-D tensor (norms, biases) is read as one row of its whole length.
    rows = shape[0] if len(shape) == 2 else 1

    def read(start: int, end: int) -> mx.array:
        if len(shape) == 1:
            start, end = 0, 1
        with open(path, "rb") as f:
            f.seek(info.offset + start * row_bytes)
            data = np.fromfile(f, dtype=np.uint8, count=(end - start) * row_bytes)
        if data.size != (end - start) * row_bytes:
            raise ConvertError(f"{path}: truncated: tensor {info.name!r} runs past the end of the file")
        data = data.reshape(end - start, row_bytes)
        if qtype == GGMLQuantizationType.F32:
            out = data.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            out = data.view(np.float16).astype(np.float32)
        else:
            out = dequantize(data, qtype)
        return mx.array(
            np.ascontiguousarray(out, dtype=np.float32).reshape(
                (end - start,) + shape[1:] if len(shape) == 2 else shape
            )
        )

    return SourceTensor(name, shape, rows * row_bytes, read, path)


def _config(meta: _Metadata, tensors: dict) -> dict:
    arch = "qwen2"
    heads = int(meta.require(f"{arch}.attention.head_count"))
    vocab = tensors["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in tensors else None
    if vocab is None:
        raise ConvertError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    eps = float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": int(meta.require(f"{arch}.embedding_length")),
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 32768)),
        # Stored as float32: 1e-6 reads back as 9.99999997e-07.
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 1_000_000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("yarn", "linear"):
        config["rope_scaling"] = {
            "type": scaling,
            "factor": float(meta.require(f"{arch}.rope.scaling.factor")),
        }
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = meta.get(f"tokenizer.ggml.{field}")
        if value is not None:
            config[key] = int(value)
    return config


def _is_tied_copy(tensors: dict) -> bool:
    """Whether output.weight is (a quantization of) the embedding, compared block by block."""
    head, emb = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    if head.shape != emb.shape:
        return False
    diff = norm = 0.0
    step = max(1, (8 << 20) // (4 * head.shape[1]))
    for start in range(0, head.shape[0], step):
        end = min(start + step, head.shape[0])
        a, b = head.read(start, end), emb.read(start, end)
        diff += mx.sum(mx.square(a - b)).item()
        norm += mx.sum(mx.square(b)).item()
    return math.sqrt(diff / max(norm, 1e-30)) < TIED_TOLERANCE


def _write_tokenizer(folder: str, meta: _Metadata, config: dict) -> None:
    """tokenizer.json, tokenizer_config.json (+ chat template) and generation_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    path = meta.path
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ConvertError(
            f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
            "Qwen2 uses a byte-level BPE ('gpt2')"
        )
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for inconsistent merges
        raise ConvertError(f"{path}: the GGUF's tokenizer metadata is inconsistent ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)
    tok.save(os.path.join(folder, "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
    # Qwen chat models end a turn with <|im_end|> and a document with <|endoftext|>.
    eos = [config[k] for k in ("eos_token_id",) if k in config]
    if "<|endoftext|>" in vocab and vocab["<|endoftext|>"] not in eos:
        eos.append(vocab["<|endoftext|>"])
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos}
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in generation.items() if v}, f, indent=2)
