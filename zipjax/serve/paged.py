"""The paged KV cache of the serving engine: one pool of fixed-size pages per layer, shared by every sequence in
flight, and the `Cache` that one engine step runs the model with.

A step's batch is flat: T tokens from many requests, each its own row of the model's batch axis ([T, 1] tokens),
in two segments (the vLLM v1 order):

    decodes   D rows, one token each (the newest token of a running sequence)
    prefill   N blocks of Q tokens, each block a run of one sequence's prompt (chunked prefill; the last block of a
              prompt may be partly padding)

Every token's K/V is first written to its slot in the pool (`slots`: page * page_size + offset; padding tokens
write the null page 0, which no sequence owns), then each segment attends over its sequence's pages, read through
its page table block by block with the online softmax every zipjax attention shares (zipjax.kernels.common). A query
sees the keys of its own sequence at positions up to its own (and within the sliding window): prefix-cached pages,
earlier chunks and the tokens of the same step alike. Positions are RoPE positions (0 = first prompt token).

Pool layout per layer: [num_pages, page_size, kv_heads, head_dim] (token-major pages, as the TPU ragged paged
attention kernel reads them).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from zipjax.cache import replace_at
from zipjax.config import ModelConfig
from zipjax.kernels.common import (
    empty_state,
    group_queries,
    grouped_scores,
    grouped_values,
    normalise,
    online_softmax_step,
    ungroup,
)

NULL_PAGE = 0  # written by padding tokens, never allocated, never visible


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """Every layer's pages: k, v per layer [num_pages, page_size, kv_heads, head_dim]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype | None = None) -> Pool:
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.jnp_dtype
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))

    @staticmethod
    def page_bytes(config: ModelConfig, page_size: int, dtype: jnp.dtype | None = None) -> int:
        """Bytes one page takes over all layers, K and V."""
        itemsize = jnp.dtype(dtype or config.jnp_dtype).itemsize
        return 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * itemsize

    def logical_axes(self) -> Pool:
        spec = PartitionSpec(None, None, "kv_heads", "head_dim")
        return Pool(k=(spec,) * len(self.k), v=(spec,) * len(self.v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where a step's flat tokens go and what each may see (host-built, see the module docstring)."""

    slots: jax.Array  # int32 [T]: flat pool slot of each token's K/V (padding: in the null page)
    decode_pages: jax.Array  # int32 [D, P]: page table of each decode row (null-page padded)
    decode_positions: jax.Array  # int32 [D]: position of the row's token; -1 for a padding row
    prefill_pages: jax.Array  # int32 [N, P]: page table of each prefill block's sequence
    prefill_positions: jax.Array  # int32 [N, Q]: position of each block token; -1 for padding

    @property
    def num_decode(self) -> int:
        return self.decode_positions.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The `zipjax.cache.Cache` of one engine step: the pool and the step's layout. `block_pages` pages are read per
    iteration of the attention loop."""

    pool: Pool
    layout: StepLayout
    block_pages: int = dataclasses.field(metadata={"static": True}, default=8)
    accepts_chunks: ClassVar[bool] = True

    @property
    def batch(self) -> int:
        return self.layout.slots.shape[0]

    @property
    def max_len(self) -> int:
        return self.layout.decode_pages.shape[1] * self.pool.k[0].shape[1]

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        """The host scheduler built the layout for exactly these tokens; only the flat shape is checked."""
        if tokens_shape != (self.batch, 1):
            raise ValueError(f"a paged step takes [{self.batch}, 1] tokens, got {tokens_shape}")

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.pool))

    def logical_axes(self) -> PagedCache:
        layout = jax.tree.map(lambda _: PartitionSpec(), self.layout)
        return PagedCache(self.pool.logical_axes(), layout, self.block_pages)

    def advance(self, num_tokens: int) -> PagedCache:
        return self

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, PagedCache]:
        """q [T, 1, heads, head_dim]; k_new, v_new [T, 1, kv_heads, head_dim] -> out [T, 1, heads, head_dim]."""
        k_pool, v_pool = (_write(pool[layer], new[:, 0], self.layout.slots)
                          for pool, new in ((self.pool.k, k_new), (self.pool.v, v_new)))
        d = self.layout.num_decode
        heads, head_dim = q.shape[2], q.shape[3]
        n, block = self.layout.prefill_positions.shape
        parts = []
        if d:
            parts.append(paged_attention(q[:d].reshape(d, 1, heads, head_dim), k_pool, v_pool,
                                         self.layout.decode_pages, self.layout.decode_positions[:, None],
                                         sliding_window, self.block_pages).reshape(d, 1, heads, head_dim))
        if n:
            parts.append(paged_attention(q[d:].reshape(n, block, heads, head_dim), k_pool, v_pool,
                                         self.layout.prefill_pages, self.layout.prefill_positions, sliding_window,
                                         self.block_pages).reshape(n * block, 1, heads, head_dim))
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        pool = Pool(k=replace_at(self.pool.k, layer, k_pool), v=replace_at(self.pool.v, layer, v_pool))
        return out, dataclasses.replace(self, pool=pool)


def _write(pages: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """pages [num_pages, page_size, kv_heads, head_dim] with new [T, kv_heads, head_dim] written at flat slots [T]."""
    num_pages, page_size = pages.shape[:2]
    flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
    return flat.at[slots].set(new.astype(pages.dtype)).reshape(pages.shape)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    positions: jax.Array, sliding_window: int | None, block_pages: int) -> jax.Array:
    """Causal attention of n query rows over their sequences' pages, in plain jax.numpy (the CPU path).

    q [n, qn, heads, head_dim]: row r's queries at positions[r] (int32 [n, qn], -1: padding, sees nothing);
    k_pages, v_pages [num_pages, page_size, kv_heads, head_dim]; page_table int32 [n, P], P a multiple of
    block_pages. Keys are read `block_pages` pages at a time up to the furthest position any row needs, so a step
    reads the filled extent of its sequences, never the whole table. Returns [n, qn, heads, head_dim] in q's dtype."""
    n, qn, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    block_keys = block_pages * page_size
    qg = group_queries(q, kv_heads)  # [n, kv_heads, group, qn, head_dim]
    num_blocks = (jnp.max(positions) + block_keys) // block_keys  # blocks holding any visible key

    def step(j, state):
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * block_pages, block_pages, axis=1)  # [n, bp]

        def read(pool):  # -> [n, kv_heads, block_keys, head_dim]
            return pool[pages].reshape(n, block_keys, kv_heads, head_dim).transpose(0, 2, 1, 3).astype(q.dtype)

        key_pos = j * block_keys + jnp.arange(block_keys, dtype=jnp.int32)
        delta = positions[:, :, None] - key_pos[None, None, :]  # [n, qn, block_keys]
        visible = delta >= 0
        if sliding_window is not None:
            visible &= delta < sliding_window
        return online_softmax_step(state, grouped_scores(qg, read(k_pages)), visible[:, None, None], read(v_pages),
                                   values=grouped_values)

    state = jax.lax.fori_loop(0, num_blocks, step, empty_state((n, kv_heads, heads // kv_heads, qn), head_dim))
    return ungroup(normalise(state)).astype(q.dtype)
