"""A KIVI KV cache for parallel image decoding: KIVI's precision rule per query slot, over scattered writes.

Sequential KIVI (zipjax.kv.kivi; Liu et al., ICML 2024, and its official code) gives the query at slot c (R =
`residual`, G = `group` tokens per key statistic):

  keys    slots below floor(c / R) * R quantized per channel, one (step, min) per run of G tokens; the rest in full
          precision (the key residual, quantized together when it reaches R tokens);
  values  slots below c - R quantized per token (groups of `group` channels); the R most recent in full precision.

ZipAR, adaptive ZipAR and SJD write several tokens per pass at scattered raster slots (zipjax.zipar.cache), so
"the most recent R" and "a completed residual" are defined here per query slot in raster order, the sequential rule
read at the query's own slot: a query at slot c sees

  the key of slot s   quantized iff s < floor(c / R) * R and every slot of s's G-token run is written;
  the value of s      quantized iff s < c - R.

A run some of whose slots are not written yet (a row above still in flight) keeps its keys in full precision: its
statistics do not exist yet. With one token per pass in raster order every slot below c is written, so this is the
sequential cache's rule, query for query. The cache:

  store   slot-addressed (token s at index s) KIVI codes (zipjax.kv.codec.Store, KIVI's layout): a token's value is
          quantized when it is written (per token: it depends on that token only), a run's keys when its last slot
          is written; a pass that rewrites a slot (SJD's drafts) re-encodes its value and, if complete, its run.
          `slots[s]` is s once s's run is quantized (its value is), else -1.
  band    a full-precision ring of `band` entries (slot s at s % band) for every slot some query can still read in
          full precision: with L the lowest slot a pass or a later one queries (its lowest query, the first unwritten
          slot, the first rewritable slot), that is every slot from L - R (values: s >= c - R >= L - R; keys of the
          unquantized runs and of R's residual lie above). `band` is a static bound from the decoder: its rows in
          flight plus R (zipjax.zipar.compressed.band_margin); a write over an entry still needed sets `overflow`.

A pass writes its K/V into the ring, encodes the values, quantizes the runs its writes complete (or rewrite), and
then attends: every query reads its store part (both quantized: s <= c - R - 1 and s's run quantized) and the rest
from the ring, where a ring entry's key and value are each taken dequantized or full precision by the rule above;
the two parts are merged by log-sum-exp. The store part is the packed-code kernel for several queries per sequence
(zipjax.kernels.quantized_multi_query, KIVI's store is its segment: key runs of G tokens, values per token) by the
kernel policy (zipjax.platform.use_kernel: the decoder's `kernel`, else KIVI's), else its jnp reference; the ring
is jnp. Static shapes; per sequence: the written bitmap and the ring's slots (adaptive schedules and SJD differ
between samples). The prompt pass is exact attention, its values and complete key runs encoded, its last R tokens
into the ring. Imports: KIVI's cache pieces, the codec, the shared attention, the multi-query kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.attention import MASK_VALUE, cache_attention, group_queries, grouped_scores, grouped_values, ungroup
from zipjax.cache import check_batch, replace_at
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kernels.common import TINY
from zipjax.kernels.quantized_attention import PackedSegment
from zipjax.kernels.quantized_multi_query import kernel_takes, merge_lse, multi_query
from zipjax.kv.codec import Store, dequantize, grouped, pack, quantize_key_blocks, unpack
from zipjax.kv.kivi import KIVI, KIVICache, KIVILayer, encode_values
from zipjax.platform import use_kernel
from zipjax.zipar.compressed import multi_query_per_shard


class KIVIPlan(NamedTuple):
    """What one pass does to the cache, the same for every layer (computed from the slots it writes)."""

    written: jax.Array  # bool [batch, max_len] after the pass
    ring: jax.Array  # int32 [batch, q]: the ring entry each query writes (band: padding, dropped)
    band_slot: jax.Array  # int32 [batch, band] after the writes
    keyed: jax.Array  # bool [batch, capacity]: slots whose key run is complete (quantized) after the pass
    run_slots: jax.Array  # int32 [batch, q, G]: the run of each query's slot
    complete: jax.Array  # bool [batch, q]: the query is real and its run complete after the pass
    overflow: jax.Array  # bool []


@struct.dataclass
class KIVIBandCache:
    layers: tuple[KIVILayer, ...]  # store: slot-addressed codes; k_ring, v_ring [batch, kv_heads, band, head_dim]
    written: jax.Array  # bool [batch, max_len]
    starts: jax.Array  # int32 [batch]: first slot of each sequence's prompt
    slots: jax.Array  # int32 [batch, q]: slots of the current pass's tokens
    valid: jax.Array  # bool [batch, q]
    settled: jax.Array  # int32 [batch]: slots from here on may be rewritten (SJD's drafts)
    band_slot: jax.Array  # int32 [batch, band]: the slot each ring entry holds (-1: none)
    overflow: jax.Array  # bool []: the band was too short (a bug if ever set)
    method: KIVI = struct.field(pytree_node=False)
    prefill_len: int = struct.field(pytree_node=False)
    prompt: bool = struct.field(pytree_node=False, default=True)  # the next pass is the prompt
    kernel: bool | None = struct.field(pytree_node=False, default=None)  # the store's attention: zipjax.platform
    accepts_chunks: ClassVar[bool] = False

    @classmethod
    def init(cls, config: ModelConfig, method: KIVI, batch: int, max_len: int, prefill_len: int, band: int,
             starts: jax.Array, kernel: bool | None = None) -> KIVIBandCache:
        """An empty cache of `max_len` slots after a `prefill_len`-slot prompt, with a ring of `band` entries."""
        method.check(config, batch, max_len, prefill_len)
        if band <= method.residual:
            raise ZipjaxError(f"the KIVI band cache needs a ring longer than residual={method.residual}, got {band}")
        store = KIVICache.init(config, method, batch, max_len, prefill_len, starts).layers[0].store
        ring = jnp.zeros((batch, config.num_kv_heads, band, config.head_dim), config.jnp_dtype)
        layer = KIVILayer(store=store, k_ring=ring, v_ring=ring)
        b = batch
        return cls(layers=(layer,) * config.num_layers, written=jnp.zeros((b, max_len), bool),
                   starts=jnp.asarray(starts, jnp.int32), slots=jnp.zeros((b, 1), jnp.int32),
                   valid=jnp.zeros((b, 1), bool), settled=jnp.full((b,), max_len, jnp.int32),
                   band_slot=jnp.full((b, band), -1, jnp.int32), overflow=jnp.zeros((), bool), method=method,
                   prefill_len=prefill_len, kernel=kernel)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.written.shape[1]

    @property
    def band(self) -> int:
        return self.band_slot.shape[1]

    @property
    def capacity(self) -> int:
        return self.layers[0].store.k_codes.shape[2]

    def at(self, slots: jax.Array, valid: jax.Array, settled: jax.Array | None = None) -> KIVIBandCache:
        """The cache ready for a pass whose tokens go to `slots` ([q] or [batch, q]; valid False: padding); slots
        from `settled` ([batch]) on may be rewritten by a later pass (None: none will)."""
        shape = (self.batch, slots.shape[-1])
        slots, valid = jnp.broadcast_to(slots, shape), jnp.broadcast_to(valid, shape)
        slots = jnp.where(valid, slots, self.max_len - 1).astype(jnp.int32)
        settled = jnp.full((self.batch,), self.max_len, jnp.int32) if settled is None else settled
        return dataclasses.replace(self, slots=slots, valid=valid, settled=jnp.asarray(settled, jnp.int32))

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def logical_axes(self) -> KIVIBandCache:
        specs = jax.tree.map(lambda x: PartitionSpec(*("batch", "kv_heads", "seq", "head_dim")[:x.ndim]), self)
        per_seq = PartitionSpec("batch")
        return dataclasses.replace(specs, written=per_seq, starts=per_seq, slots=per_seq, valid=per_seq,
                                   settled=per_seq, band_slot=per_seq, overflow=PartitionSpec())

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        batch, num_tokens = tokens_shape
        check_batch(batch, self.batch)
        if self.prompt and num_tokens != self.prefill_len:
            raise ZipjaxError(f"the KIVI band cache takes the prompt as one pass of {self.prefill_len} tokens "
                              f"first, got {num_tokens}")
        if num_tokens != self.slots.shape[1]:
            raise ZipjaxError(f"{num_tokens} tokens fed but the cache was told {self.slots.shape[1]} slots")

    @property
    def uses_kernel(self) -> bool:
        """Whether the store is read by the packed-code kernel, for the platform being traced."""
        return use_kernel(self.kernel)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, KIVIBandCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        if sliding_window is not None:
            raise ZipjaxError("parallel image decoding does not support sliding-window attention")
        attend = self._attend_prompt if self.prompt else self._attend_pass
        out, state = attend(self.layers[layer], q, k_new, v_new)
        return out, dataclasses.replace(self, layers=replace_at(self.layers, layer, state))

    def advance(self, num_tokens: int) -> KIVIBandCache:
        if self.prompt:
            held = self._prompt_ring_slots()
            band_slot = self.band_slot.at[:, held % self.band].set(jnp.asarray(held, jnp.int32))
            return dataclasses.replace(self, written=_written_after(self.written, self.slots, self.valid),
                                       band_slot=band_slot, prompt=False)
        plan = self._plan()
        return dataclasses.replace(self, written=plan.written, band_slot=plan.band_slot,
                                   overflow=self.overflow | plan.overflow)

    def _prompt_ring_slots(self) -> np.ndarray:
        """The prompt's newest slots the ring holds after the prompt pass: R and more, as many as it has room for."""
        n = self.prefill_len
        return np.arange(max(n - self.band, 0), n)

    def _attend_prompt(self, state: KIVILayer, q, k_new, v_new) -> tuple[jax.Array, KIVILayer]:
        """Exact attention over the prompt; every value encoded, the complete key runs quantized, the newest slots
        into the ring."""
        n, kb, bits = q.shape[1], self.method.key_block, self.method.bits
        k = k_new.transpose(0, 2, 1, 3).astype(state.k_ring.dtype)  # [batch, kv_heads, n, head_dim]
        v = v_new.transpose(0, 2, 1, 3).astype(state.v_ring.dtype)
        out = cache_attention(q, k, v, jnp.zeros((), jnp.int32), self.starts, None)
        store = state.store
        codes, step, minimum = encode_values(v, bits, self.method.group)
        store = store.replace(v_codes=store.v_codes.at[:, :, :n].set(codes), v_step=store.v_step.at[:, :, :n].set(step),
                              v_min=store.v_min.at[:, :, :n].set(minimum))
        keyed = (n // kb) * kb
        if keyed:
            valid = jnp.broadcast_to((jnp.arange(keyed) >= self.starts[:, None])[:, None], (*k.shape[:2], keyed))
            codes, step, minimum = quantize_key_blocks(k[:, :, :keyed], bits, kb, valid)
            store = store.replace(k_codes=store.k_codes.at[:, :, :keyed].set(pack(codes, bits)),
                                  k_step=store.k_step.at[:, :, :keyed // kb].set(step),
                                  k_min=store.k_min.at[:, :, :keyed // kb].set(minimum))
        marks = jnp.where(jnp.arange(self.capacity) < keyed, jnp.arange(self.capacity), -1)
        store = store.replace(slots=jnp.broadcast_to(marks.astype(store.slots.dtype), store.slots.shape))
        held = self._prompt_ring_slots()
        k_ring = state.k_ring.at[:, :, held % self.band].set(k[:, :, held])
        v_ring = state.v_ring.at[:, :, held % self.band].set(v[:, :, held])
        return out, KIVILayer(store=store, k_ring=k_ring, v_ring=v_ring)

    def _attend_pass(self, state: KIVILayer, q, k_new, v_new) -> tuple[jax.Array, KIVILayer]:
        """Write the pass's K/V into the ring, encode its values and the runs it completes, then attend."""
        plan = self._plan()
        ring_write = jax.vmap(lambda buf, r, new: buf.at[:, r].set(new.astype(buf.dtype), mode="drop"))
        k_ring = ring_write(state.k_ring, plan.ring, k_new.transpose(0, 2, 1, 3))
        v_ring = ring_write(state.v_ring, plan.ring, v_new.transpose(0, 2, 1, 3))
        state = KIVILayer(store=self._encode(state.store, plan, k_ring, v_ring), k_ring=k_ring, v_ring=v_ring)
        store_part = self._store_attention(state.store, q)
        out, _ = merge_lse([store_part, self._ring_attention(state, q, plan)])
        return out.astype(q.dtype), state

    def _encode(self, store: Store, plan: KIVIPlan, k_ring: jax.Array, v_ring: jax.Array) -> Store:
        """The pass's values encoded per token at their slots; the key runs its writes complete (or rewrite)
        quantized per channel from the ring; the store's marks: slots whose run is quantized."""
        bits, kb, band, cap = self.method.bits, self.method.key_block, self.band, self.capacity
        at = jnp.where(self.valid, self.slots, cap)  # [batch, q]; padding dropped
        gather = jax.vmap(lambda ring, r: ring[:, r])  # [kv_heads, band, d], [n] -> [kv_heads, n, d]
        new_values = gather(v_ring, jnp.where(self.valid, self.slots % band, 0))
        codes, step, minimum = encode_values(new_values, bits, self.method.group)
        put = jax.vmap(lambda x, i, new: x.at[:, i].set(new.astype(x.dtype), mode="drop"))
        store = store.replace(v_codes=put(store.v_codes, at, codes), v_step=put(store.v_step, at, step),
                              v_min=put(store.v_min, at, minimum))
        b, q = self.slots.shape
        runs = plan.run_slots.reshape(b, q * kb)
        keys = gather(k_ring, runs % band)  # [batch, kv_heads, q * G, head_dim]
        valid = jnp.broadcast_to((runs >= self.starts[:, None])[:, None], keys.shape[:3])
        codes, step, minimum = quantize_key_blocks(keys, bits, kb, valid)
        code_at = jnp.where(jnp.repeat(plan.complete, kb, axis=1), runs, cap)
        run_at = jnp.where(plan.complete, plan.run_slots[:, :, 0] // kb, cap // kb)
        marks = jnp.where(plan.keyed, jnp.arange(cap), -1).astype(store.slots.dtype)
        return store.replace(k_codes=put(store.k_codes, code_at, pack(codes, bits)),
                             k_step=put(store.k_step, run_at, step), k_min=put(store.k_min, run_at, minimum),
                             slots=jnp.broadcast_to(marks[:, None], store.slots.shape))

    def _store_attention(self, store: Store, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(out, lse) of each query over the store's tokens whose key and value it reads quantized: run quantized
        (the store's marks) and slot <= c - R - 1; by the packed-code kernel or its jnp reference."""
        segment = PackedSegment(store.k_codes, store.k_step, store.k_min, store.v_codes, store.v_step, store.v_min,
                                None, store.slots)
        kernel = self.uses_kernel and kernel_takes(self.capacity)  # else the kernel's jnp reference
        attend = functools.partial(multi_query, bits=self.method.bits, block=self.method.key_block,
                                   group=self.method.group, kernel=kernel)
        return multi_query_per_shard(attend, q, segment, self.slots - self.method.residual - 1, self.starts)

    def _ring_attention(self, state: KIVILayer, q: jax.Array, plan: KIVIPlan) -> tuple[jax.Array, jax.Array]:
        """(out, lse) of each query over the ring's entries it does not read from the store; each entry's key and
        value dequantized from the store or in full precision, by KIVI's rule at the query's slot."""
        r, h = self.method.residual, state.k_ring.shape[1]
        entry = jnp.where(plan.band_slot >= 0, plan.band_slot, 0)[:, None, :]  # [batch, 1, band]
        c = self.slots[:, :, None]  # [batch, q, 1]
        readable = ((plan.band_slot >= 0) & jnp.take_along_axis(plan.written, entry[:, 0], axis=1))[:, None, :]
        readable &= (entry >= self.starts[:, None, None]) & (entry <= c)
        keyed = jnp.take_along_axis(plan.keyed, entry[:, 0], axis=1)[:, None, :]
        mask = readable & ~(keyed & (entry < c - r))  # [batch, q, band]
        key_quantized = keyed & (entry < c // r * r)
        value_quantized = entry < c - r
        keys, values = self._dequantized(state.store, entry[:, 0])  # [batch, kv_heads, band, head_dim]
        qg = group_queries(q.astype(jnp.float32), h)
        scores = jnp.where(key_quantized[:, None, None], grouped_scores(qg, keys),
                           grouped_scores(qg, state.k_ring.astype(jnp.float32)))
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        top = scores.max(axis=-1, keepdims=True)
        p = jnp.where(mask[:, None, None], jnp.exp(scores - top), 0.0)
        total = p.sum(axis=-1, keepdims=True)
        quantized = value_quantized[:, None, None]
        acc = (grouped_values(jnp.where(quantized, p, 0.0), values)
               + grouped_values(jnp.where(quantized, 0.0, p), state.v_ring.astype(jnp.float32)))
        out = ungroup(acc / jnp.maximum(total, TINY))
        lse = ungroup(jnp.where(total > 0, top + jnp.log(jnp.maximum(total, TINY)), MASK_VALUE))[..., 0]
        return out, lse

    def _dequantized(self, store: Store, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The store's keys and values at `slots` [batch, n], dequantized: float32 [batch, kv_heads, n, head_dim]."""
        bits, kb, d = self.method.bits, self.method.key_block, store.k_step.shape[-1]
        take = jax.vmap(lambda x, i: x[:, i])
        keys = dequantize(unpack(take(store.k_codes, slots), bits), take(store.k_step, slots // kb),
                          take(store.k_min, slots // kb))
        codes = grouped(unpack(take(store.v_codes, slots), bits), self.method.group or d)
        values = dequantize(codes, take(store.v_step, slots)[..., None], take(store.v_min, slots)[..., None])
        return keys, values.reshape(keys.shape)

    def _plan(self) -> KIVIPlan:
        """The pass's bookkeeping from the slots it writes: ring entries, complete key runs, the band's check."""
        band, kb, cap = self.band, self.method.key_block, self.capacity
        slots, valid = self.slots, self.valid
        written = _written_after(self.written, slots, valid)
        ring = jnp.where(valid, slots % band, band)
        band_slot = jax.vmap(lambda bs, r, s: bs.at[r].set(s, mode="drop"))(self.band_slot, ring, slots)
        padded = jnp.pad(written, ((0, 0), (0, cap - self.max_len)))
        keyed = jnp.repeat(padded.reshape(self.batch, cap // kb, kb).all(axis=2), kb, axis=1)  # [batch, cap]
        run_slots = (slots // kb * kb)[:, :, None] + jnp.arange(kb, dtype=jnp.int32)  # [batch, q, G]
        complete = valid & jnp.take_along_axis(keyed, slots, axis=1)
        first_unwritten = jnp.argmax(~self.written, axis=1).astype(jnp.int32)
        lowest = jnp.minimum(jnp.min(jnp.where(valid, slots, self.max_len), axis=1),
                             jnp.minimum(first_unwritten, self.settled))  # [batch]: L
        occupant = jnp.take_along_axis(self.band_slot, jnp.minimum(ring, band - 1), axis=1)
        needed = jnp.maximum(self.starts, lowest - self.method.residual)[:, None]
        evicted = valid & (occupant >= needed) & (occupant != slots)
        held = jnp.take_along_axis(band_slot, run_slots.reshape(self.batch, -1) % band, axis=1)
        lost = jnp.repeat(complete, kb, axis=1) & (held != run_slots.reshape(self.batch, -1))
        return KIVIPlan(written, ring, band_slot, keyed, run_slots, complete, jnp.any(evicted) | jnp.any(lost))


def _written_after(written: jax.Array, slots: jax.Array, valid: jax.Array) -> jax.Array:
    return jax.vmap(lambda w, s, v: w.at[s].max(v))(written, slots, valid)


@dataclasses.dataclass(frozen=True)
class KIVIBandRecipe:
    """A hashable description of an empty KIVI band cache (see zipjax.sharding.jit_initializer)."""

    config: ModelConfig
    method: KIVI
    batch: int
    max_len: int
    prefill_len: int
    band: int
    kernel: bool | None = None

    def __call__(self, starts: jax.Array) -> KIVIBandCache:
        return KIVIBandCache.init(self.config, self.method, self.batch, self.max_len, self.prefill_len, self.band,
                                  starts, self.kernel)
