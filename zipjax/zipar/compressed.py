"""A compressed KV cache for parallel image decoding: finished blocks quantized, the active band in full precision.

ZipAR, adaptive ZipAR and SJD write several tokens per pass at scattered raster slots (zipjax.zipar.cache). Over a
compressed method (ZipCache's mixed precision, Uniform) this cache keeps (KIVI, whose key and value of one token change
precision at different queries, has its own: zipjax.zipar.kivi_band):

  the prompt     compressed as block 0 when it is written, exactly as the sequential cache does
                 (zipjax.kv.quantized: exact prompt attention, ranked by the method's probes);
  image blocks   runs of `buffer_len` raster slots from the image's first slot (the sequential cache's blocks);
                 a block is compressed by the method's quantizer (zipjax.kv.quantized.compress_block, the same
                 stores and codec) once every slot of it is written for good;
  the band       every slot not compressed yet in a full-precision ring of `band` entries (slot s at s % band):
                 the rows ZipAR has in flight, SJD's window. Its length is a static bound from the decoder.

A query at slot q reads a token from its block's compressed copy once q is past the end of that block and the block
is compressed, and its full-precision copy otherwise. A pass whose writes complete a block compresses it in the same
pass: the queries inside the block read it first (their attention counts toward its ranking), the queries past it
then read the compressed copy. With one token per pass in raster order this is the sequential cache step for step;
ZipAR with a lag of the image's width feeds a row's last token and its end-of-line together, which the rule keeps
equal to sequential decoding.

Saliency (ZipCache's normalized attention) of an image token: the attention it receives from every query that
reads its full-precision copy, divided by the number of such queries, summed over a KV head's query heads. These
queries are ZipCache's probes during image decoding: the tokens decoded since it was written, in every row in flight
(ZipAR) or window position (SJD), plus, until its block is compressed, the later rows' queries that see it. For
sequential order they are the sequential cache's (every query that saw the buffered token). The prompt keeps the
paper's probe rule (recent + random prompt rows). SJD rewrites drafted slots: a rewritten slot starts its
saliency over.

Static shapes throughout: per sequence, the written bitmap, the ring's slots, the count of compressed blocks (each
sequence compresses at its own pace: adaptive schedules and SJD differ between samples). Attention by the kernel
policy (zipjax.platform.use_kernel; the decoder's `kernel`, else the method's): the packed-code kernel for several
queries per sequence (zipjax.kernels.quantized_multi_query) over each store, merged with the ring's softmax by
log-sum-exp, or the dequantized stores and the ring under one jnp softmax; Uniform (token-wise keys, no kernel) is
always jnp. Imports: the quantized cache's pieces, the shared attention, the multi-query kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.attention import MASK_VALUE, group_queries, grouped_scores, grouped_values, masked_attention, ungroup
from zipjax.cache import check_batch, replace_at
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kernels.common import TINY
from zipjax.kernels.quantized_attention import PackedSegment
from zipjax.kernels.quantized_multi_query import kernel_takes, merge_lse, multi_query
from zipjax.kv.codec import Store
from zipjax.kv.kivi import KIVI
from zipjax.kv.method import Method
from zipjax.kv.quantized import LayerKV, compress_block, dequantize_layer, empty_layer, encode_block
from zipjax.kv.quantizing import Geometry, QuantMethod, Ranking, geometry
from zipjax.platform import use_kernel
from zipjax.sharding import cache_spec

# methods whose blocks can be compressed wherever a parallel decoder completes them (fixed split, ranking by the
# attention a block received); KIVI runs on its own band cache (zipjax.zipar.kivi_band: its precision rule read at
# each query's slot); the others are refused by name (zipjax.zipar.compressed.check_method)
SCATTER_METHODS = ("zipcache", "uniform")
PARALLEL_METHODS = (*SCATTER_METHODS, "kivi")
WHY_NOT = {
    "zipvl": "its block split depends on an adaptive ratio per block computed from a prompt-style probe pass",
    "minicache": "it merges layers of tokens written at one cursor",
}


def check_method(kv: Method | None, decoder: str, kernel: bool | None) -> None:
    """Refuse, where the decoder is made, a method the band caches cannot run and a kernel request it cannot
    honour."""
    if kv is None:
        return
    name = getattr(kv, "name", type(kv).__name__)
    if not (isinstance(kv, KIVI) or (name in SCATTER_METHODS and isinstance(kv, QuantMethod))):
        why = WHY_NOT.get(name, "it is not one of the block-quantized methods")
        raise ZipjaxError(f"{decoder} cannot decode over a {name} KV cache: {why}; parallel decoders take "
                          f"{', '.join(PARALLEL_METHODS)} or the dense cache (kv=None)")
    if kernel is not None and kv.kernel is not None and kernel != kv.kernel:
        raise ZipjaxError(f"{decoder} kernel={kernel} but its {name} cache kernel={kv.kernel}: over a compressed "
                          f"cache both choose the same attention; set one of them")
    if band_kernel(kv, kernel) and not kv.has_kernel:
        raise ZipjaxError(f"{decoder} kernel=True over a {name} KV cache: {name} has no packed-code kernel (its keys "
                          f"are token-wise; the kernel reads channel-wise keys); use kernel=None or False")


def band_margin(kv: Method) -> tuple[int, int]:
    """(align, behind): the full-precision band of a parallel decode over `kv` keeps every slot from the first one
    a pass can query rounded down to a multiple of `align`, less `behind` slots: the block holding it for the
    block-quantized methods (buffer_len, 0), KIVI's residual window before it (1, residual)."""
    return (1, kv.residual) if isinstance(kv, KIVI) else (kv.buffer_len, 0)


