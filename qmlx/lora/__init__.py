"""LoRA / QLoRA fine-tuning: adapter layers, data, orderings, trainer, fuse and export."""

from .adapters import load_adapter, save_adapter
from .apply import DEFAULT_TARGETS, TARGETS, apply_lora, fuse_model
from .layers import LoRALinear

__all__ = [
    "DEFAULT_TARGETS",
    "TARGETS",
    "LoRALinear",
    "apply_lora",
    "fuse_model",
    "load_adapter",
    "save_adapter",
]
