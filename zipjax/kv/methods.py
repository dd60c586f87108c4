"""The methods by name, and the factory from a `kv=` argument (None, or a `Method`) to the cache that runs it.

    kv.METHODS["zipcache"]                       # ZipCache: the one registry the CLI and the benchmarks read
    method = kv.method_from_name("kivi", bits=4, kernel=True)
    cache = init_cache(ZipCache(), config, batch, max_len, prefill_len, starts)   # a QuantizedKVCache
    init = cache_initializer(config, batch, max_len, mesh, ZipCache(), prefill_len)  # jitted, placed on the mesh

The factory asks the method (`check`, `decode_slots`, `make_cache`, zipjax.kv.method.Method) and never tests its type;
None is the dense cache. `generate` and the image decoders depend on this module and on the `Cache` protocol only,
never on the concrete cache classes. Imports: dense, method, the methods (zipcache, kivi, uniform, zipvl, minicache),
sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.dense import KVCache
from zipjax.kv.kivi import KIVI
from zipjax.kv.method import Method, as_method
from zipjax.kv.minicache import MiniCache
from zipjax.kv.uniform import Uniform
from zipjax.kv.zipcache import ZipCache
from zipjax.kv.zipvl import ZipVL
from zipjax.platform import free_memory_bytes
from zipjax.sharding import jit_initializer

__all__ = ["METHODS", "CacheRecipe", "as_method", "attention_nbytes", "cache_initializer", "cache_nbytes",
           "check_cache", "check_free_memory", "check_memory", "init_cache", "method_from_name", "min_decode_slots"]

METHODS: dict[str, type[Method]] = {method.name: method for method in (ZipCache, KIVI, Uniform, ZipVL, MiniCache)}


def method_from_name(name: str, **fields) -> Method:
    """The method registered as `name` (zipjax.kv.METHODS), built with `fields` (e.g. kernel=True, bits=4)."""
    if name not in METHODS:
        raise ZipjaxError(f"no KV method named {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[name](**fields)
    except TypeError as error:  # an unknown field: the dataclass names it
        raise ZipjaxError(f"{name}: {error}") from None


def check_cache(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
    """Geometry errors (bit packing, window, layers) at the call site, not inside jit."""
    if kv is not None:
        kv.check(config, batch, max_len, prefill_len)


def min_decode_slots(kv: Method | None) -> int:
    """Cache slots a method needs after the prompt (a quantized cache's full-precision buffer must fit)."""
    return 0 if kv is None else kv.decode_slots


def init_cache(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
               starts: jax.Array | None = None, dtype: jnp.dtype | None = None) -> Cache:
    """An empty cache for `kv`: the dense cache (None), or the one the method makes."""
    if kv is None:
        return KVCache.init(config, batch, max_len, starts, dtype)
    return kv.make_cache(config, batch, max_len, prefill_len, starts, dtype)


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


@functools.lru_cache(maxsize=256)
def cache_nbytes(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> int:
    """Bytes the cache of `kv` would hold, from its shapes alone: nothing is allocated."""
    starts = jax.ShapeDtypeStruct((batch,), jnp.int32)
    shapes = jax.eval_shape(CacheRecipe(config, batch, max_len, kv, prefill_len), starts)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def check_memory(kv: Method | None, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                 devices: int = 1) -> None:
    """Refuse, before anything is allocated, a cache that cannot fit the free memory of a device (its share on a
    mesh of `devices`): a model allowing millions of positions, say, or a KIVI residual of a billion tokens."""
    need = (cache_nbytes(kv, config, batch, max_len, prefill_len) + attention_nbytes(config, batch, max_len)) / devices
    name = "the dense KV cache" if kv is None else f"the {kv.name} KV cache"
    check_free_memory(need, f"{name} of {batch} x {max_len} slots, with attention's working set,",
                      "ask for fewer tokens or sequences")


def attention_nbytes(config: ModelConfig, batch: int, max_len: int) -> int:
    """What attention reads at once besides the cache: one layer's keys and values of every slot in float32 (a
    compressed cache dequantizes them, a bfloat16 one is cast)."""
    return 2 * batch * config.num_kv_heads * max_len * config.head_dim * 4


def check_free_memory(need: float, what: str, advice: str) -> None:
    """Refuse `need` bytes per device (an estimate from shapes: nothing is allocated yet) that the device's free
    memory (zipjax.platform.free_memory_bytes) cannot hold, in one line naming `what` and the `advice`."""
    free = free_memory_bytes()
    if free is not None and need > free:
        raise ZipjaxError(f"{what} needs {need / 2**30:.2f} GiB per device, more than the {free / 2**30:.2f} GiB "
                          f"free; {advice}")
