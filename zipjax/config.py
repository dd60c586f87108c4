"""Model configuration: one frozen, hashable dataclass shared by LLaMA (2, 3, 3.1), Mistral and Emu3's language model.

It is hashable so that it can be a static argument of `jax.jit`. What the architectures differ in is expressed as
fields (RoPE scaling, sliding window, tied embeddings), not as separate model classes. The JSON form written into
zipjax checkpoints is `ModelConfig.to_dict()`; converters build a `ModelConfig` from Hugging Face or GGUF metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from zipjax.errors import ZipjaxError
from zipjax.validate import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    boolean,
    integer,
    integers,
    number,
    optional,
    string,
)

ARCHITECTURES = ("llama", "mistral", "emu3")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `type` is one of `ROPE_TYPES` (the scaling fields are unused by "default")."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        string(self.type, "RoPE type", ROPE_TYPES)
        number(self.theta, "RoPE theta", lo=0, hi=1e12, lo_open=True)
        number(self.factor, "RoPE scaling factor", lo=0, hi=1e6, lo_open=True)
        number(self.low_freq_factor, "RoPE low_freq_factor", lo=0, hi=1e6, lo_open=True)
        number(self.high_freq_factor, "RoPE high_freq_factor", lo=0, hi=1e6, lo_open=True)
        integer(self.original_max_position_embeddings, "RoPE original_max_position_embeddings", lo=1,
                hi=MAX_POSITIONS)
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ZipjaxError(
                f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {self.high_freq_factor} <= "
                f"{self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LLaMA-family transformer. `dtype` is the dtype the parameters are stored and computed in."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        string(self.architecture, "architecture", ARCHITECTURES)
        limits = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
                  "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS,
                  "head_dim": MAX_HEAD_DIM, "max_position_embeddings": MAX_POSITIONS}
        for name, limit in limits.items():
            integer(getattr(self, name), f"config field {name}", lo=1, hi=limit)
        number(self.rms_norm_eps, "config field rms_norm_eps", lo=0, hi=1, lo_open=True)
        if not isinstance(self.rope, RopeConfig):
            raise ZipjaxError(f"config field rope must be a RopeConfig, got {type(self.rope).__name__}")
        optional(integer, self.sliding_window, "config field sliding_window", lo=1, hi=MAX_POSITIONS)
        boolean(self.tie_word_embeddings, "config field tie_word_embeddings")
        string(self.dtype, "config field dtype", DTYPES)
        if self.num_heads % self.num_kv_heads:
            raise ZipjaxError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ZipjaxError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("bos_token_id", "pad_token_id"):
            optional(integer, getattr(self, name), f"config field {name}", lo=0, hi=self.vocab_size - 1)
        if not isinstance(self.eos_token_ids, tuple):
            raise ZipjaxError(f"config field eos_token_ids must be a tuple of ids, got {self.eos_token_ids!r}")
        integers(self.eos_token_ids, "config field eos_token_ids", lo=0, hi=self.vocab_size - 1)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    @property
    def pad_id(self) -> int:
        """The id written after a sequence stopped: pad, else the first EOS, else 0 (as transformers does)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attn + mlp + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * layer + self.hidden_size + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown or missing keys are errors (they mean a file of another format)."""
        if not isinstance(d, dict):
            raise ZipjaxError(f"a model config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ZipjaxError(f"unknown model config keys: {', '.join(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ZipjaxError(f"model config is missing keys: {', '.join(missing)}")
        d = dict(d)
        rope = d.get("rope", {})
        if not isinstance(rope, dict):
            raise ZipjaxError("model config key 'rope' must be an object")
        rope_fields = {f.name for f in dataclasses.fields(RopeConfig)}
        if set(rope) - rope_fields:
            raise ZipjaxError(f"unknown rope config keys: {', '.join(sorted(set(rope) - rope_fields))}")
        d["rope"] = RopeConfig(**rope)
        d["eos_token_ids"] = integers(d.get("eos_token_ids", ()), "config field eos_token_ids")
        return cls(**d)


# The published models' shapes (their config.json files, in zipjax's terms), for eval_shape checks and ahead-of-time
# compilation at real size without downloading any weights. Token ids are left out: only shapes matter there.
PUBLISHED: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
                              rope=RopeConfig(theta=500000.0), dtype="bfloat16"),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 parameters; 8 KV heads, so a 16-way "model" axis cannot split them
    "llama-3-70b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                               num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                               max_position_embeddings=8192, rope=RopeConfig(theta=500000.0), dtype="bfloat16"),
    "mistral-7b": ModelConfig(architecture="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                              rope=RopeConfig(theta=10000.0), sliding_window=4096, dtype="bfloat16"),
    "emu3-gen": ModelConfig(architecture="emu3", vocab_size=184622, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=9216,
                            rope=RopeConfig(theta=1e6), dtype="bfloat16"),
}
