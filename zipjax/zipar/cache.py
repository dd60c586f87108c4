"""A KV cache written at arbitrary raster slots: what parallel (out-of-order) image decoding needs.

Sequential decoding appends at one cursor (`zipjax.KVCache`). ZipAR feeds several tokens per pass that sit in
different rows, so each pass scatters its K/V to the tokens' raster slots, and attention must see exactly the
tokens already decoded that precede the query in raster order. The cache therefore keeps a `written` bitmap per
sequence (adaptive schedules differ between sequences) and is told before each pass where each sequence's tokens go
(`at(slots, valid)`). A query at slot q sees key slot k iff written[k], k <= q, and k >= its sequence's start
(left-padded prompts); padding queries write to the last slot, which is never marked written. That
attention is `zipjax.kernels.zipar_attention`: its Pallas kernel or its jnp reference, as the decoder's `kernel`
(None, True or False) resolves through `zipjax.platform.use_kernel` when the pass is traced.

It implements the `zipjax.cache.Cache` contract, so the unchanged `Transformer` runs on it. `prefilled` starts every
parallel decoder the same way: an empty cache, the prompt written at slots 0 .. bucket - 1, the first image token;
with a compressed method (`kv=`) the cache is zipjax.zipar.compressed's band cache instead (KIVI:
zipjax.zipar.kivi_band's), with the same interface.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from zipjax.cache import KV_AXES, check_batch, replace_at
from zipjax.config import ModelConfig
from zipjax.emu3.decoding import ImageDecodeSetup, ImageInputs, initial_tokens, prefill
from zipjax.errors import ZipjaxError
from zipjax.kernels.zipar_attention import reference, zipar_attention
from zipjax.kv.kivi import KIVI
from zipjax.kv.method import Method
from zipjax.platform import use_kernel
from zipjax.sharding import jit_initializer, place, scatter_per_shard
from zipjax.zipar.compressed import BandKVCache, BandRecipe, band_kernel
from zipjax.zipar.kivi_band import KIVIBandCache, KIVIBandRecipe


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScatterKVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
    v: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
    written: jax.Array  # bool [batch, max_len]
    starts: jax.Array  # int32 [batch]: first slot of each sequence's prompt
    slots: jax.Array  # int32 [batch, q]: slots of the tokens of the current pass
    valid: jax.Array  # bool [batch, q]: False for padding queries
    kernel: bool | None = dataclasses.field(default=None, metadata=dict(static=True))  # see zipjax.platform
    accepts_chunks: ClassVar[bool] = False  # a pass writes where its schedule says, not at a cursor

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, starts: jax.Array,
             kernel: bool | None = None) -> ScatterKVCache:
        if batch <= 0 or max_len <= 1:
            raise ZipjaxError(f"a scatter KV cache needs batch > 0 and max_len > 1, got {batch}, {max_len}")
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_layers))
        return cls(k=zeros(), v=zeros(), written=jnp.zeros((batch, max_len), bool),
                   starts=jnp.asarray(starts, jnp.int32), slots=jnp.zeros((batch, 1), jnp.int32),
                   valid=jnp.zeros((batch, 1), bool), kernel=kernel)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def at(self, slots: jax.Array, valid: jax.Array, settled: jax.Array | None = None) -> ScatterKVCache:
        """The cache ready for a pass whose tokens go to `slots` ([q] shared by the batch, or [batch, q]); entries
        with valid False are padding. `settled` (which slots a later pass may rewrite) matters to the compressed
        band cache only (zipjax.zipar.compressed)."""
        shape = (self.batch, slots.shape[-1])
        slots, valid = jnp.broadcast_to(slots, shape), jnp.broadcast_to(valid, shape)
        slots = jnp.where(valid, slots, self.max_len - 1).astype(jnp.int32)
        return dataclasses.replace(self, slots=slots, valid=valid)

    def logical_axes(self) -> ScatterKVCache:
        spec = PartitionSpec(*KV_AXES)
        return dataclasses.replace(self, k=(spec,) * len(self.k), v=(spec,) * len(self.v),
                                   written=PartitionSpec("batch"), starts=PartitionSpec("batch"),
                                   slots=PartitionSpec("batch"), valid=PartitionSpec("batch"))

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        batch, num_tokens = tokens_shape
        check_batch(batch, self.batch)
        if num_tokens != self.slots.shape[1]:
            raise ZipjaxError(f"{num_tokens} tokens fed but the cache was told {self.slots.shape[1]} slots")

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, ScatterKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        if sliding_window is not None:
            raise ZipjaxError("parallel image decoding does not support sliding-window attention")
        k = _scatter(self.k[layer], self.slots, k_new)
        v = _scatter(self.v[layer], self.slots, v_new)
        written = self._written_after()
        args = (q, k.astype(q.dtype), v.astype(q.dtype), self.slots, written, self.starts)
        # a Mosaic call is never partitioned by XLA, so the kernel runs per shard of the context mesh
        out = scatter_per_shard(zipar_attention, *args) if use_kernel(self.kernel) else reference(*args)
        return out, dataclasses.replace(self, k=replace_at(self.k, layer, k), v=replace_at(self.v, layer, v))

    def advance(self, num_tokens: int) -> ScatterKVCache:
        """Mark this pass's slots written (the cursor of the dense cache has no meaning here)."""
        return dataclasses.replace(self, written=self._written_after())

    def _written_after(self) -> jax.Array:
        return jax.vmap(lambda w, s, v: w.at[s].max(v))(self.written, self.slots, self.valid)


