"""ZipVL's sparse prefill over a dense cache: the paper's Video-MME setting, where only the prefill is sparsified.

The prompt pass ranks the prompt's tokens and attends among the important ones exactly as ZipVL's quantized cache
does (zipjax.kv.zipvl.ZipVL.rank_prompt / prefill_attention: unimportant queries get a zero attention output); every
key and value is then written into a dense `KVCache` in full precision, and decoding is the dense cache's.
Imports: dense, method, quantizing (the method is read through `QuantMethod`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import struct

from zipjax.config import ModelConfig
from zipjax.kv.dense import KVCache
from zipjax.kv.method import check_block_sizes
from zipjax.kv.quantizing import QuantMethod


@struct.dataclass
class SparsePrefillKVCache:
    inner: KVCache
    method: QuantMethod = struct.field(pytree_node=False)
    accepts_chunks: ClassVar[bool] = False  # the prompt is ranked as one block

    @classmethod
    def init(cls, config: ModelConfig, method: QuantMethod, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> SparsePrefillKVCache:
        check_block_sizes(batch, max_len, prefill_len)
        return cls(inner=KVCache.init(config, batch, max_len, starts, dtype), method=method)

    @property
    def batch(self) -> int:
        return self.inner.batch

    @property
    def max_len(self) -> int:
        return self.inner.max_len

    @property
    def starts(self) -> jax.Array:
        return self.inner.starts

    @property
    def cursor(self) -> jax.Array:
        return self.inner.cursor

    @property
    def lengths(self) -> jax.Array:
        return self.inner.lengths

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def logical_axes(self) -> SparsePrefillKVCache:
        return dataclasses.replace(self, inner=self.inner.logical_axes())

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        self.inner.check_fits(tokens_shape)

    def advance(self, num_tokens: int) -> SparsePrefillKVCache:
        return dataclasses.replace(self, inner=self.inner.advance(num_tokens))

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, SparsePrefillKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]. The prompt (q_len
        > 1, written from slot 0) attends sparsely; decode steps are the dense cache's."""
        if q.shape[1] == 1:
            out, inner = self.inner.attend(layer, q, k_new, v_new, sliding_window)
            return out, dataclasses.replace(self, inner=inner)
        k, v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [batch, kv_heads, n, head_dim]
        ranking = self.method.rank_prompt(q, k_new, self.starts, layer)
        out = self.method.prefill_attention(q, k, v, ranking, self.starts, sliding_window)
        write = lambda cache, x: jax.lax.dynamic_update_slice(cache, x.astype(cache.dtype), (0, 0, 0, 0))
        inner = self.inner
        keys = list(inner.k)
        values = list(inner.v)
        keys[layer], values[layer] = write(keys[layer], k), write(values[layer], v)
        inner = dataclasses.replace(inner, k=tuple(keys), v=tuple(values))
        return out.astype(q.dtype), dataclasses.replace(self, inner=inner)

