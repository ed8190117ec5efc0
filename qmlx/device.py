"""Per-device choices: the compute dtype, and wiring memory on Metal.

Kept apart from the model so the model never reads device state or flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError
from .folder import DTYPES


def gpu_available() -> bool:
    return bool(mx.metal.is_available())


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend, bfloat16 on a GPU.

    Measured on MLX's CPU backend: quantized matmuls with bf16 activations are ~8x slower,
    and with fp16 ~40x slower, than with float32; on Metal, bf16 halves memory traffic.
    """
    return mx.bfloat16 if gpu_available() else mx.float32


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype:
    if name is None or name == "auto":
        return default_dtype()
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)} or 'auto'") from None


@dataclass
class WiringPlan:
    limit: int  # bytes to wire (0: nothing)
    warning: str | None


def plan_wiring(model_bytes: int, cache_bytes: int, recommended: int) -> WiringPlan:
    """How much to wire for a model plus its KV cache, given the GPU's recommended working set.

    Wiring keeps the weights resident so macOS does not page them out between tokens; wiring
    more than the recommended working set is refused by the OS, so the limit is capped there.
    """
    need = model_bytes + cache_bytes
    warning = None
    if model_bytes > recommended:
        warning = (
            f"the model needs {model_bytes / 2**30:.1f} GB but this GPU's recommended working set "
            f"is {recommended / 2**30:.1f} GB: expect heavy swapping; use a smaller or more "
            "quantized model"
        )
    elif need > recommended:
        warning = (
            f"model + cache need {need / 2**30:.1f} GB, above the recommended working set of "
            f"{recommended / 2**30:.1f} GB: a long context may swap; consider --kv-bits or --max-kv-size"
        )
    return WiringPlan(limit=min(need, recommended), warning=warning)


def wire_memory(
    model_bytes: int,
    cache_bytes: int = 0,
    *,
    device_info: Callable[[], dict] | None = None,
    set_wired_limit: Callable[[int], object] | None = None,
    available: bool | None = None,
) -> WiringPlan | None:
    """On Metal, wire the model's and cache's memory and warn before it cannot fit.

    Does nothing on the CPU backend. The callables are injectable so the logic is testable
    on machines without Metal.
    """
    if not (gpu_available() if available is None else available):
        return None
    info = (device_info or mx.metal.device_info)()
    recommended = int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    plan = plan_wiring(model_bytes, cache_bytes, recommended)
    if plan.warning:
        warnings.warn(plan.warning, stacklevel=2)
    (set_wired_limit or mx.set_wired_limit)(plan.limit)
    return plan


def tree_nbytes(params) -> int:
    """Total bytes of an MLX parameter tree."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(params))
