"""qmlx: a local runtime for Qwen2 / Qwen2.5 models on Apple's MLX."""

import signal as _signal
import threading as _threading

from ._blas import preload as _preload_blas


def _start_mlx() -> None:
    """Load OpenBLAS, then start MLX's worker threads with SIGINT blocked in them.

    A Ctrl-C delivered to one of MLX's (or OpenBLAS's) threads instead of Python's main
    thread can wedge a pending evaluation; threads inherit the creator's signal mask, so
    blocking SIGINT while they are created keeps every Ctrl-C on the main thread.
    """
    mask = hasattr(_signal, "pthread_sigmask") and _threading.current_thread() is _threading.main_thread()
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT}) if mask else None
    try:
        _preload_blas()  # must run before mlx.core is imported anywhere
        import mlx.core as mx

        mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
    finally:
        if mask:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old)


_start_mlx()

from . import loader as _loader  # noqa: E402
from .generate import GenerationEvent, generate, stream_generate  # noqa: E402


def load(path_or_repo: str, dtype=None, lazy: bool = False, adapter: str | None = None):
    """Load a Qwen2 model and its tokenizer from a folder or a hub repo id: (model, tokenizer).

    `dtype=None` picks per device: float32 on the CPU backend, bfloat16 on a GPU. `adapter`
    is a folder written by `qmlx lora`; its LoRA layers are put over the model's (here, above
    the loader, so that the loader needs nothing of the lora room).
    """
    folder = _loader.resolve(path_or_repo)
    model = _loader.load_model(folder, dtype=dtype, lazy=lazy)
    if adapter is not None:
        from .lora.adapters import load_adapter

        load_adapter(model, adapter)
    return model, _loader.tokenizer_for(folder, model.config)


__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationEvent", "__version__"]
