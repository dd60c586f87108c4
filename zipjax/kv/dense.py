"""The dense KV cache: full-precision K and V of every layer, the reference every compressed cache is measured by.

Layout per layer: K and V as [batch, kv_heads, max_len, head_dim]. The whole batch shares one write cursor, so
writing new tokens is one `dynamic_update_slice` (never a scatter), and each sequence has a start slot: prompts are
left-padded so that all of them end at the same slot, and slots before `starts[b]` are masked for sequence b.
A token's RoPE position is its slot minus its sequence's start.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from zipjax.attention import cache_attention
from zipjax.cache import KV_AXES, check_batch, check_room, replace_at
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
    v: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
    cursor: jax.Array  # int32 []: next slot to write, shared by the batch
    starts: jax.Array  # int32 [batch]: first slot holding a real token of each sequence
    accepts_chunks: ClassVar[bool] = True

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, starts: jax.Array | None = None,
             dtype: jnp.dtype | None = None) -> KVCache:
        """An empty cache. `dtype` defaults to the model's dtype."""
        if batch <= 0 or max_len <= 0:
            raise ZipjaxError(f"a KV cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        dtype = dtype or config.jnp_dtype
        layers = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        return cls(k=layers, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   cursor=jnp.zeros((), jnp.int32), starts=starts)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def lengths(self) -> jax.Array:
        """int32 [batch]: real tokens held per sequence."""
        return self.cursor - self.starts

    def logical_axes(self) -> KVCache:
        spec = PartitionSpec(*KV_AXES)
        return dataclasses.replace(self, k=(spec,) * len(self.k), v=(spec,) * len(self.v), cursor=PartitionSpec(),
                                   starts=PartitionSpec("batch"))

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        """Raise before any compute if a [batch, num_tokens] input does not match the cache's batch, or would run
        past its end (checked when the cursor is a concrete value)."""
        batch, num_tokens = tokens_shape
        check_batch(batch, self.batch)
        check_room(self.cursor, num_tokens, self.max_len)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, KVCache]:
        """Write this layer's new K/V at the cursor, then attend over everything visible.

        q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim].
        Returns the attention output [batch, q_len, heads, head_dim] and the updated cache.
        """
        index = (0, 0, self.cursor, 0)
        k = jax.lax.dynamic_update_slice(self.k[layer], k_new.transpose(0, 2, 1, 3).astype(self.k[layer].dtype), index)
        v = jax.lax.dynamic_update_slice(self.v[layer], v_new.transpose(0, 2, 1, 3).astype(self.v[layer].dtype), index)
        out = cache_attention(q, k.astype(q.dtype), v.astype(q.dtype), self.cursor, self.starts, sliding_window)
        return out, dataclasses.replace(self, k=replace_at(self.k, layer, k), v=replace_at(self.v, layer, v))

    def advance(self, num_tokens: int) -> KVCache:
        return dataclasses.replace(self, cursor=self.cursor + num_tokens)
