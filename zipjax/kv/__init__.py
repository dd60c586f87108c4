"""KV caches as pytrees behind the `zipjax.cache.Cache` contract: the dense cache, and the compressed ones:
quantization (ZipCache, KIVI, uniform), layer-adaptive important tokens with sparse prefill (ZipVL), cross-layer
merging (MiniCache, optionally over KIVI).

    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))
    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.MiniCache(t=0.6, gamma=0.05, inner=zipjax.kv.KIVI(bits=4)))

Modules, each importing only those listed before it: codec (quantize, pack, stores), saliency / zipvl / minicache
(the methods' algorithms), spec (the methods and the quantized geometry), dense / quantized / kivi / sparse /
merged (the caches), methods (the factory from a `kv=` argument to its cache), analysis (per-layer states for
studies and tests).
"""

from zipjax.kv.dense import KVCache
from zipjax.kv.kivi import KIVICache
from zipjax.kv.merged import MergedKVCache
from zipjax.kv.methods import as_method, cache_initializer, init_cache
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.spec import KIVI, Method, MiniCache, QuantMethod, Uniform, ZipCache, ZipVL

__all__ = ["KIVI", "KIVICache", "KVCache", "MergedKVCache", "Method", "MiniCache", "QuantMethod", "QuantizedKVCache",
           "Uniform", "ZipCache", "ZipVL", "as_method", "cache_initializer", "init_cache"]
