"""The quantized KV cache: a pytree with the dense cache's `attend` / `advance` interface, so every model runs on it.

Tokens are compressed a block at a time. Block 0 is the prompt (`prefill_len` slots, left-padded); after it, new
tokens stay in a full-precision buffer of `buffer_len` slots, and when the buffer is full it is ranked and compressed as
the next block (ZipCache's streaming). Within a block, each (sequence, KV head) ranks its tokens by
saliency; the top `split(n)[0]` go to subset 0 (high bits), the rest to subset 1 (low bits). Every block of a
subset has a static size, so a subset is one fixed-capacity array whose blocks sit at static offsets:

  per subset (`Store`):  K codes, V codes  uint8 [batch, kv_heads, capacity, head_dim * bits / 8] (packed)
                         slots             int16 [batch, kv_heads, capacity]  (cache slot of each token, -1: empty;
                                                                              int32 from 32k slots on)
                         K (step, min)     float16 [batch, kv_heads, blocks, head_dim]     (channel-wise keys)
                                           or [batch, kv_heads, capacity, groups]          (token-wise keys)
                         V (step, min)     float16 [batch, kv_heads, capacity, groups]     (token-wise values)
  per layer (`LayerKV`): V channel scale   float16 [batch, kv_heads, blocks, head_dim]     (CST values only)
                         K, V buffer       [batch, kv_heads, buffer_len, head_dim] in the model's dtype
                         attention mass    float32 [batch, kv_heads, buffer_len] received by each buffered token

Prefill attention is exact (full precision over the prompt, as in ZipCache where the prompt goes through
FlashAttention); the prompt's saliency comes from probe queries or the full matrix. A buffered token's saliency is
exact and free: the buffer is attended at full precision anyway, so each decode step adds the attention every
buffered token receives, and at compression the mass is divided by the number of queries that saw it (the
normalized score over the window). ZipCache's code instead ranks a window by the newest query alone, and its paper
by 5% probe rows of the window; this uses every row.

Decode attention has two explicit paths: the jnp reference dequantizes each segment and runs one softmax over
segments and buffer; on TPU and GPU (or with `kernel=True`) the Pallas kernel (zipjax.kernels.quantized_attention)
reads each segment's packed codes and scales directly and the partial states are merged with the buffer's by
log-sum-exp. Segments have uniform blocks for that kernel: per subset, the prompt block is one segment and the later
blocks another. Choices that differ from the official code, on purpose: statistics are per sequence
(the code shares key statistics across the batch, which makes a sequence's cache depend on its batch mates), value
rows are true per-(token, head) rows (the code groups different tokens of different heads by rank), and each block
is quantized once with its own statistics (the code re-quantizes the whole cache from its dequantized values every
100 tokens, compounding error).

What is method-specific (bit widths, codec, how a block is split and ranked, how the prompt attends) comes from the
method (zipjax.kv.quantizing.QuantMethod); the cache only stores and attends. Imports: quantizing, codec, attention,
the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.attention import MASK_VALUE, grouped_scores, masked_attention, visible_slots
from zipjax.cache import check_prompt_then_tokens, replace_at
from zipjax.config import ModelConfig
from zipjax.kernels.quantized_attention import PackedSegment, combine, kernel_takes, reference_state, segment_attention
from zipjax.kv.codec import Store, channel_scale
from zipjax.kv.quantizing import Geometry, QuantMethod, Ranking, geometry
from zipjax.sharding import states_per_shard


@struct.dataclass
class LayerKV:
    stores: tuple[Store, ...]  # one per entry of Geometry.segments()
    v_scale: jax.Array | None
    k_buf: jax.Array
    v_buf: jax.Array
    mass: jax.Array


def empty_layer(config: ModelConfig, method: QuantMethod, geo: Geometry, batch: int, buffer_len: int,
                dtype) -> LayerKV:
    """One layer's empty stores, CST scales and a full-precision buffer of `buffer_len` tokens (the streaming
    window here, ZipAR's band ring in zipjax.zipar.compressed)."""
    b, h, d, codec = batch, config.num_kv_heads, config.head_dim, method.codec
    stores = tuple(codec.empty_store(b, h, d, seg.bits, seg.capacity, seg.blocks, geo.slot_dtype)
                   for seg in geo.segments())
    return LayerKV(stores=stores,
                   v_scale=jnp.ones((b, h, geo.num_blocks, d), jnp.float16) if codec.value_mode == "cst" else None,
                   k_buf=jnp.zeros((b, h, buffer_len, d), dtype), v_buf=jnp.zeros((b, h, buffer_len, d), dtype),
                   mass=jnp.zeros((b, h, buffer_len), jnp.float32))


