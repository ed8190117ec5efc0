"""The small files around the weights: config.json, the shard index and a model card."""

from __future__ import annotations

import json
import os

from qmlx.quant.recipes import RECIPES, summarize


def write_config(folder: str, source_config: dict, quantization: dict | None, dtype_name: str) -> None:
    """config.json: the source's, with the output dtype and (if quantized) the quantization.

    `quantization_config` repeats `quantization` because mlx-lm writes both (Hugging Face tools
    look for the former).
    """
    config = {k: v for k, v in source_config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype_name
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def write_index(folder: str, weight_map: dict[str, str], total_size: int, n_params: int) -> None:
    index = {
        "metadata": {"total_size": total_size, "total_parameters": n_params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def write_card(
    folder: str,
    name: str,
    source: str,
    quantization: dict | None,
    recipe: str | None,
    layers: dict[str, int],
    total_size: int,
    n_params: int,
    dtype_name: str,
) -> None:
    """README.md: where the model came from, how it was converted, its size and bits per weight."""
    bpw = 8 * total_size / max(n_params, 1)
    if quantization is None:
        title = f"{name} ({dtype_name})"
        settings = [("weights", f"unquantized, {dtype_name}")]
    else:
        title = f"{name} ({quantization['bits']}-bit, group size {quantization['group_size']})"
        counts = summarize(quantization, layers)
        by_bits = ", ".join(
            f"{n} layers at {b} bits" if b else f"{n} layers unquantized"
            for b, n in sorted(counts.items(), reverse=True)
        )
        settings = [
            ("bits", str(quantization["bits"])),
            ("group size", str(quantization["group_size"])),
            ("recipe", f"{recipe or 'uniform'} ({RECIPES.get(recipe or 'uniform', 'custom mix')})"),
            ("layers", by_bits),
            ("scales and biases", dtype_name),
        ]
    rows = [("source", f"`{source}`"), *settings]
    rows += [
        ("parameters", f"{n_params / 1e6:,.0f} M"),
        ("size on disk", f"{total_size / 1e9:.2f} GB"),
        ("bits per weight", f"{bpw:.2f}"),
    ]
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, qmlx, qwen2]",
        "---",
        f"# {title}",
        "",
        f"Converted with `qmlx convert` from `{source}`. Loads in qmlx and in mlx-lm.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "```sh",
        f'qmlx generate --model {name} --prompt "Write a haiku about the sea."',
        "```",
        "",
    ]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
