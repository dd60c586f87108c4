"""KIVI's KV cache (Liu et al., ICML 2024) as its official code runs it: per-run key statistics, a key residual
quantized as a whole, a sliding window of full-precision values.

With T tokens written (T = the cache cursor, left padding included) and R = `residual`:

  keys    slots [0, (T // R) R) are quantized per channel with one (step, min) per run of `group` tokens; the rest
          (at most R - 1) are held in full precision. Prefill quantizes the prompt's first T0 - T0 % R keys; a decode
          step appends its key to the residual, attends, and quantizes the residual when it reaches R tokens.
  values  slots [0, max(T - R, 0)) are quantized per token in groups of `group` channels; the last R are held in
          full precision. A decode step appends its value (R + 1 in full precision while it attends, as the code
          does), then quantizes the oldest, so one value leaves the window per step.

Both boundaries are functions of the cursor, so the cache keeps no counters. Layout per layer:

  store (`Store`, slot-addressed: token s at index s)
      K, V codes     uint8 [batch, kv_heads, capacity, head_dim * bits / 8]
      K (step, min)  float16 [batch, kv_heads, capacity / group, head_dim]
      V (step, min)  float16 [batch, kv_heads, capacity, head_dim / group]
      slots          int16 [batch, kv_heads, capacity]: s once s's value is quantized (its key is by then), else -1
  ring   K, V [batch, kv_heads, R + 1, head_dim] in the cache dtype: token s at index s % (R + 1), the newest R + 1

Attention over a decode step: the store's tokens (both parts quantized) and the window's R + 1 tokens, whose keys are
the dequantized store keys below (T // R) R and the ring's keys above. The store is read by the packed-code Pallas
kernel (zipjax.kernels.quantized_attention, one segment of `group`-token blocks) on TPU / GPU or with kernel=True,
and dequantized in jnp otherwise; the window is always jnp, merged with the kernel's partial state by log-sum-exp.

Where zipjax differs from the code: statistics are per sequence and left padding is left out of them (the code
batches statistics without padding); the prefill's split points are computed on slots, shared by the batch.

    zipjax.generate(model, ids, n, kv=KIVI(bits=2, group=32, residual=128))

Imports: attention, cache, platform, codec, method, sharding, the kernel.
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

from zipjax.attention import MASK_VALUE, cache_attention, grouped_scores, masked_attention, visible_slots
from zipjax.cache import check_prompt_then_tokens, replace_at
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kernels.quantized_attention import PackedSegment, combine, segment_attention
from zipjax.kv.codec import (
    SCALE_DTYPE,
    Codec,
    Store,
    dequantize,
    grouped,
    pack,
    quantize,
    quantize_key_blocks,
    unpack,
)
from zipjax.kv.method import (
    check_bits,
    check_block_sizes,
    check_field_types,
    check_group,
    check_kernel,
    check_packing,
    check_positive,
)
from zipjax.platform import use_kernel
from zipjax.sharding import states_per_shard


@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVI:
    """KIVI as its official code runs it (jy-yuan/KIVI, models/llama_kivi.py), cached by `KIVICache`:

      keys    per channel, statistics per (channel, run of `group` tokens); the newest keys (the prompt's last
              T0 % residual, then the decode tokens) stay in full precision until `residual` of them have gathered,
              then are quantized together;
      values  per token, in groups of `group` channels; the `residual` most recent values stay in full precision,
              a sliding window: each decode step quantizes the one value that leaves it.

    `group` is both the key run length and the value channel group (the code's one `group_size`); None quantizes
    values per whole head and keys per run of `residual` tokens."""

    name: ClassVar[str] = "kivi"
    has_kernel: ClassVar[bool] = True
    bits: int = 2
    group: int | None = 32
    residual: int = 128
    kernel: bool | None = None

    def __post_init__(self):
        check_field_types(self)
        check_kernel(self.kernel)
        check_bits("bits", self.bits)
        check_group(self.group)
        check_positive("residual", self.residual)
        if self.group is not None and self.residual % self.group:
            raise ZipjaxError(f"KIVI quantizes the key residual in runs of group={self.group} tokens: residual "
                              f"({self.residual}) must be a multiple of group")

    @property
    def uses_kernel(self) -> bool:
        """Whether decode attention runs the Pallas kernel, for the platform being traced (see `kernel`)."""
        return use_kernel(self.kernel)

    @property
    def key_block(self) -> int:
        """Tokens per channel-wise key statistic."""
        return self.group or self.residual

    @property
    def codec(self) -> Codec:
        return Codec("channel", "token", self.group, key_block=self.key_block)

    @property
    def decode_slots(self) -> int:
        """None beyond the prompt: the residual windows live in their own rings."""
        return 0

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        check_block_sizes(batch, max_len, prefill_len)
        check_packing(config, self.bits, self.group)

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype=None) -> KIVICache:
        return KIVICache.init(config, self, batch, max_len, prefill_len, starts, dtype)


@struct.dataclass
class KIVILayer:
    store: Store
    k_ring: jax.Array  # [batch, kv_heads, residual + 1, head_dim]
    v_ring: jax.Array


def encode_values(v: jax.Array, bits: int, group: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token values [b, h, n, d] -> packed codes [b, h, n, d * bits / 8], (step, min) float16 [b, h, n, groups]."""
    g = group or v.shape[-1]
    codes, step, minimum = quantize(grouped(v.astype(jnp.float32), g), bits, axis=-1)
    return pack(codes.reshape(v.shape), bits), step[..., 0], minimum[..., 0]


def _write(array: jax.Array, value: jax.Array, at: jax.Array | int) -> jax.Array:
    """`value` written into `array` along axis 2 from index `at`."""
    return jax.lax.dynamic_update_slice_in_dim(array, value.astype(array.dtype), at, axis=2)


@struct.dataclass
class KIVICache:
    layers: tuple[KIVILayer, ...]
    cursor: jax.Array  # int32 []: next slot to write, shared by the batch
    starts: jax.Array  # int32 [batch]: first real slot of each sequence
    method: KIVI = struct.field(pytree_node=False)
    prefill_len: int = struct.field(pytree_node=False)
    max_len: int = struct.field(pytree_node=False)
    accepts_chunks: ClassVar[bool] = False  # the prompt is split into quantized and full-precision parts at once

    @classmethod
    def init(cls, config: ModelConfig, method: KIVI, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> KIVICache:
        """An empty cache that takes a prompt of `prefill_len` slots, then decode tokens up to `max_len`."""
        method.check(config, batch, max_len, prefill_len)
        dtype = dtype or config.jnp_dtype
        b, h, d, kb = batch, config.num_kv_heads, config.head_dim, method.key_block
        capacity = -(-max_len // kb) * kb
        groups, width = d // (method.group or d), d * method.bits // 8
        slot_dtype = jnp.int16 if max_len < 2**15 else jnp.int32

        def layer() -> KIVILayer:
            stats = lambda *shape: (jnp.ones(shape, SCALE_DTYPE), jnp.zeros(shape, SCALE_DTYPE))
            k_step, k_min = stats(b, h, capacity // kb, d)
            v_step, v_min = stats(b, h, capacity, groups)
            store = Store(k_codes=jnp.zeros((b, h, capacity, width), jnp.uint8),
                          v_codes=jnp.zeros((b, h, capacity, width), jnp.uint8),
                          slots=jnp.full((b, h, capacity), -1, slot_dtype),
                          k_step=k_step, k_min=k_min, v_step=v_step, v_min=v_min)
            ring = (b, h, method.residual + 1, d)
            return KIVILayer(store=store, k_ring=jnp.zeros(ring, dtype), v_ring=jnp.zeros(ring, dtype))

        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        return cls(layers=tuple(layer() for _ in range(config.num_layers)), cursor=jnp.zeros((), jnp.int32),
                   starts=starts, method=method, prefill_len=prefill_len, max_len=max_len)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def lengths(self) -> jax.Array:
        return self.cursor - self.starts

    @property
    def ring_len(self) -> int:
        return self.method.residual + 1

    def nbytes(self) -> int:
        """Bytes held by every array: codes, key run statistics, value statistics, slots, the two rings."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def logical_axes(self) -> KIVICache:
        per_head = PartitionSpec("batch", "kv_heads")
        specs = jax.tree.map(lambda x: per_head, self)
        return dataclasses.replace(specs, cursor=PartitionSpec(), starts=PartitionSpec("batch"))

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        check_prompt_then_tokens(tokens_shape, "KIVI", self.batch, self.prefill_len, self.cursor, self.max_len)

    def advance(self, num_tokens: int) -> KIVICache:
        return dataclasses.replace(self, cursor=self.cursor + num_tokens)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, KIVICache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        attend = self._attend_prompt if q.shape[1] > 1 else self._attend_token
        out, state = attend(self.layers[layer], q, k_new, v_new, sliding_window)
        return out, dataclasses.replace(self, layers=replace_at(self.layers, layer, state))

    def _valid(self, slots: jax.Array) -> jax.Array:
        """bool [batch, kv_heads, n]: which of the slots [n] hold a real token (not left padding)."""
        return jnp.broadcast_to((slots[None, :] >= self.starts[:, None])[:, None, :],
                                (self.batch, self.layers[0].k_ring.shape[1], slots.shape[0]))

    def _attend_prompt(self, state: KIVILayer, q, k_new, v_new, sliding_window):
        """Exact attention over the prompt; quantize its first T0 - T0 % R keys and T0 - R values, keep the rest in
        the rings."""
        n, r, kb, bits = q.shape[1], self.method.residual, self.method.key_block, self.method.bits
        k, v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [batch, kv_heads, n, head_dim]
        out = cache_attention(q, k, v, jnp.zeros((), jnp.int32), self.starts, sliding_window)
        store = state.store
        keys_quantized, values_quantized = (n // r) * r, max(n - r, 0)
        if keys_quantized:
            slots = jnp.arange(keys_quantized, dtype=jnp.int32)
            codes, step, minimum = quantize_key_blocks(k[:, :, :keys_quantized], bits, kb, self._valid(slots))
            store = store.replace(k_codes=_write(store.k_codes, pack(codes, bits), 0),
                                  k_step=_write(store.k_step, step, 0), k_min=_write(store.k_min, minimum, 0))
        if values_quantized:
            codes, step, minimum = encode_values(v[:, :, :values_quantized], bits, self.method.group)
            slots = jnp.broadcast_to(jnp.arange(values_quantized, dtype=store.slots.dtype),
                                     (*store.slots.shape[:2], values_quantized))
            store = store.replace(v_codes=_write(store.v_codes, codes, 0), v_step=_write(store.v_step, step, 0),
                                  v_min=_write(store.v_min, minimum, 0), slots=_write(store.slots, slots, 0))
        held = np.arange(max(n - self.ring_len, 0), n)  # the newest ring_len prompt tokens, at s % ring_len
        k_ring = state.k_ring.at[:, :, held % self.ring_len].set(k[:, :, held].astype(state.k_ring.dtype))
        v_ring = state.v_ring.at[:, :, held % self.ring_len].set(v[:, :, held].astype(state.v_ring.dtype))
        return out, KIVILayer(store=store, k_ring=k_ring, v_ring=v_ring)

    def _attend_token(self, state: KIVILayer, q, k_new, v_new, sliding_window):
        """Write the token into the rings, attend over store + window, then quantize a full key residual and the
        value that left the window."""
        c, w = self.cursor, self.ring_len
        k_ring = _write(state.k_ring, k_new.transpose(0, 2, 1, 3), c % w)
        v_ring = _write(state.v_ring, v_new.transpose(0, 2, 1, 3), c % w)
        state = state.replace(k_ring=k_ring, v_ring=v_ring)
        ring_slots = c - (c - jnp.arange(w, dtype=jnp.int32)) % w  # [w]: the slot each ring index holds
        window_keys = self._window_keys(state, ring_slots)
        attention = self._kernel_attention if self.method.uses_kernel else self._jnp_attention
        out = attention(state, q, window_keys, ring_slots, sliding_window)
        state = jax.lax.cond((c + 1) % self.method.residual == 0, self._quantize_key_residual, lambda s: s, state)
        state = jax.lax.cond(c >= self.method.residual, self._quantize_oldest_value, lambda s: s, state)
        return out.astype(q.dtype), state

    def _window_keys(self, state: KIVILayer, ring_slots: jax.Array) -> jax.Array:
        """float32 [batch, kv_heads, w, head_dim]: each window token's key as attention sees it: dequantized from
        the store below the key boundary (T // R) R, the full-precision ring key above it."""
        store, bits, kb = state.store, self.method.bits, self.method.key_block
        at = jnp.clip(ring_slots, 0, store.k_codes.shape[2] - 1)
        codes = unpack(jnp.take(store.k_codes, at, axis=2), bits)
        quantized = dequantize(codes, jnp.take(store.k_step, at // kb, axis=2), jnp.take(store.k_min, at // kb, axis=2))
        boundary = (self.cursor // self.method.residual) * self.method.residual
        below = (ring_slots < boundary)[None, None, :, None]
        return jnp.where(below, quantized, state.k_ring.astype(jnp.float32))

    def _jnp_attention(self, state: KIVILayer, q, window_keys, ring_slots, sliding_window):
        store, bits = state.store, self.method.bits
        keys = dequantize(unpack(store.k_codes, bits), *(
            jnp.repeat(x, self.method.key_block, axis=2) for x in (store.k_step, store.k_min)))
        values = dequantize(grouped(unpack(store.v_codes, bits), self.method.group or keys.shape[-1]),
                            store.v_step[..., None], store.v_min[..., None]).reshape(keys.shape)
        b, h, w = *keys.shape[:2], ring_slots.shape[0]
        keys = jnp.concatenate([keys, window_keys], axis=2)
        values = jnp.concatenate([values, state.v_ring.astype(jnp.float32)], axis=2)
        slots = jnp.concatenate([store.slots.astype(jnp.int32), jnp.broadcast_to(ring_slots, (b, h, w))], axis=2)
        visible = visible_slots(slots, self.cursor, self.starts[:, None, None], sliding_window)
        return masked_attention(q, keys, values, visible[:, :, None, :])[0]

    def _kernel_attention(self, state: KIVILayer, q, window_keys, ring_slots, sliding_window):
        """The Pallas kernel over the store's packed codes (blocks of `group` tokens; per shard of the context mesh,
        zipjax.sharding.states_per_shard), the window in jnp, merged exactly by log-sum-exp."""
        store = state.store
        b, h, _, d = window_keys.shape
        qg = q[:, 0].reshape(b, h, -1, d).astype(jnp.float32)  # [batch, kv_heads, G, head_dim]
        kernel = functools.partial(segment_attention, bits=self.method.bits, block=self.method.key_block,
                                   group=self.method.group, sliding_window=sliding_window)
        arrays = PackedSegment(store.k_codes, store.k_step, store.k_min, store.v_codes, store.v_step, store.v_min,
                               None, store.slots)
        stored = states_per_shard(kernel, qg, arrays, self.cursor, self.starts)
        visible = visible_slots(ring_slots, self.cursor, self.starts[:, None, None], sliding_window)[:, :, None, :]
        scores = grouped_scores(qg[:, :, :, None], window_keys)[:, :, :, 0]  # [batch, kv_heads, G, w]
        scores = jnp.where(visible, scores, MASK_VALUE)
        m = scores.max(axis=-1)
        p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
        acc = jnp.einsum("bhgs,bhsd->bhgd", p, state.v_ring.astype(jnp.float32))
        out, _, _ = combine([stored, (m[:, :, None], p.sum(axis=-1)[:, :, None], acc[:, :, None])])
        return out.reshape(q.shape)

    def _quantize_key_residual(self, state: KIVILayer) -> KIVILayer:
        """The R residual keys (slots c + 1 - R .. c) into the store, one statistic per channel and run."""
        r, kb, bits = self.method.residual, self.method.key_block, self.method.bits
        first = self.cursor + 1 - r
        slots = first + jnp.arange(r, dtype=jnp.int32)
        keys = jnp.take(state.k_ring, slots % self.ring_len, axis=2)
        codes, step, minimum = quantize_key_blocks(keys, bits, kb, self._valid(slots))
        store = state.store
        store = store.replace(k_codes=_write(store.k_codes, pack(codes, bits), first),
                              k_step=_write(store.k_step, step, first // kb),
                              k_min=_write(store.k_min, minimum, first // kb))
        return state.replace(store=store)

    def _quantize_oldest_value(self, state: KIVILayer) -> KIVILayer:
        """The value of slot c - R leaves the window: quantized per token; the token joins the store."""
        slot = self.cursor - self.method.residual
        value = jax.lax.dynamic_slice_in_dim(state.v_ring, slot % self.ring_len, 1, axis=2)
        codes, step, minimum = encode_values(value, self.method.bits, self.method.group)
        store = state.store
        held = jnp.full((*store.slots.shape[:2], 1), slot, store.slots.dtype)
        store = store.replace(v_codes=_write(store.v_codes, codes, slot), v_step=_write(store.v_step, step, slot),
                              v_min=_write(store.v_min, minimum, slot), slots=_write(store.slots, held, slot))
        return state.replace(store=store)
