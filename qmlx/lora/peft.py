"""Export an adapter with Hugging Face PEFT names, so `peft` + transformers can load it.

PEFT stores `base_model.model.<module path>.lora_A.weight` (rank, in) and `.lora_B.weight`
(out, rank) and scales by lora_alpha / r, the same convention as qmlx's LoRALinear, so the
matrices are written unchanged. A PEFT adapter applies to the Hugging Face (unquantized) base
model; an adapter trained over a quantized base then sees slightly different base weights.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx

from ..errors import UserError
from .adapters import WEIGHTS, read_adapter_config, write_json
from .apply import TARGETS


def export_peft(
    adapter: str,
    dst: str,
    base_model: str | None = None,
    num_hidden_layers: int | None = None,
    force: bool = False,
) -> str:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT LoRA) into `dst`."""
    cfg = read_adapter_config(adapter)
    if os.path.exists(os.path.join(dst, "adapter_model.safetensors")) and not force:
        raise UserError(f"{dst}: already holds a PEFT adapter (use --force to replace it)")
    weights = mx.load(os.path.join(adapter, WEIGHTS))
    # "model.layers.0.self_attn.q_proj.lora_A" -> "base_model.model.<same>.weight"
    out = {f"base_model.model.{name}.weight": w.astype(mx.float32) for name, w in weights.items()}
    layers = None
    if cfg.get("num_layers") is not None:
        if num_hidden_layers is None:
            raise UserError(
                f"{adapter}: adapts only the last {cfg['num_layers']} layers; "
                "exporting needs the base model (--model)"
            )
        layers = list(range(num_hidden_layers - cfg["num_layers"], num_hidden_layers))
    targets = sorted(TARGETS[t].split(".")[-1] for t in cfg["targets"])
    modules = sorted({name.rsplit(".", 1)[0] for name in weights})
    if any(".mlp.shared_expert." in m for m in modules):
        # Qwen2-MoE: a name list would also match every routed expert's gate/up/down_proj; PEFT full-matches
        # a string against each module path, so name exactly the adapted modules.
        targets, layers = "|".join(re.escape(m) for m in modules), None
    os.makedirs(dst, exist_ok=True)
    tmp = os.path.join(dst, f".tmp{os.getpid()}.safetensors")
    mx.save_safetensors(tmp, out, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(dst, "adapter_model.safetensors"))
    write_json(
        os.path.join(dst, "adapter_config.json"),
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model or cfg.get("base_model"),
            "r": cfg["rank"],
            "lora_alpha": cfg["alpha"],
            "lora_dropout": cfg.get("dropout", 0.0),
            "target_modules": targets,
            "layers_to_transform": layers,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "modules_to_save": None,
        },
    )
    return dst
