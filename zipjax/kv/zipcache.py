"""ZipCache (He et al., NeurIPS 2024): salient tokens at high bits, the rest at low bits, cached by QuantizedKVCache.

    zipjax.generate(model, ids, n, kv=ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))

Saliency is the normalized attention score (zipjax.kv.saliency, probe-approximated by default); keys are quantized
channel-wise, values channel-separable token-wise (CST). New tokens stay in full precision until `buffer_len` of them
have been generated, then are ranked by the attention each received while buffered and compressed (streaming, paper
§5.1). A block of n tokens keeps n - int((1 - saliency_ratio) n) salient, as the official code. Decode attention runs
the Pallas kernel over the packed codes on TPU / GPU (`kernel=None`).

Imports: method, quantizing, quantized, saliency.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from zipjax.config import ModelConfig
from zipjax.deprecation import renamed_fields
from zipjax.errors import ZipjaxError
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.quantizing import MixedPrecision, Ranking, buffer_score
from zipjax.kv.saliency import NORMALIZATIONS, prompt_saliency


@renamed_fields(window="buffer_len")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ZipCache(MixedPrecision):
    """ZipCache's mixed-precision cache; the shared fields (bits, saliency, probes, buffer_len, seed, kernel) are
    `MixedPrecision`'s. `normalize`: the official code's normalizer ("code", measured better than "probe":
    benchmarks/kvcache.py)."""

    name: ClassVar[str] = "zipcache"
    saliency_ratio: float = 0.6
    normalize: str = "code"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.saliency_ratio <= 1:
            raise ZipjaxError(f"saliency_ratio must lie in (0, 1], got {self.saliency_ratio}")
        if self.normalize not in NORMALIZATIONS:
            raise ZipjaxError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype=None) -> QuantizedKVCache:
        return QuantizedKVCache.init(config, self, batch, max_len, prefill_len, starts, dtype)

    @property
    def subset_bits(self) -> tuple[int, int]:
        return self.high_bits, self.low_bits

    def split(self, n: int) -> tuple[int, int]:
        """int((1 - r) n) regular tokens, as ZipCache's code."""
        regular = int((1.0 - self.saliency_ratio) * n + 1e-9)
        return n - regular, regular

    def rank_prompt(self, q, k, starts, layer):
        key = jax.random.fold_in(jax.random.key(self.seed), layer)
        score = prompt_saliency(q, k, starts, method=self.saliency, probe_ratio=self.probe_ratio,
                                normalize=self.normalize, key=key)
        return Ranking(jnp.argsort(-score, axis=-1, stable=True))

    def rank_buffer(self, mass):
        return Ranking(jnp.argsort(-buffer_score(mass), axis=-1, stable=True))
