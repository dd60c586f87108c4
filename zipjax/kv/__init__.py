"""Compressed KV caches as pytrees with the dense cache's interface: quantization (ZipCache, KIVI, uniform),
layer-adaptive important tokens with sparse prefill (ZipVL), cross-layer merging (MiniCache, optionally over KIVI).

    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))
    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.MiniCache(t=0.6, gamma=0.05, inner=zipjax.kv.KIVI(4)))
"""

from zipjax.kv.cache import QuantizedKVCache
from zipjax.kv.merged import MergedKVCache
from zipjax.kv.methods import KIVI, Method, MiniCache, QuantSpec, Uniform, ZipCache, ZipVL

__all__ = ["KIVI", "MergedKVCache", "Method", "MiniCache", "QuantSpec", "QuantizedKVCache", "Uniform", "ZipCache",
           "ZipVL"]
