"""The method factory: from a `kv=` argument (None, or a method of zipjax.kv.spec) to the cache that runs it.

    cache = init_cache(ZipCache(), config, batch, max_len, prefill_len, starts)   # a QuantizedKVCache
    init = cache_initializer(config, batch, max_len, mesh, ZipCache(), prefill_len)  # jitted, placed on the mesh

`generate` and the image decoders depend on this module and on the `Cache` protocol only, never on the concrete
cache classes. Imports: the caches (dense, quantized, kivi, merged), spec, sharding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.dense import KVCache
from zipjax.kv.kivi import KIVICache
from zipjax.kv.merged import MergedKVCache
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.sparse import SparsePrefillKVCache
from zipjax.kv.spec import (
    KIVI,
    Method,
    MiniCache,
    QuantMethod,
    Uniform,
    ZipCache,
    ZipVL,
    check_block_sizes,
    geometry,
)
from zipjax.sharding import jit_initializer

METHODS = (ZipCache, KIVI, Uniform, ZipVL, MiniCache)


def as_method(kv) -> Method | None:
    """The `kv=` argument checked: None for the dense cache, or one of the methods; a clear error for anything else."""
    if kv is None or isinstance(kv, METHODS):
        return kv
    names = ", ".join(m.__name__ for m in METHODS)
    raise ZipjaxError(f"kv must be None or a zipjax.kv method ({names}), got {kv!r}")


def check_cache(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
    """Geometry errors (bit packing, window, layers) at the call site, not inside jit."""
    if isinstance(kv, ZipVL) and not kv.compress:
        check_block_sizes(batch, max_len, prefill_len)
    elif isinstance(kv, QuantMethod):
        geometry(config, kv, batch, max_len, prefill_len)
    elif isinstance(kv, MiniCache | KIVI):
        kv.check(config, batch, max_len, prefill_len)


def min_decode_slots(kv: Method | None) -> int:
    """Cache slots a method needs after the prompt: a quantized cache's full-precision buffer must fit."""
    dense = isinstance(kv, ZipVL) and not kv.compress
    return kv.buffer_len if isinstance(kv, QuantMethod) and not dense else 0


def init_cache(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
               starts: jax.Array | None = None, dtype: jnp.dtype | None = None) -> Cache:
    """An empty cache for `kv`: dense (None), quantized (ZipCache, Uniform, ZipVL), KIVI's or merged (MiniCache)."""
    if kv is None:
        return KVCache.init(config, batch, max_len, starts, dtype)
    cls = {MiniCache: MergedKVCache, KIVI: KIVICache}.get(type(kv), QuantizedKVCache)
    if isinstance(kv, ZipVL) and not kv.compress:
        cls = SparsePrefillKVCache
    return cls.init(config, kv, batch, max_len, prefill_len, starts, dtype)


@dataclasses.dataclass(frozen=True)
class CacheRecipe:
    """A hashable description of an empty cache; calling it with the sequences' start slots builds one."""

    config: ModelConfig
    batch: int
    max_len: int
    kv: Method | None = None
    prefill_len: int = 0

    def __call__(self, starts: jax.Array) -> Cache:
        return init_cache(self.kv, self.config, self.batch, self.max_len, self.prefill_len, starts)


def cache_initializer(config: ModelConfig, batch: int, max_len: int, mesh, kv: Method | None = None,
                      prefill_len: int = 0) -> Callable[[jax.Array], Cache]:
    """A jitted `starts -> empty cache`, compiled once per geometry, its arrays placed on `mesh` by their logical
    axes."""
    return jit_initializer(CacheRecipe(config, batch, max_len, kv, prefill_len), mesh)