def band_kernel(kv: QuantMethod | KIVI, kernel: bool | None) -> bool | None:
    """The band cache's kernel setting (zipjax.platform.use_kernel): the decoder's, else the method's."""
    return kv.kernel if kernel is None else kernel


class Plan(NamedTuple):
    """What one pass does to the cache, the same for every layer (computed from the slots it writes)."""

    written: jax.Array  # bool [batch, max_len] after the pass
    ring: jax.Array  # int32 [batch, q]: the ring entry each query writes (band: padding, dropped)
    band_slot: jax.Array  # int32 [batch, band] after the writes
    fresh: jax.Array  # bool [batch, band]: entries whose saliency starts over
    blocks: jax.Array  # int32 [batch]: image blocks compressed after the pass
    dense_a: jax.Array  # bool [batch, q, band]: full-precision reads before this pass's compression
    dense: jax.Array  # bool [batch, q, band]: after it
    inside: jax.Array  # bool [batch, q, band]: reads by queries inside the entry's block (they rank it)
    seen_a: jax.Array  # float32 [batch, band]: reads that rank a block compressed in this pass
    seen: jax.Array  # float32 [batch, band]: reads so far, after the pass
    overflow: jax.Array  # bool []: a write hit a ring entry still holding an uncompressed slot


@struct.dataclass
class BandKVCache:
    layers: tuple[LayerKV, ...]  # stores: compressed blocks; k_buf, v_buf [batch, kv_heads, band, head_dim]: ring
    written: jax.Array  # bool [batch, max_len]
    starts: jax.Array  # int32 [batch]: first slot of each sequence's prompt
    slots: jax.Array  # int32 [batch, q]: slots of the current pass's tokens
    valid: jax.Array  # bool [batch, q]
    settled: jax.Array  # int32 [batch]: slots from here on may be rewritten (SJD's drafts), never compressed
    band_slot: jax.Array  # int32 [batch, band]: the slot each ring entry holds (-1: none)
    seen: jax.Array  # float32 [batch, band]: queries that read each entry at full precision
    blocks: jax.Array  # int32 [batch]: image blocks compressed
    overflow: jax.Array  # bool []: the band was too short (a bug if ever set)
    method: QuantMethod = struct.field(pytree_node=False)
    geometry: Geometry = struct.field(pytree_node=False)
    prompt: bool = struct.field(pytree_node=False, default=True)  # the next pass is the prompt
    rewrites: bool = struct.field(pytree_node=False, default=False)  # a slot may be rewritten with another token
    kernel: bool | None = struct.field(pytree_node=False, default=None)  # the stores' attention: zipjax.platform
    accepts_chunks: ClassVar[bool] = False

    @classmethod
    def init(cls, config: ModelConfig, method: QuantMethod, batch: int, max_len: int, span: int, prefill_len: int,
             band: int, starts: jax.Array, rewrites: bool = False, kernel: bool | None = None) -> BandKVCache:
        """An empty cache of `max_len` slots (the scatter cache's), blocks for slots below `span` after a
        `prefill_len`-slot prompt, and a ring of `band` full-precision entries; `kernel` as zipjax.platform's."""
        geo = geometry(config, method, batch, span, prefill_len)
        b = batch
        layer = functools.partial(empty_layer, config, method, geo, batch, band, config.jnp_dtype)

        return cls(layers=tuple(layer() for _ in range(config.num_layers)), written=jnp.zeros((b, max_len), bool),
                   starts=jnp.asarray(starts, jnp.int32), slots=jnp.zeros((b, 1), jnp.int32),
                   valid=jnp.zeros((b, 1), bool), settled=jnp.full((b,), max_len, jnp.int32),
                   band_slot=jnp.full((b, band), -1, jnp.int32), seen=jnp.zeros((b, band), jnp.float32),
                   blocks=jnp.zeros((b,), jnp.int32), overflow=jnp.zeros((), bool), method=method, geometry=geo,
                   rewrites=rewrites, kernel=kernel)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.written.shape[1]

    @property
    def band(self) -> int:
        return self.band_slot.shape[1]

    def at(self, slots: jax.Array, valid: jax.Array, settled: jax.Array | None = None) -> BandKVCache:
        """The cache ready for a pass whose tokens go to `slots` ([q] or [batch, q]; valid False: padding); slots
        from `settled` ([batch]) on may be rewritten by a later pass (None: none will)."""
        shape = (self.batch, slots.shape[-1])
        slots, valid = jnp.broadcast_to(slots, shape), jnp.broadcast_to(valid, shape)
        slots = jnp.where(valid, slots, self.max_len - 1).astype(jnp.int32)
        settled = jnp.full((self.batch,), self.max_len, jnp.int32) if settled is None else settled
        return dataclasses.replace(self, slots=slots, valid=valid, settled=jnp.asarray(settled, jnp.int32))

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def logical_axes(self) -> BandKVCache:
        specs = jax.tree.map(lambda x: PartitionSpec(*("batch", "kv_heads", "seq", "head_dim")[:x.ndim]), self)
        per_seq = PartitionSpec("batch")
        return dataclasses.replace(specs, written=per_seq, starts=per_seq, slots=per_seq, valid=per_seq,
                                   settled=per_seq, band_slot=per_seq, seen=per_seq, blocks=per_seq,
                                   overflow=PartitionSpec())

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        batch, num_tokens = tokens_shape
        check_batch(batch, self.batch)
        if self.prompt and num_tokens != self.geometry.prefill_len:
            raise ZipjaxError(f"the compressed band cache takes the prompt as one block of "
                              f"{self.geometry.prefill_len} tokens first, got {num_tokens}")
        if num_tokens != self.slots.shape[1]:
            raise ZipjaxError(f"{num_tokens} tokens fed but the cache was told {self.slots.shape[1]} slots")

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, BandKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        if sliding_window is not None:
            raise ZipjaxError("parallel image decoding does not support sliding-window attention")
        attend = self._attend_prompt if self.prompt else self._attend_pass
        out, state = attend(layer, q, k_new, v_new)
        return out, dataclasses.replace(self, layers=replace_at(self.layers, layer, state))

    def advance(self, num_tokens: int) -> BandKVCache:
        if self.prompt:
            return dataclasses.replace(self, written=_written_after(self.written, self.slots, self.valid),
                                       prompt=False)
        plan = self._plan()
        return dataclasses.replace(self, written=plan.written, band_slot=plan.band_slot, seen=plan.seen,
                                   blocks=plan.blocks, overflow=self.overflow | plan.overflow)

    def _attend_prompt(self, layer: int, q, k_new, v_new) -> tuple[jax.Array, LayerKV]:
        """Exact attention over the prompt, compressed as block 0 (zipjax.kv.quantized's prompt step)."""
        slots = jnp.arange(q.shape[1], dtype=jnp.int32)
        valid = slots[None, :] >= self.starts[:, None]
        k, v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [batch, kv_heads, length, head_dim]
        ranking = self.method.rank_prompt(q, k_new, self.starts, layer)
        out = self.method.prefill_attention(q, k, v, ranking, self.starts, None)
        state = compress_block(self.layers[layer], self.method, self.geometry, k, v, slots, valid, ranking,
                               block=None)
        return out, state

    def _attend_pass(self, layer: int, q, k_new, v_new) -> tuple[jax.Array, LayerKV]:
        """Write the pass's K/V into the ring, attend; where the pass completes blocks, rank them by the reads so
        far (the queries inside them included), compress, and attend again for the queries past them."""
        plan = self._plan()
        st = self.layers[layer]
        ring_write = jax.vmap(lambda buf, r, new: buf.at[:, r].set(new.astype(buf.dtype), mode="drop"))
        st = st.replace(k_buf=ring_write(st.k_buf, plan.ring, k_new.transpose(0, 2, 1, 3)),
                        v_buf=ring_write(st.v_buf, plan.ring, v_new.transpose(0, 2, 1, 3)),
                        mass=jnp.where(plan.fresh[:, None, :], 0.0, st.mass))
        mass0 = st.mass
        out_a, probs_a = self._attention(st, q, plan.dense_a)
        reads = lambda probs, mask: (probs * (mask & self.valid[:, :, None])[:, None, None]).sum(axis=(2, 3))

        def compress(st: LayerKV):
            ranked = self._compress_new(st.replace(mass=mass0 + reads(probs_a, plan.inside)), plan)
            return (*self._attention(ranked, q, plan.dense), ranked)

        out, probs, st = jax.lax.cond(jnp.any(plan.blocks > self.blocks), compress,
                                      lambda st: (out_a, probs_a, st), st)
        return out.astype(q.dtype), st.replace(mass=mass0 + reads(probs, plan.dense))

    @property
    def uses_kernel(self) -> bool:
        """Whether the stores are read by the packed-code kernel, for the platform being traced: the method must
        have one (Uniform's token-wise keys do not fit it: jnp, chosen here), then zipjax.platform.use_kernel."""
        return self.method.has_kernel and use_kernel(self.kernel)

    def _attention(self, st: LayerKV, q: jax.Array, dense: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One softmax over the stores (entries past whose block the query is) and the ring (`dense` [batch, q,
        band]). Returns out float32 [batch, q, heads, head_dim] and the ring's probabilities [batch, kv_heads,
        group, q, band]. Two explicit paths with the same results: the stores dequantized in jnp, or read packed by
        the kernel and merged with the ring's softmax by log-sum-exp."""
        attention = self._kernel_attention if self.uses_kernel else self._jnp_attention
        return attention(st, q, dense)

    def _jnp_attention(self, st: LayerKV, q: jax.Array, dense: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The dequantized stores and the ring under one softmax (jax.numpy)."""
        keys, values, slots = dequantize_layer(st, self.method, self.geometry)
        b, h, band = st.k_buf.shape[:3]
        stored = jnp.concatenate(slots, axis=2)  # [batch, kv_heads, entries]
        store_visible = ((stored >= 0) & (stored >= self.starts[:, None, None]))[:, :, None, :]
        store_visible &= self.slots[:, None, :, None] > self._block_end(stored)[:, :, None, :]
        keys = jnp.concatenate([*keys, st.k_buf.astype(jnp.float32)], axis=2)
        values = jnp.concatenate([*values, st.v_buf.astype(jnp.float32)], axis=2)
        mask = jnp.concatenate([store_visible, jnp.broadcast_to(dense[:, None], (b, h, *dense.shape[1:]))], axis=3)
        out, probs = masked_attention(q, keys, values, mask)
        return out, probs[..., -band:]

    def _kernel_attention(self, st: LayerKV, q: jax.Array, dense: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The packed-code kernel for several queries per sequence over each store segment (zipjax.kernels.
        quantized_multi_query; per shard of the context mesh; a segment too short for Triton's tiles by its jnp
        reference), the ring in jnp, merged exactly by log-sum-exp. A query sees a stored token iff it is past the
        token's block: the kernel's rule `slot <= the query's` with the query's slot lowered to the end of the block
        before its own."""
        h = st.k_buf.shape[1]
        seen_through = self._store_horizon()  # [batch, q]
        parts = []
        for store, seg in zip(st.stores, self.geometry.segments(), strict=True):
            v_scale = st.v_scale
            if v_scale is not None:
                v_scale = jax.lax.slice_in_dim(v_scale, seg.first_block, seg.first_block + seg.blocks, axis=2)
            segment = PackedSegment(store.k_codes, store.k_step, store.k_min, store.v_codes, store.v_step,
                                    store.v_min, v_scale, store.slots)
            attend = functools.partial(multi_query, bits=seg.bits, block=seg.size, group=self.method.codec.group,
                                       kernel=kernel_takes(seg.capacity))  # else its jnp reference
            parts.append(multi_query_per_shard(attend, q, segment, seen_through, self.starts))
        mask = dense[:, None, None]  # [batch, 1, 1, q, band]
        scores = jnp.where(mask, grouped_scores(group_queries(q.astype(jnp.float32), h),
                                                st.k_buf.astype(jnp.float32)), MASK_VALUE)
        top = scores.max(axis=-1, keepdims=True)
        p = jnp.where(mask, jnp.exp(scores - top), 0.0)
        total = p.sum(axis=-1, keepdims=True)
        ring_out = ungroup(grouped_values(p, st.v_buf.astype(jnp.float32)) / jnp.maximum(total, TINY))
        ring_lse = ungroup(jnp.where(total > 0, top + jnp.log(jnp.maximum(total, TINY)), MASK_VALUE))[..., 0]
        out, lse = merge_lse([*parts, (ring_out, ring_lse)])  # [batch, q, heads, head_dim], [batch, q, heads]
        probs = jnp.where(mask, jnp.exp(scores - group_queries(lse[..., None], h)), 0.0)
        return out, probs

    def _store_horizon(self) -> jax.Array:
        """int32 [batch, q]: the last slot each query reads from the stores, the end of the block before its own
        (-1 inside the prompt: nothing)."""
        first, size = self.geometry.prefill_len, self.geometry.buffer_len
        return jnp.where(self.slots < first, -1, first + (self.slots - first) // size * size - 1)

    def _block_end(self, slots: jax.Array) -> jax.Array:
        """The last slot of the block holding each slot (the prompt is block 0)."""
        first, size = self.geometry.prefill_len, self.geometry.buffer_len
        return jnp.where(slots < first, first - 1, first + ((slots - first) // size + 1) * size - 1)

    def _compress_new(self, st: LayerKV, plan: Plan) -> LayerKV:
        """Compress, per sequence, the blocks from `self.blocks` up to `plan.blocks` (one per loop step): each step
        encodes every sequence's next block (small) and scatters it into the stores, the rows of sequences with
        nothing left to compress dropped, instead of a select over whole stores."""
        one = jax.vmap(self._encode_block)

        def step(carry):
            st, done = carry
            todo = done < plan.blocks
            pieces, scale = one(st.mass, st.k_buf, st.v_buf, done, plan.seen_a)
            return self._write_blocks(st, pieces, scale, done, todo), done + todo.astype(jnp.int32)

        st, _ = jax.lax.while_loop(lambda c: jnp.any(c[1] < plan.blocks), step, (st, self.blocks))
        return st

    def _encode_block(self, mass: jax.Array, k_buf: jax.Array, v_buf: jax.Array, done: jax.Array, seen: jax.Array
                      ) -> tuple[dict[int, Store], jax.Array | None]:
        """One sequence's image block `done` (mass [kv_heads, band], k_buf/v_buf [kv_heads, band, head_dim], seen
        [band]): ranked by its normalized saliency, quantized by the method (as the sequential cache's flush) into
        per-segment pieces [kv_heads, size, ...] and its CST value scale [kv_heads, 1, head_dim] (None: none)."""
        first, size = self.geometry.prefill_len, self.geometry.buffer_len
        slots = first + done * size + jnp.arange(size, dtype=jnp.int32)
        ring = slots % self.band
        score = mass[:, ring] / jnp.maximum(seen[ring], 1.0)[None, :]  # [kv_heads, size]
        ranking = Ranking(jnp.argsort(-score, axis=-1, stable=True)[None])
        pieces, scale = encode_block(self.method, self.geometry, k_buf[None][:, :, ring], v_buf[None][:, :, ring],
                                     slots, jnp.ones((1, size), bool), ranking, block=done + 1)
        return jax.tree.map(lambda x: x[0], (pieces, scale))

    def _write_blocks(self, st: LayerKV, pieces: dict[int, Store], scale: jax.Array | None, done: jax.Array,
                      todo: jax.Array) -> LayerKV:
        """Scatter each sequence's encoded block `done` [batch] into the stores where `todo` [batch]; the other
        rows go out of range and are dropped (batch stays a batch axis of the scatter, as the sharding wants)."""
        per_block_keys = self.method.codec.key_mode == "channel"
        segments = self.geometry.segments()
        put = jax.vmap(lambda x, new, at: x.at[:, at + jnp.arange(new.shape[1])].set(new.astype(x.dtype),
                                                                                     mode="drop"))

        def write(x: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
            return put(x, new, jnp.where(todo, at, x.shape[2]))

        stores = list(st.stores)
        for i, piece in pieces.items():
            size = segments[i].size
            stores[i] = stores[i].replace(**{
                name: write(getattr(stores[i], name), value,
                            done if per_block_keys and name in ("k_step", "k_min") else done * size)
                for name, value in piece.arrays().items()})
        v_scale = st.v_scale if scale is None else write(st.v_scale, scale, done + 1)
        return st.replace(stores=tuple(stores), v_scale=v_scale)

    def _plan(self) -> Plan:
        """The pass's bookkeeping from the slots it writes: ring entries, the blocks it completes, who reads what."""
        first, size, band = self.geometry.prefill_len, self.geometry.buffer_len, self.band
        slots, valid = self.slots, self.valid
        written = _written_after(self.written, slots, valid)
        ring = jnp.where(valid, slots % band, band)
        band_slot = jax.vmap(lambda bs, r, s: bs.at[r].set(s, mode="drop"))(self.band_slot, ring, slots)
        occupant = jnp.take_along_axis(self.band_slot, jnp.minimum(ring, band - 1), axis=1)
        compressed = first + self.blocks * size  # [batch]: slots below are compressed (or the prompt)
        overflow = jnp.any(valid & (occupant >= compressed[:, None]) & (occupant != slots))
        renew = valid & (self.rewrites | ~jnp.take_along_axis(self.written, slots, axis=1))
        fresh = jax.vmap(lambda r, n: jnp.zeros((band,), bool).at[r].max(n, mode="drop"))(ring, renew)
        limit = jnp.minimum(jnp.argmax(~written, axis=1).astype(jnp.int32), self.settled)
        blocks = jnp.maximum(self.blocks, jnp.clip((limit - first) // size, 0, self.geometry.num_blocks - 1))
        held = band_slot >= 0
        entry = jnp.where(held, band_slot, 0)
        readable = held & jnp.take_along_axis(written, entry, axis=1) & (entry >= self.starts[:, None])
        base = readable[:, None, :] & (entry[:, None, :] <= slots[:, :, None])
        dense_a = base & (entry >= compressed[:, None])[:, None, :]
        past = slots[:, :, None] > self._block_end(entry)[:, None, :]
        dense = dense_a & ~((entry < (first + blocks * size)[:, None])[:, None, :] & past)
        inside = dense_a & ~past
        count = lambda mask: (mask & valid[:, :, None]).sum(axis=1).astype(jnp.float32)
        seen0 = jnp.where(fresh, 0.0, self.seen)
        return Plan(written, ring, band_slot, fresh, blocks, dense_a, dense, inside, seen0 + count(inside),
                    seen0 + count(dense), overflow)


def multi_query_per_shard(attend, q: jax.Array, segment: PackedSegment, q_slots: jax.Array, starts: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """`attend(q, segment, q_slots, starts) -> (out, lse)` on each shard of the context mesh (Pallas kernels are
    opaque to XLA's partitioner): batch over "data" and KV heads over "model" as the stores are placed
    (zipjax.sharding.cache_spec); a store split by token is gathered on each shard. Without a mesh, as is."""
    spec = cache_spec(segment.k_codes.shape)
    if not any(spec):
        return attend(q, segment, q_slots, starts)
    data, heads = spec[0], spec[1]
    arrays = [x for x in segment if x is not None]
    present = [x is not None for x in segment]

    def shard(q, q_slots, starts, *arrays):
        it = iter(arrays)
        return attend(q, PackedSegment(*(next(it) if p else None for p in present)), q_slots, starts)

    per_query = PartitionSpec(data, None, heads)
    in_specs = (per_query, PartitionSpec(data), PartitionSpec(data), *(PartitionSpec(data, heads) for _ in arrays))
    return jax.shard_map(shard, in_specs=in_specs, out_specs=(per_query, per_query), check_vma=False)(
        q, q_slots, starts, *arrays)


def _written_after(written: jax.Array, slots: jax.Array, valid: jax.Array) -> jax.Array:
    return jax.vmap(lambda w, s, v: w.at[s].max(v))(written, slots, valid)


@dataclasses.dataclass(frozen=True)
class BandRecipe:
    """A hashable description of an empty band cache (see zipjax.sharding.jit_initializer)."""

    config: ModelConfig
    method: QuantMethod
    batch: int
    max_len: int
    span: int
    prefill_len: int
    band: int
    rewrites: bool = False
    kernel: bool | None = None

    def __call__(self, starts: jax.Array) -> BandKVCache:
        return BandKVCache.init(self.config, self.method, self.batch, self.max_len, self.span, self.prefill_len,
                                self.band, starts, self.rewrites, self.kernel)


def check_band(cache) -> None:
    """After decoding: a band cache (this module's or KIVI's) whose ring was overwritten while still needed is a
    bug, said so."""
    overflow = getattr(cache, "overflow", None)
    if overflow is not None and bool(jax.device_get(overflow)):
        raise ZipjaxError("internal error: the compressed cache's full-precision band was too short for the "
                          "decoder's rows in flight")
