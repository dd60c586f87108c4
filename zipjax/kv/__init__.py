"""Compressed KV caches: quantization methods (ZipCache, KIVI, uniform) as pure transforms of a cache pytree.

    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))
"""

from zipjax.kv.cache import QuantizedKVCache
from zipjax.kv.methods import KIVI, Method, QuantSpec, Uniform, ZipCache

__all__ = ["KIVI", "Method", "QuantSpec", "QuantizedKVCache", "Uniform", "ZipCache"]
