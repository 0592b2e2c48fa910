"""Llama-family model configuration, parsed from a Hugging Face `config.json`.

`ModelConfig` is frozen and validated once, when built, so that the loader, the model and the
engine never re-check shapes. It reads both the classic layout (`rope_theta` plus `rope_scaling`,
Llama 2 / 3 / 3.1 / 3.2 checkpoints) and the newer `rope_parameters` layout that transformers 5
writes. The module imports no torch: the engine can size pools from it without touching tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


class ModelConfigError(ValueError):
    """A config.json that neod cannot serve; the message names the offending field."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `llama3` slows low frequencies (Llama 3.1/3.2), `linear` all."""

    rope_type: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ModelConfigError(
                f"rope_scaling.rope_type {self.rope_type!r} is not supported "
                "(supported: 'llama3', 'linear')"
            )
        _require(
            _is_number(self.factor) and self.factor > 0,
            "rope_scaling.factor",
            "a number > 0",
            self.factor,
        )
        if self.rope_type == "llama3":
            _require(
                _is_number(self.low_freq_factor) and self.low_freq_factor > 0,
                "rope_scaling.low_freq_factor",
                "a number > 0",
                self.low_freq_factor,
            )
            _require(
                _is_number(self.high_freq_factor) and self.high_freq_factor > self.low_freq_factor,
                "rope_scaling.high_freq_factor",
                f"a number > low_freq_factor ({self.low_freq_factor})",
                self.high_freq_factor,
            )
            _require(
                _is_int(self.original_max_position_embeddings)
                and self.original_max_position_embeddings > 0,
                "rope_scaling.original_max_position_embeddings",
                "an integer > 0",
                self.original_max_position_embeddings,
            )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of them ends a request
    torch_dtype: str = "bfloat16"  # the checkpoint's dtype; the engine may run in another

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, "an integer > 0", value)
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
            self.num_key_value_heads,
        )
        _require(
            self.head_dim % 2 == 0, "head_dim", "an even integer (rotary embedding)", self.head_dim
        )
        _require(
            _is_number(self.rms_norm_eps) and self.rms_norm_eps > 0,
            "rms_norm_eps",
            "a number > 0",
            self.rms_norm_eps,
        )
        _require(
            _is_number(self.rope_theta) and self.rope_theta > 0,
            "rope_theta",
            "a number > 0",
            self.rope_theta,
        )
        _require(
            self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
            "rope_scaling",
            "None or a RopeScaling",
            self.rope_scaling,
        )
        _require(
            isinstance(self.tie_word_embeddings, bool),
            "tie_word_embeddings",
            "a boolean",
            self.tie_word_embeddings,
        )
        if self.bos_token_id is not None:
            _require(
                _is_int(self.bos_token_id) and 0 <= self.bos_token_id < self.vocab_size,
                "bos_token_id",
                f"an integer in [0, vocab_size={self.vocab_size})",
                self.bos_token_id,
            )
        _require(
            isinstance(self.eos_token_ids, tuple)
            and all(_is_int(t) and 0 <= t < self.vocab_size for t in self.eos_token_ids),
            "eos_token_id",
            f"integers in [0, vocab_size={self.vocab_size})",
            self.eos_token_ids,
        )
        _require(
            self.torch_dtype in SUPPORTED_DTYPES,
            "torch_dtype",
            f"one of {SUPPORTED_DTYPES}",
            self.torch_dtype,
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count, the tied LM head counted once."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache bytes one token takes over all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the parsed contents of a Hugging Face Llama `config.json`."""
        if not isinstance(raw, dict):
            raise ModelConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported (supported: 'llama')"
            )
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ModelConfigError(
                f"hidden_act {hidden_act!r} is not supported (supported: 'silu')"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag, False):
                raise ModelConfigError(
                    f"{flag}=true is not supported (Llama projections have no bias)"
                )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if name not in raw:
                raise ModelConfigError(f"config.json lacks the required field {name!r}")

        num_heads = raw["num_attention_heads"]
        hidden_size = raw["hidden_size"]
        head_dim = raw.get("head_dim")
        if head_dim is None:
            _require(
                _is_int(num_heads)
                and num_heads > 0
                and _is_int(hidden_size)
                and hidden_size % num_heads == 0,
                "hidden_size",
                f"a multiple of num_attention_heads ({num_heads}) when head_dim is absent",
                hidden_size,
            )
            head_dim = hidden_size // num_heads
        num_kv_heads = raw.get("num_key_value_heads")
        rope_theta, rope_scaling = _parse_rope(raw)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_parse_eos(raw.get("eos_token_id")),
            torch_dtype=_parse_dtype(raw.get("torch_dtype", raw.get("dtype"))),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read `<model_dir>/config.json`."""
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"no config.json in {model_dir}") from None
        except json.JSONDecodeError as err:
            raise ModelConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(raw)


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either `rope_theta` + `rope_scaling` or `rope_parameters`."""
    field = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(field) or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{field} must be an object, got {params!r}")
    params = dict(params)
    rope_theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    if "factor" not in params:
        raise ModelConfigError(f"rope_scaling of type {rope_type!r} lacks the field 'factor'")
    if rope_type == "linear":
        return rope_theta, RopeScaling(rope_type="linear", factor=params["factor"])
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
        if missing:
            raise ModelConfigError(f"rope_scaling of type 'llama3' lacks the field {missing[0]!r}")
        original = params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings")
        )
        if original is None:
            raise ModelConfigError(
                "rope_scaling of type 'llama3' lacks 'original_max_position_embeddings'"
            )
        return rope_theta, RopeScaling(
            rope_type="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position_embeddings=original,
        )
    raise ModelConfigError(
        f"rope_scaling.rope_type {rope_type!r} is not supported (supported: 'llama3', 'linear')"
    )


def _parse_eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def _parse_dtype(value: Any) -> str:
    if value is None:
        return "bfloat16"
    if not isinstance(value, str):
        raise ModelConfigError(f"torch_dtype must be a string, got {value!r}")
    name = value.removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise ModelConfigError(f"{field} must be {expected}, got {got!r}")
