"""Uniform quantization: keys and values token-wise (or group-wise) at `bits`, the baseline the mixed-precision methods
are measured against, cached by QuantizedKVCache with ZipCache's streaming buffer of `buffer_len` full-precision tokens
(`window=`, its deprecated name, works for one release).

    zipjax.generate(model, ids, n, kv=Uniform(bits=4))

It has no Pallas kernel: its keys are token-wise, and the kernel folds per-channel key scales into the query; so
`kernel=True` is refused, and decode attention dequantizes in jax.numpy everywhere.

Imports: method, quantizing, quantized.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from zipjax.config import ModelConfig
from zipjax.deprecation import renamed_fields
from zipjax.kv.codec import Codec
from zipjax.kv.method import check_bits, check_field_types, check_group, check_positive, refuse_kernel
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.quantizing import QuantMethod


@renamed_fields(window="buffer_len")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform(QuantMethod):
    name: ClassVar[str] = "uniform"
    has_kernel: ClassVar[bool] = False
    bits: int = 4
    group: int | None = None
    buffer_len: int = 100
    kernel: bool | None = None

    def __post_init__(self):
        check_field_types(self)
        refuse_kernel("Uniform", self.kernel, "its keys are token-wise; the kernel reads channel-wise keys")
        check_bits("bits", self.bits)
        check_group(self.group)
        check_positive("buffer_len", self.buffer_len)

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype=None) -> QuantizedKVCache:
        return QuantizedKVCache.init(config, self, batch, max_len, prefill_len, starts, dtype)

    @property
    def codec(self) -> Codec:
        return Codec("token", "token", self.group)
