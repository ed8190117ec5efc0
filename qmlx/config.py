"""Model configuration: a dataclass whose fields are the keys of a Qwen2 `config.json`.

Unknown keys are ignored (hub configs carry many that do not change the computation); values
qmlx cannot honour are refused with a `ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .folder import read_json


class ConfigError(UserError):
    """A config.json that qmlx cannot run; the message names the file and field."""


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
# transformers' Qwen2MoeConfig defaults, for the mixture-of-experts fields a qwen2_moe config omits.
MOE_DEFAULTS = {
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "mlp_only_layers": [],
    "qkv_bias": True,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None
    # Qwen2-MoE (model_type qwen2_moe); None for a dense qwen2 model (MOE_DEFAULTS fill them in).
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    decoder_sparse_step: int | None = None
    norm_topk_prob: bool | None = None
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool | None = None
    # The MLX community convention: {"group_size": 64, "bits": 4, "<layer path>": {...}, ...}
    quantization: dict | None = None

    # Derived, not read from JSON.
    source: str = field(default="config.json", repr=False, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            # Older configs omit it: plain multi-head attention.
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.model_type == "qwen2_moe":
            for name, default in MOE_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, list(default) if isinstance(default, list) else default)
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"}
        kwargs = {k: v for k, v in d.items() if k in names}
        # transformers v5 writes `rope_parameters` instead of rope_theta/rope_scaling.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            kwargs.setdefault("rope_theta", rp.get("rope_theta", cls.rope_theta))
            if rp.get("rope_type", "default") != "default" and "rope_scaling" not in d:
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if "quantization" not in kwargs and isinstance(d.get("quantization_config"), dict):
            qc = d["quantization_config"]
            if "bits" in qc and "group_size" in qc:
                kwargs["quantization"] = qc
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in kwargs
        ]
        if missing:
            raise ConfigError(f"{source}: missing required field {missing[0]!r}")
        return cls(**kwargs, source=source)

    @classmethod
    def from_file(cls, path: str) -> ModelConfig:
        d = read_json(path, ConfigError, missing="a model folder needs a config.json")
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return {k: v for k, v in d.items() if v is not None}

    # ------------------------------------------------------------------ validation
    def _fail(self, name: str, why: str):
        raise ConfigError(f"{self.source}: field {name!r} {why}")

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            self._fail(
                "model_type",
                f"is {self.model_type!r}; qmlx runs Qwen2/Qwen2.5 models ({', '.join(SUPPORTED_MODEL_TYPES)})",
            )
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                self._fail(name, f"must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            self._fail(
                "num_key_value_heads",
                f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})",
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            self._fail(
                "head_dim",
                f"({self.head_dim}) × num_attention_heads ({self.num_attention_heads}) "
                f"must equal hidden_size ({self.hidden_size})",
            )
        if self.head_dim % 2:
            self._fail("head_dim", f"must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            self._fail("hidden_act", f"is {self.hidden_act!r}; Qwen2 uses 'silu'")
        if self.use_sliding_window:
            # transformers applies it only to some layers; no released Qwen2.5 enables it.
            self._fail("use_sliding_window", "is true; sliding-window attention is not supported")
        if not isinstance(self.rms_norm_eps, (int, float)) or not 0 < self.rms_norm_eps < 1:
            self._fail("rms_norm_eps", f"must be a small positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            self._fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        self._validate_rope_scaling()
        self._validate_quantization()
        if self.is_moe:
            self._validate_moe()

    def _validate_moe(self) -> None:
        for name in (
            "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "shared_expert_intermediate_size"
        ):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                self._fail(name, f"must be a positive integer, got {v!r}")
        v = self.num_experts
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            self._fail("num_experts", f"must be a non-negative integer, got {v!r}")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            self._fail(
                "num_experts_per_tok",
                f"({self.num_experts_per_tok}) must not exceed num_experts ({self.num_experts})",
            )
        for name in ("norm_topk_prob", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, f"must be true or false, got {getattr(self, name)!r}")
        layers = self.mlp_only_layers
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            self._fail("mlp_only_layers", f"must be a list of layer numbers, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            self._fail("mlp_only_layers", f"names layer {bad[0]}, outside 0..{self.num_hidden_layers - 1}")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            self._fail("rope_scaling", f"must be an object or null, got {rs!r}")
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            self._fail(
                "rope_scaling",
                f"has type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
            )
        if kind in ("linear", "yarn"):
            f = rs.get("factor")
            if not isinstance(f, (int, float)) or f <= 0:
                self._fail("rope_scaling", f"needs a positive 'factor' for type {kind!r}, got {f!r}")

    def _validate_quantization(self) -> None:
        q = self.quantization
        if q is None:
            return
        if not isinstance(q, dict):
            self._fail("quantization", f"must be an object, got {q!r}")
        for key in ("bits", "group_size"):
            if not isinstance(q.get(key), int):
                self._fail("quantization", f"needs an integer {key!r}, got {q.get(key)!r}")
        mode = q.get("mode", "affine")
        if mode != "affine":
            self._fail("quantization", f"has mode {mode!r}; qmlx supports 'affine'")

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen2_moe"

    def sparse_layer(self, index: int) -> bool:
        """Whether block `index` holds routed experts (transformers' rule) rather than a dense MLP."""
        return (
            self.is_moe
            and self.num_experts > 0
            and index not in self.mlp_only_layers
            and (index + 1) % self.decoder_sparse_step == 0
        )

    @property
    def attention_bias(self) -> bool:
        """q/k/v projections carry a bias: always in Qwen2; per `qkv_bias` in Qwen2-MoE."""
        return bool(self.qkv_bias) if self.is_moe else True

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters from the shapes alone. They differ only for a
        mixture of experts, where a token runs `num_experts_per_tok` of the `num_experts`."""
        d, v = self.hidden_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = 2 * d * q + 2 * d * kv + 2 * d + (q + 2 * kv if self.attention_bias else 0)
        total = active = v * d * (1 if self.tie_word_embeddings else 2) + d
        for i in range(self.num_hidden_layers):
            total, active = total + attention, active + attention
            if not self.sparse_layer(i):
                total, active = (
                    total + 3 * d * self.intermediate_size,
                    active + 3 * d * self.intermediate_size,
                )
                continue
            expert = 3 * d * self.moe_intermediate_size
            always = d * self.num_experts + 3 * d * self.shared_expert_intermediate_size + d
            total += always + self.num_experts * expert
            active += always + self.num_experts_per_tok * expert
        return total, active

    def summary(self) -> str:
        """One line for people: type, depth, parameters (active ones for a mixture of experts), bits."""
        total, active = self.parameter_counts()
        line = f"{self.model_type}, {self.num_hidden_layers} layers, {_count(total)} parameters"
        if self.is_moe:
            line += (
                f" ({_count(active)} active per token: {self.num_experts_per_tok} of {self.num_experts} "
                "experts and a shared expert)"
            )
        q = self.quantization
        return line + (f", {q.get('bits')}-bit (group {q.get('group_size')})" if q else "")

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    def rope_frequencies(self) -> tuple[list[float] | None, float]:
        """Inverse frequencies for RoPE (None for the plain schedule) and the attention factor.

        YaRN follows transformers' `_compute_yarn_parameters` exactly: frequencies blended between
        interpolation and extrapolation by a linear ramp over the correction range, and cos/sin
        scaled by `0.1·ln(factor) + 1` (which qmlx applies to q and k before RoPE, the same thing).
        """
        dim = self.head_dim
        base = float(self.rope_theta)
        kind = self.rope_type
        pos = [base ** (i / dim) for i in range(0, dim, 2)]
        if kind == "default":
            return None, 1.0
        rs = self.rope_scaling
        factor = float(rs["factor"])
        if kind == "linear":
            return [1.0 / (factor * p) for p in pos], 1.0
        # yarn
        orig = rs.get("original_max_position_embeddings") or self.max_position_embeddings
        attention_factor = rs.get("attention_factor")
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        inv = []
        for i, p in enumerate(pos):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            extrapolation = 1.0 - ramp
            inv.append((1.0 / (factor * p)) * (1 - extrapolation) + (1.0 / p) * extrapolation)
        return inv, float(attention_factor)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [e] if isinstance(e, int) else list(e)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
