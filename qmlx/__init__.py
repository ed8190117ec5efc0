"""qmlx: a local runtime for Qwen2 / Qwen2.5 models on Apple's MLX."""

from ._blas import preload as _preload_blas

_preload_blas()  # must run before mlx.core is imported anywhere

from .generate import GenerationEvent, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationEvent", "__version__"]
