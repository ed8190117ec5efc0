"""`qmlx lora --estimate`: the memory a LoRA configuration needs, from the model's shapes alone.

Nothing is loaded or run: the figures follow from config.json (a folder, a file, or a hub id,
for which only config.json is fetched). Components:

- weights:     every linear layer and the embedding at `bits` (+ a scale and bias per group, in
               the compute dtype), norms and biases in the compute dtype; dense when bits=None.
- adapters:    rank·(in+out) per adapted projection, float32; as much again for gradients and
               twice as much for AdamW's two moments.
- activations: what the backward pass keeps per token and block (counted below), plus the
               attention probabilities (heads·L per token), for every block; with gradient
               checkpointing only each block's input is kept, and one block is recomputed at a
               time.
- logits:      the output head's logits, their float32 copy and the cross-entropy's gradient,
               for one chunk of LOSS_CHUNK tokens (the loss is computed chunk by chunk).
- dequantized: on MLX's CPU backend a quantized layer multiplies many rows by dequantizing to
               a dense float32 matrix, one matrix (or block of head rows) at a time, forward
               and backward (the backward pass dequantizes again rather than keeping it).
               Metal multiplies packed weights directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ModelConfig
from ..folder import ModelNotFound, looks_like_repo, read_json
from ..quant.groups import bits_per_weight
from .apply import DEFAULT_TARGETS
from .score import LOSS_CHUNK

GB = 1e9


def read_config(model: str) -> dict:
    """config.json as a dict, from a config file, a model folder or a hub repo id."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        if not looks_like_repo(model):
            raise ModelNotFound(f"--model {model}: no such config.json, folder or hub id")
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        except Exception as e:  # offline, missing repo, auth: one message for the user
            raise ModelNotFound(
                f"--model {model}: the hub could not provide config.json ({type(e).__name__})"
            ) from None
    d = read_json(path)
    ModelConfig.from_dict(d, source=path)  # field-named errors for configs qmlx cannot run
    return d


