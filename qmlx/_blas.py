"""Use the system OpenBLAS for MLX's CPU matmuls on Linux.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS; dense matmuls, which dominate
prompt processing, are ~10-50x faster through OpenBLAS. Loading `libopenblas.so.0` with
RTLD_GLOBAL *before* `mlx.core` is imported makes the dynamic linker resolve MLX's cblas
symbols to it. `QMLX_OPENBLAS=0` turns this off. Must not import mlx.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `qmlx --version` and debug output.
status = "not attempted"


def preload() -> str:
    """Load OpenBLAS globally if we are on Linux, it exists, and mlx.core is not loaded yet."""
    global status
    if not sys.platform.startswith("linux"):
        status = "not needed (not Linux)"
    elif os.environ.get("QMLX_OPENBLAS", "1").lower() in ("0", "false", "no", "off"):
        status = "off (QMLX_OPENBLAS=0): reference BLAS"
    elif "mlx.core" in sys.modules:
        status = "not loaded: mlx.core was imported before qmlx (import qmlx first)"
        if any(os.path.exists(p) for p in CANDIDATES):
            import warnings

            warnings.warn(
                "mlx.core was imported before qmlx, so qmlx could not load OpenBLAS for MLX: the few "
                "matmuls left to MLX use the reference BLAS (qmlx's own kernels are unaffected); "
                "import qmlx first",
                stacklevel=3,
            )
    else:
        path = os.environ.get("QMLX_OPENBLAS_PATH") or next(
            (p for p in CANDIDATES if os.path.exists(p)), None
        )
        if path is None:
            status = "not found: install libopenblas0-pthread for ~10x faster prompts"
        else:
            # OpenBLAS 0.3.21's own thread pool can deadlock in its exit handler
            # (blas_thread_shutdown_ joining a parked worker), hanging the process after
            # its work is done; MLX calls BLAS from its own worker thread anyway.
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                status = f"loaded {path}"
            except OSError as e:
                status = f"failed to load {path}: {e}"
    return status