def _scatter(cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """cache [batch, kv_heads, max_len, head_dim] with new [batch, q, kv_heads, head_dim] written at slots
    [batch, q] (one set of slots per sequence)."""
    new = new.transpose(0, 2, 1, 3).astype(cache.dtype)  # [batch, kv_heads, q, head_dim]
    return jax.vmap(lambda c, s, n: c.at[:, s].set(n))(cache, slots, new)


@dataclasses.dataclass(frozen=True)
class ScatterRecipe:
    """A hashable description of an empty scatter cache (see zipjax.sharding.jit_initializer)."""

    config: ModelConfig
    batch: int
    max_len: int
    kernel: bool | None = None

    def __call__(self, starts: jax.Array) -> ScatterKVCache:
        return ScatterKVCache.init(self.config, self.batch, self.max_len, starts, self.kernel)


def prefilled(model, setup: ImageDecodeSetup, inputs: ImageInputs, cache_len: int, kernel: bool | None = None,
              kv: Method | None = None, band: int = 0, rewrites: bool = False
              ) -> tuple[jax.Array, ScatterKVCache | BandKVCache | KIVIBandCache]:
    """A scatter cache of `cache_len` slots holding the prompt, and the image-token buffer int32 [batch,
    num_tokens] with the first token (from the prompt's last logits) and every EOL in place. With `kv` (a method
    zipjax.zipar.compressed takes) the cache is the band cache: the prompt compressed, a ring of `band`
    full-precision entries (`rewrites`: a pass may rewrite a slot with another token, SJD)."""
    recipe = (ScatterRecipe(setup.config, setup.cache_batch, cache_len, kernel) if kv is None else
              band_recipe(setup, kv, cache_len, band, rewrites, kernel))
    cache = jit_initializer(recipe, model.mesh)(inputs.starts)
    cache = cache.at(jnp.arange(setup.bucket, dtype=jnp.int32), jnp.ones((setup.bucket,), bool))
    code, cache = prefill(model.params, inputs, cache, setup=setup)
    tokens = place(initial_tokens(setup.batch, setup.layout), model.mesh, PartitionSpec("data", None))
    return tokens.at[:, 0].set(code + setup.layout.visual_offset), cache


def band_recipe(setup: ImageDecodeSetup, kv: Method, cache_len: int, band: int, rewrites: bool = False,
                kernel: bool | None = None) -> BandRecipe | KIVIBandRecipe:
    """The band cache of a parallel decode: blocks cover the image's slots, the ring at most the slots after the
    prompt (KIVI: its band cache, whose ring also holds the prompt's last residual slots, at most every slot); the
    stores' attention by the decoder's `kernel`, else the method's (zipjax.zipar.compressed)."""
    if isinstance(kv, KIVI):
        return KIVIBandRecipe(setup.config, kv, setup.cache_batch, cache_len, setup.bucket, min(band, cache_len),
                              band_kernel(kv, kernel))
    span = setup.bucket + setup.layout.num_tokens + 1
    return BandRecipe(setup.config, kv, setup.cache_batch, cache_len, span, setup.bucket,
                      max(1, min(band, cache_len - setup.bucket)), rewrites, band_kernel(kv, kernel))