def linear_shapes(c: ModelConfig, layer: int = 0) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable projection of block `layer`, by short target name (in a Qwen2-MoE
    sparse block the MLP targets are the shared expert's)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d = c.hidden_size
    i = c.shared_expert_intermediate_size if c.sparse_layer(layer) else c.intermediate_size
    return {
        "q": (q, d),
        "k": (kv, d),
        "v": (kv, d),
        "o": (d, q),
        "gate": (i, d),
        "up": (i, d),
        "down": (d, i),
    }


@dataclass
class Estimate:
    weights: float
    adapters: float  # parameters + gradients + AdamW moments
    adapter_params: int
    activations: float
    activations_checkpointed: float
    logits: float
    dequantized: float
    dequantized_checkpointed: float

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.activations + self.logits + self.dequantized

    @property
    def total_checkpointed(self) -> float:
        return (
            self.weights
            + self.adapters
            + self.activations_checkpointed
            + self.logits
            + self.dequantized_checkpointed
        )


def estimate(
    config: dict,
    bits: int | None,
    group_size: int = 64,
    rank: int = 8,
    targets=DEFAULT_TARGETS,
    batch_size: int = 8,
    seq_len: int = 512,
    dtype_bytes: int = 2,
    dropout: float = 0.0,
    cpu: bool = False,
    num_layers: int | None = None,
    scale_bytes: int = 2,
) -> Estimate:
    """Bytes of a LoRA run from shapes alone. `scale_bytes`: of quantized layers' scales and biases, as
    checkpoints store them (16-bit: Metal computes in 16 bits, and the CPU kernels read the stored ones)."""
    c = ModelConfig.from_dict(config)
    n_layers = c.num_hidden_layers
    first_adapted = n_layers - (n_layers if num_layers is None else min(num_layers, n_layers))
    d, vocab, T = c.hidden_size, c.vocab_size, batch_size * seq_len

    def matrix_bytes(rows: int, cols: int) -> float:
        if bits is None:
            return rows * cols * dtype_bytes
        return rows * cols * bits_per_weight(bits, group_size, scale_bits=8 * scale_bytes) / 8

    weights = lora_params = activations = 0.0
    largest = min(vocab, _out_block()) * d  # the largest matrix a product dequantizes at once (CPU)
    per_blocks = []
    for layer in range(n_layers):
        shapes = linear_shapes(c, layer)
        q, kv, inter = shapes["q"][0], shapes["k"][0], shapes["up"][0]
        weights += sum(matrix_bytes(o, i) for o, i in shapes.values()) + 2 * d * dtype_bytes  # + norms
        weights += (q + 2 * kv) * dtype_bytes if c.attention_bias else 0
        largest = max([largest] + [o * i for o, i in shapes.values()])
        # Elements kept per token by one block's backward pass (dropout adds its input and mask).
        keep = (
            4 * d  # block input, first norm output, attention residual, second norm output
            + 2 * q
            + 2 * kv  # RoPE'd queries and keys, values, attention output
            + 4 * inter  # gate, up, silu(gate), their product (down's input)
            + rank * len(targets)  # x·A of each adapter
        )
        if c.sparse_layer(layer):
            e, k, h = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
            # router, routed experts (E·3 matrices, stacked) and the shared expert's gate
            weights += matrix_bytes(e, d) + e * 3 * matrix_bytes(h, d) + matrix_bytes(1, d)
            largest = max(largest, h * d)  # stacked experts are multiplied one expert at a time
            keep += 2 * e + k * (4 * h + d) + 2  # router logits and probabilities, each chosen expert's
            # gate, up, silu(gate), product and output, the shared expert's gate
        if dropout > 0:
            keep += 2 * (2 * d + q + inter)  # dropped inputs and masks of the adapted inputs
        per_block = T * keep * dtype_bytes + 2 * batch_size * c.num_attention_heads * seq_len**2 * dtype_bytes
        per_blocks.append(per_block)
        if layer >= first_adapted:
            lora_params += sum(rank * (o + i) for t, (o, i) in shapes.items() if t in targets)
            activations += per_block
        else:
            activations += T * d * dtype_bytes
    head = 0 if c.tie_word_embeddings else matrix_bytes(vocab, d)
    weights += matrix_bytes(vocab, d) + head + d * dtype_bytes
    lora_params = int(lora_params)
    adapters = lora_params * 4 * 4  # float32 parameter, gradient, AdamW m and v
    # Checkpointed: block inputs only, plus one block recomputed at a time.
    activations_ckpt = n_layers * T * d * dtype_bytes + max(per_blocks)
    logits = min(T, LOSS_CHUNK) * vocab * (dtype_bytes + 4 + 4)  # one chunk at a time (score.py)

    dequant = dequant_ckpt = 0.0
    if cpu and bits is not None:
        # One float32 matrix (or head block) at a time, forward and backward (quant/layers.py).
        dequant = dequant_ckpt = 2.0 * largest * 4  # the product's operand and MLX's temporary
    return Estimate(
        weights, adapters, lora_params, activations, activations_ckpt, logits, dequant, dequant_ckpt
    )


def _out_block() -> int:
    from ..quant.layers import OUT_BLOCK

    return OUT_BLOCK


def report(e: Estimate, title: str) -> str:
    rows = [
        ("weights", e.weights, e.weights),
        (f"adapters ({e.adapter_params / 1e6:.1f}M params, + grads + AdamW)", e.adapters, e.adapters),
        ("activations", e.activations, e.activations_checkpointed),
        ("logits + loss", e.logits, e.logits),
    ]
    if e.dequantized:
        rows.append(("dequantized weights (CPU backend)", e.dequantized, e.dequantized_checkpointed))
    rows.append(("total", e.total, e.total_checkpointed))
    width = max(len(r[0]) for r in rows)
    lines = [title, f"{'':{width}}  {'no checkpointing':>16}  {'--grad-checkpoint':>17}"]
    lines += [f"{name:{width}}  {a / GB:13.2f} GB  {b / GB:14.2f} GB" for name, a, b in rows]
    return "\n".join(lines)


def estimate_for(
    model: str,
    bits: int | None = None,
    group_size: int = 64,
    rank: int = 8,
    targets=DEFAULT_TARGETS,
    batch_size: int = 8,
    seq_len: int = 512,
    dtype: str = "auto",
    dropout: float = 0.0,
    backend: str = "metal",
    num_layers: int | None = None,
) -> tuple[Estimate, str]:
    """(the estimate, a title naming its settings) for a model (folder, config.json or hub id).

    bits None: the config's quantization (its group size too); "auto" dtype is float32 on the CPU
    backend and 16-bit on Metal.
    """
    config = read_config(model)
    quant = config.get("quantization") or {}
    group = group_size if bits is not None else quant.get("group_size", group_size)
    bits = bits if bits is not None else quant.get("bits")
    dtype_bytes = 4 if dtype == "float32" or backend == "cpu" and dtype == "auto" else 2
    e = estimate(
        config, bits, group, rank, targets, batch_size, seq_len, dtype_bytes, dropout,
        cpu=backend == "cpu", num_layers=num_layers,
    )  # fmt: skip
    weights = f"{bits}-bit (group {group})" if bits else f"{dtype_bytes * 8}-bit float"
    title = (
        f"{model}: weights {weights}, rank {rank}, batch {batch_size}, "
        f"sequence {seq_len}, {backend} backend, activations {dtype_bytes * 8}-bit"
    )
    return e, title


def estimate_report(model: str, **settings) -> str:
    """`qmlx lora --estimate`: the table for a model (settings as `estimate_for`'s)."""
    return report(*estimate_for(model, **settings))
