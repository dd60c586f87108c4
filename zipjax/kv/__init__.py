"""KV caches as pytrees behind the `zipjax.cache.Cache` contract: the dense cache, and the compressed ones:
quantization (ZipCache, KIVI, uniform), layer-adaptive important tokens with sparse prefill (ZipVL), cross-layer
merging (MiniCache, optionally over KIVI).

    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))
    tokens = zipjax.generate(model, ids, 64, kv=zipjax.kv.MiniCache(t=0.6, gamma=0.05, inner=zipjax.kv.KIVI(bits=4)))
    method = zipjax.kv.method_from_name("zipvl", kernel=None)   # by name, from zipjax.kv.METHODS

Each method implements `Method` (zipjax.kv.method: check, decode_slots, make_cache, name, has_kernel) in the file
named after it. Modules, each importing only those listed before it: codec (quantize, pack, stores), saliency / slerp
(algorithms), method (the protocol and shared checks), dense, quantizing (what the quantized cache reads of a method,
its geometry), quantized, sparse (the caches), the methods: zipcache, kivi (with KIVICache), uniform, zipvl (with its
important tokens and sparse prefill), minicache (with MergedKVCache); methods (the registry by name and the factory
from a `kv=` argument to its cache). The per-layer states for saliency studies are harness code
(zipjax.harness.kv_analysis).
"""

from zipjax.kv.dense import KVCache
from zipjax.kv.kivi import KIVI, KIVICache
from zipjax.kv.method import Method
from zipjax.kv.methods import METHODS, as_method, cache_initializer, init_cache, method_from_name
from zipjax.kv.minicache import MergedKVCache, MiniCache
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.quantizing import QuantMethod
from zipjax.kv.uniform import Uniform
from zipjax.kv.zipcache import ZipCache
from zipjax.kv.zipvl import ZipVL

__all__ = ["KIVI", "METHODS", "KIVICache", "KVCache", "MergedKVCache", "Method", "MiniCache", "QuantMethod",
           "QuantizedKVCache", "Uniform", "ZipCache", "ZipVL", "as_method", "cache_initializer", "init_cache",
           "method_from_name"]