@struct.dataclass
class QuantizedKVCache:
    layers: tuple[LayerKV, ...]
    cursor: jax.Array  # int32 []: next slot to write, shared by the batch
    starts: jax.Array  # int32 [batch]: first real slot of each sequence
    buffered: jax.Array  # int32 []: tokens in the full-precision buffer
    blocks: jax.Array  # int32 []: blocks compressed so far
    method: QuantMethod = struct.field(pytree_node=False)
    geometry: Geometry = struct.field(pytree_node=False)
    accepts_chunks: ClassVar[bool] = False  # the prompt is compressed as one block

    @classmethod
    def init(cls, config: ModelConfig, method: QuantMethod, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> QuantizedKVCache:
        """An empty cache that takes a prompt block of `prefill_len` slots, then decode tokens up to `max_len`."""
        geo = geometry(config, method, batch, max_len, prefill_len)
        dtype = dtype or config.jnp_dtype
        layer = functools.partial(empty_layer, config, method, geo, batch, geo.buffer_len, dtype)

        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        return cls(layers=tuple(layer() for _ in range(config.num_layers)), cursor=zero, starts=starts,
                   buffered=zero, blocks=zero, method=method, geometry=geo)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.geometry.max_len

    @property
    def lengths(self) -> jax.Array:
        return self.cursor - self.starts

    def nbytes(self) -> int:
        """Bytes held by every array of the cache (codes, scales, slots, buffer, counters)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def stored_nbytes(self) -> int:
        """Bytes of what is stored (host-side, concrete caches): like `nbytes`, but a store's per-token arrays
        (codes, slots, token-wise statistics) count only the entries holding a token. ZipVL's stores have room
        for the largest p of `ratio_range`; this counts the (clipped) p it stored."""
        total = 0
        for layer in self.layers:
            for store in layer.stores:
                held = np.asarray(store.slots) >= 0  # [batch, kv_heads, capacity]
                share = held.mean()
                for x in store.arrays().values():
                    per_token = x.shape[:3] == held.shape
                    total += round(x.nbytes * share) if per_token else x.nbytes
            total += sum(x.nbytes for x in jax.tree.leaves((layer.v_scale, layer.k_buf, layer.v_buf, layer.mass)))
        return total + sum(x.nbytes for x in (self.cursor, self.starts, self.buffered, self.blocks))

    def logical_axes(self) -> QuantizedKVCache:
        """PartitionSpecs of logical axis names: every per-token array is split by batch and KV head, and by its
        token (or block) axis, then its channel axis, where the "model" mesh axis does not divide the KV heads
        (zipjax.sharding.FALLBACKS)."""
        specs = jax.tree.map(lambda x: PartitionSpec(*("batch", "kv_heads", "seq", "head_dim")[:x.ndim]), self)
        return dataclasses.replace(specs, cursor=PartitionSpec(), starts=PartitionSpec("batch"),
                                   buffered=PartitionSpec(), blocks=PartitionSpec())

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        check_prompt_then_tokens(tokens_shape, "quantized", self.batch, self.geometry.prefill_len, self.cursor,
                                 self.max_len)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, QuantizedKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        attend = self._attend_prompt if q.shape[1] > 1 else self._attend_token
        out, state = attend(layer, q, k_new, v_new, sliding_window)
        return out, dataclasses.replace(self, layers=replace_at(self.layers, layer, state))

    def advance(self, num_tokens: int) -> QuantizedKVCache:
        if num_tokens > 1:
            one = jnp.ones((), jnp.int32)
            return dataclasses.replace(self, cursor=self.cursor + num_tokens, blocks=one,
                                       buffered=jnp.zeros((), jnp.int32))
        full = self.buffered == self.geometry.buffer_len
        return dataclasses.replace(self, cursor=self.cursor + 1, blocks=self.blocks + full.astype(jnp.int32),
                                   buffered=jnp.where(full, 1, self.buffered + 1))

    def _attend_prompt(self, layer: int, q, k_new, v_new, sliding_window):
        """Exact (or the method's sparse) attention over the prompt, then compress it as block 0."""
        slots = jnp.arange(q.shape[1], dtype=jnp.int32)
        valid = slots[None, :] >= self.starts[:, None]  # [batch, length]
        k, v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [batch, kv_heads, length, head_dim]
        ranking = self.method.rank_prompt(q, k_new, self.starts, layer)
        out = self.method.prefill_attention(q, k, v, ranking, self.starts, sliding_window)
        state = compress_block(self.layers[layer], self.method, self.geometry, k, v, slots, valid, ranking,
                               block=None)
        return out, state

    def _attend_token(self, layer: int, q, k_new, v_new, sliding_window):
        """Flush a full buffer as the next block, append the token to the buffer, attend over stores + buffer."""
        geo = self.geometry
        state = self.layers[layer]
        buffer_len = geo.buffer_len
        full = self.buffered == buffer_len

        def flush(st: LayerKV) -> LayerKV:
            slots = self.cursor - buffer_len + jnp.arange(buffer_len, dtype=jnp.int32)
            valid = jnp.ones((self.batch, buffer_len), bool)
            st = compress_block(st, self.method, geo, st.k_buf, st.v_buf, slots, valid,
                                self.method.rank_buffer(st.mass), block=self.blocks)
            return dataclasses.replace(st, mass=jnp.zeros_like(st.mass))

        state = jax.lax.cond(full, flush, lambda st: st, state)
        count = jnp.where(full, 0, self.buffered)
        index = (0, 0, count, 0)
        k_buf = jax.lax.dynamic_update_slice(state.k_buf, k_new.transpose(0, 2, 1, 3).astype(state.k_buf.dtype), index)
        v_buf = jax.lax.dynamic_update_slice(state.v_buf, v_new.transpose(0, 2, 1, 3).astype(state.v_buf.dtype), index)
        buf_slots = self.cursor - count + jnp.arange(buffer_len, dtype=jnp.int32)
        buf_slots = jnp.where(jnp.arange(buffer_len) <= count, buf_slots, -1)
        attention = self._kernel_attention if self.method.uses_kernel else self._jnp_attention
        out, buf_probs = attention(state, q, k_buf, v_buf, buf_slots, sliding_window)
        mass = self.method.buffer_mass(state.mass, buf_probs.sum(axis=(2, 3)))
        return out.astype(q.dtype), dataclasses.replace(state, k_buf=k_buf, v_buf=v_buf, mass=mass)

    def _jnp_attention(self, state: LayerKV, q, k_buf, v_buf, buf_slots, sliding_window):
        """Dequantize every segment, then one softmax over segments and buffer. Returns the output [batch, 1, heads,
        head_dim] and the buffer's probabilities [batch, kv_heads, group, 1, buffer_len]."""
        keys, values, slots = dequantize_layer(state, self.method, self.geometry)
        b, h, buffer_len = k_buf.shape[:3]
        keys = jnp.concatenate([*keys, k_buf.astype(jnp.float32)], axis=2)  # [batch, kv_heads, kv_len, head_dim]
        values = jnp.concatenate([*values, v_buf.astype(jnp.float32)], axis=2)
        slots = jnp.concatenate([*slots, jnp.broadcast_to(buf_slots, (b, h, buffer_len))], axis=2)
        visible = visible_slots(slots, self.cursor, self.starts[:, None, None], sliding_window)
        out, probs = masked_attention(q, keys, values, visible[:, :, None, :])
        return out, probs[..., -buffer_len:]

    def _kernel_attention(self, state: LayerKV, q, k_buf, v_buf, buf_slots, sliding_window):
        """The Pallas kernel per segment over the packed codes (per shard of the context mesh, zipjax.sharding.
        states_per_shard), the buffer in jnp, merged by log-sum-exp. Same results as `_jnp_attention`."""
        b, h, _, d = k_buf.shape
        qg = q[:, 0].reshape(b, h, -1, d).astype(jnp.float32)  # [batch, kv_heads, group, head_dim]
        states = []
        for st, seg in zip(state.stores, self.geometry.segments(), strict=True):
            v_scale = state.v_scale
            if v_scale is not None:
                v_scale = jax.lax.slice_in_dim(v_scale, seg.first_block, seg.first_block + seg.blocks, axis=2)
            attend = segment_attention if kernel_takes(seg.capacity) else reference_state  # Triton: >= 16 tokens
            kernel = functools.partial(attend, bits=seg.bits, block=seg.size, group=self.method.codec.group,
                                       sliding_window=sliding_window)
            arrays = PackedSegment(st.k_codes, st.k_step, st.k_min, st.v_codes, st.v_step, st.v_min, v_scale, st.slots)
            states.append(states_per_shard(kernel, qg, arrays, self.cursor, self.starts))
        # [batch, 1, 1, buffer_len]
        visible = visible_slots(buf_slots, self.cursor, self.starts[:, None, None], sliding_window)[:, :, None, :]
        scores = grouped_scores(qg[:, :, :, None], k_buf.astype(jnp.float32))[:, :, :, 0]  # [b, kv_heads, group, w]
        scores = jnp.where(visible, scores, MASK_VALUE)
        m = scores.max(axis=-1)
        p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
        acc = jnp.einsum("bhgs,bhsd->bhgd", p, v_buf.astype(jnp.float32))
        states.append((m[:, :, None], p.sum(axis=-1)[:, :, None], acc[:, :, None]))
        out, top, total = combine(states)  # [batch, kv_heads, group, head_dim]
        buf_probs = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0) / total[..., None]
        return out.reshape(q.shape), buf_probs[:, :, :, None, :]


def compress_block(state: LayerKV, method: QuantMethod, geo: Geometry, k: jax.Array, v: jax.Array,
                   slots: jax.Array, valid: jax.Array, ranking: Ranking, block: jax.Array | None) -> LayerKV:
    """Split a ranked block's tokens per (sequence, KV head) into the two subsets, quantize each, write it at its
    static place (encode_block's pieces, written by write_block).

    k, v: [batch, kv_heads, n, head_dim]; slots int32 [n]; valid bool [batch, n]; block: None for the prompt block
    (0), else the traced index of a later block. With an adaptive count (ZipVL) subset 0 takes ranks [0, p) and
    subset 1 ranks [p, n), p clipped into the static room; otherwise the sizes are `method.split(n)`.
    """
    pieces, scale = encode_block(method, geo, k, v, slots, valid, ranking, block)
    v_scale = state.v_scale
    if scale is not None:
        v_scale = jax.lax.dynamic_update_slice_in_dim(v_scale, scale, 0 if block is None else block, axis=2)
    stores = list(state.stores)
    for i, piece in pieces.items():
        stores[i] = write_block(stores[i], piece, method.codec.key_mode == "channel",
                                0 if block is None else block - 1, geo.segments()[i].size)
    return state.replace(stores=tuple(stores), v_scale=v_scale)


def encode_block(method: QuantMethod, geo: Geometry, k: jax.Array, v: jax.Array, slots: jax.Array,
                 valid: jax.Array, ranking: Ranking, block: jax.Array | None
                 ) -> tuple[dict[int, Store], jax.Array | None]:
    """compress_block's codes without the write: per segment the block fills (its index in geo.segments()) the
    piece [batch, kv_heads, seg.size, ...], and the CST value scale [batch, kv_heads, 1, head_dim] (None: no CST)."""
    sizes = geo.first if block is None else geo.rest
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    token_valid = jnp.broadcast_to(valid[:, None, :], k.shape[:3])
    scale = None
    if method.codec.value_mode == "cst":
        c = channel_scale(v, axis=2, valid=token_valid[..., None])  # [batch, kv_heads, 1, head_dim]
        v = v / c.astype(jnp.float32)
        scale = c
    pieces = {}
    part = 0 if block is None else 1
    for i, seg in enumerate(geo.segments()):
        if seg.first_block != part or sizes[seg.subset] == 0:
            continue
        idx, ok = _subset_tokens(ranking, seg.subset, sizes, token_valid)
        piece = method.codec.encode(seg.bits, jnp.take_along_axis(k, idx[..., None], axis=2),
                                    jnp.take_along_axis(v, idx[..., None], axis=2), ok)
        pieces[i] = piece.replace(slots=jnp.where(ok, slots[idx], -1).astype(geo.slot_dtype))
    return pieces, scale


def _subset_tokens(ranking: Ranking, subset: int, sizes: tuple[int, int], token_valid: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """(token indices int32 [batch, kv_heads, sizes[subset]], which of them hold a token bool [same])."""
    n = ranking.order.shape[-1]
    if ranking.stored is None:
        bounds = (0, sizes[0], n)
        idx = jnp.sort(ranking.order[..., bounds[subset]:bounds[subset + 1]], axis=-1)  # in slot order
        return idx, jnp.take_along_axis(token_valid, idx, axis=2)
    count = ranking.stored[:, None, None]
    ranks = jnp.arange(sizes[subset], dtype=jnp.int32)[None, None, :] + (0 if subset == 0 else count)
    idx = jnp.take_along_axis(ranking.order, jnp.minimum(ranks, n - 1), axis=-1)
    inside = ranks < count if subset == 0 else ranks < n
    return idx, jnp.take_along_axis(token_valid, idx, axis=2) & inside


def write_block(store: Store, piece: Store, per_block_keys: bool, local: jax.Array | int, size: int) -> Store:
    """`store` with block `local` (its index within the segment) replaced by `piece`."""
    updates = {}
    for name, value in piece.arrays().items():
        at = local if per_block_keys and name in ("k_step", "k_min") else local * size
        updates[name] = jax.lax.dynamic_update_slice_in_dim(getattr(store, name), value, at, axis=2)
    return store.replace(**updates)


def dequantize_layer(state: LayerKV, method: QuantMethod, geo: Geometry
                     ) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """Per segment: keys, values float32 [batch, kv_heads, capacity, head_dim], slots [batch, kv_heads, capacity]."""
    keys, values, slots = [], [], []
    for st, seg in zip(state.stores, geo.segments(), strict=True):
        ids = seg.block_ids()
        v_scale = None if state.v_scale is None else state.v_scale[:, :, seg.first_block + ids]
        k, v = method.codec.decode(st, seg.bits, ids, v_scale)
        keys.append(k)
        values.append(v)
        slots.append(st.slots.astype(jnp.int32))
    return keys, values, slots
