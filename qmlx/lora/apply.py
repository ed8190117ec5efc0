"""Put LoRA wrappers on a model's projections (and take them off again), by path.

The model declares plain layers and never knows about adapters; as with quantization, this is
the one place that swaps modules. Everything except the adapters' A and B is frozen.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from .layers import LoRALinear

# Short target names (the CLI's --targets) -> the projection's path inside a decoder block.
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def target_path(block: nn.Module, target: str) -> str:
    """The path of a short target inside `block`: in a Qwen2-MoE sparse block the MLP targets are its
    shared expert's projections (the routed experts stay frozen)."""
    path = TARGETS[target]
    if path.startswith("mlp.") and hasattr(block.mlp, "shared_expert"):
        return "mlp.shared_expert." + path.removeprefix("mlp.")
    return path


def parse_targets(spec: str | list[str] | tuple[str, ...], flag: str = "--targets") -> list[str]:
    """Validated short target names from "q,v" or a list; unknown names are a user error."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise UserError(
            f"{flag}: unknown target {bad[0]!r}; choose from {','.join(TARGETS)}"
            if bad
            else f"{flag}: no targets given"
        )
    return list(dict.fromkeys(names))


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets=DEFAULT_TARGETS,
    num_layers: int | None = None,
) -> nn.Module:
    """Freeze `model` and wrap the targeted projections of its last `num_layers` blocks.

    After this, `model.trainable_parameters()` holds only the adapters' A and B matrices.
    """
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {dropout}")
    targets = parse_targets(targets)
    model.freeze()
    layers = model.layers if num_layers is None else model.layers[-num_layers:]
    for block in layers:
        swaps = []
        modules = dict(block.named_modules())
        for t in targets:
            path = target_path(block, t)
            base = modules[path]
            swaps.append((path, LoRALinear(base, rank, alpha, dropout)))
        block.update_modules(tree_unflatten(swaps))
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapters' A and B matrices by parameter path (what an adapter file holds)."""
    return {k: v for k, v in tree_flatten(model.trainable_parameters())}


def fuse_model(model: nn.Module, bits: int | None = None, group_size: int | None = None) -> nn.Module:
    """Replace every LoRA wrapper by a plain layer holding base + update (see LoRALinear.fuse)."""
    swaps = [(p, m.fuse(bits, group_size)) for p, m in lora_modules(model)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations during the backward pass instead of keeping them.

    Memory for activations drops from every intermediate of every block to one block input
    per block, for about one extra forward pass of compute. The block's class is swapped for
    a subclass whose call runs under `mx.checkpoint`; parameters and names are unchanged.
    """
    for block in model.layers:
        block.__class__ = _checkpointed(type(block))


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if getattr(cls, "_qmlx_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:

        def __call__(self, x, mask=None, cache=None):
            def run(params, x):
                # The trainable parameters are inputs, so their gradients flow through.
                self.update(params)
                return cls.__call__(self, x, mask, cache)

            return mx.checkpoint(run)(self.trainable_parameters(), x)

        _CHECKPOINTED[cls] = type(
            f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_qmlx_checkpointed": True}
        )
    return _CHECKPOINTED[cls]
