"""Offline conversion of Qwen2 weights into quantized qmlx/MLX folders (`qmlx convert`).

Sources: a Hugging Face folder or hub repo id, a quantized qmlx/MLX folder (with
`dequantize=True`), or a GGUF file. See `convert.convert`.
"""

from .errors import ConvertError
from .pipeline import convert

__all__ = ["ConvertError", "convert"]
