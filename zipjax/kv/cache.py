"""The quantized KV cache: a pytree with the dense cache's `attend` / `advance` interface, so every model runs on it.

Tokens are compressed a block at a time. Block 0 is the prompt (`prefill_len` slots, left-padded); after it, new
tokens stay in a full-precision buffer of `window` slots, and when the buffer is full it is ranked and compressed as
the next block (ZipCache's streaming, KIVI's residual). Within a block, each (sequence, KV head) ranks its tokens by
saliency; the top `split(n)[0]` go to subset 0 (high bits), the rest to subset 1 (low bits). Every block of a
subset has a static size, so a subset is one fixed-capacity array whose blocks sit at static offsets:

  per subset (`Store`):  K codes, V codes  uint8 [batch, kv_heads, capacity, head_dim * bits / 8] (packed)
                         slots             int16 [batch, kv_heads, capacity]  (cache slot of each token, -1: empty;
                                                                              int32 from 32k slots on)
                         K (step, min)     float16 [batch, kv_heads, blocks, head_dim]     (channel-wise keys)
                                           or [batch, kv_heads, capacity, groups]          (token-wise keys)
                         V (step, min)     float16 [batch, kv_heads, capacity, groups]     (token-wise values)
  per layer (`LayerKV`): V channel scale   float16 [batch, kv_heads, blocks, head_dim]     (CST values only)
                         K, V buffer       [batch, kv_heads, window, head_dim] in the model's dtype
                         attention mass    float32 [batch, kv_heads, window] received by each buffered token

Prefill attention is exact (full precision over the prompt, as in ZipCache where the prompt goes through
FlashAttention); the prompt's saliency comes from probe queries or the full matrix. A buffered token's saliency is
exact and free: the buffer is attended at full precision anyway, so each decode step adds the attention every
buffered token receives, and at compression the mass is divided by the number of queries that saw it (the
normalized score over the window). ZipCache's code instead ranks a window by the newest query alone, and its paper
by 5% probe rows of the window; this uses every row.

Decode attention has two explicit paths: the jnp reference dequantizes each segment and runs one softmax over
segments and buffer; with `kernel=True` the Pallas kernel (pallas_kernels.quantized_attention) reads each
segment's packed codes and scales directly and the partial states are merged with the buffer's by log-sum-exp.
Segments have uniform blocks for that kernel: per subset, the prompt block is one segment and the later blocks
another. Choices that differ from the official code, on purpose: statistics are per sequence
(the code shares key statistics across the batch, which makes a sequence's cache depend on its batch mates), value
rows are true per-(token, head) rows (the code groups different tokens of different heads by rank), and each block
is quantized once with its own statistics (the code re-quantizes the whole cache from its dequantized values every
100 tokens, compounding error).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from pallas_kernels.quantized_attention import combine, segment_attention_on_backend
from zipjax.attention import MASK_VALUE, causal_mask, gqa_attention, grouped_probs, visible_slots
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.methods import QuantSpec
from zipjax.kv.quantize import channel_scale, dequantize, grouped, pack, quantize, unpack
from zipjax.kv.saliency import prompt_saliency, prompt_statistics
from zipjax.kv.zipvl import important_count, important_order, sparse_prefill_attention


@dataclasses.dataclass(frozen=True)
class Segment:
    """One store: `blocks` blocks of `size` tokens of one subset at one bit width (uniform blocks, which is what
    the decode kernel's grid needs). The prompt block (0) and the later blocks (1 ..) are separate segments."""

    subset: int  # 0: salient (high bits), 1: regular (low bits)
    first_block: int  # 0 for the prompt segment, 1 for the streaming segment
    blocks: int
    size: int
    bits: int

    @property
    def capacity(self) -> int:
        return self.blocks * self.size

    def block_ids(self) -> np.ndarray:
        """int32 [capacity]: the segment-local block of each store index."""
        return np.repeat(np.arange(self.blocks, dtype=np.int32), self.size)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static block geometry of a quantized cache."""

    max_len: int
    prefill_len: int
    window: int
    head_dim: int
    bits: tuple[int, int]  # (salient, regular)
    first: tuple[int, int]  # (salient, regular) tokens of the prompt block
    rest: tuple[int, int]  # (salient, regular) tokens of each later block

    @property
    def num_blocks(self) -> int:
        # a later block is compressed when a token arrives at a full buffer: floor((T - 1) / window) times for T
        # decode tokens; the last window's tokens never leave the buffer
        return 1 + max(self.max_len - self.prefill_len - 1, 0) // self.window

    @property
    def slot_dtype(self):
        return jnp.int16 if self.max_len < 2**15 else jnp.int32

    def segments(self) -> tuple[Segment, ...]:
        """The non-empty stores, in the order of LayerKV.stores: per subset, the prompt segment, then the streaming
        segment."""
        out = []
        for s in (0, 1):
            if self.first[s]:
                out.append(Segment(s, 0, 1, self.first[s], self.bits[s]))
            if self.rest[s] and self.num_blocks > 1:
                out.append(Segment(s, 1, self.num_blocks - 1, self.rest[s], self.bits[s]))
        return tuple(out)


@struct.dataclass
class Store:
    k_codes: jax.Array
    v_codes: jax.Array
    slots: jax.Array
    k_step: jax.Array
    k_min: jax.Array
    v_step: jax.Array
    v_min: jax.Array


@struct.dataclass
class LayerKV:
    stores: tuple[Store, ...]  # one per entry of Layout.segments()
    v_scale: jax.Array | None
    k_buf: jax.Array
    v_buf: jax.Array
    mass: jax.Array


@struct.dataclass
class QuantizedKVCache:
    layers: tuple[LayerKV, ...]
    cursor: jax.Array  # int32 []: next slot to write, shared by the batch
    starts: jax.Array  # int32 [batch]: first real slot of each sequence
    buffered: jax.Array  # int32 []: tokens in the full-precision buffer
    blocks: jax.Array  # int32 []: blocks compressed so far
    spec: QuantSpec = struct.field(pytree_node=False)
    layout: Layout = struct.field(pytree_node=False)

    @classmethod
    def init(cls, config: ModelConfig, spec: QuantSpec, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> QuantizedKVCache:
        """An empty cache that takes a prompt block of `prefill_len` slots, then decode tokens up to `max_len`."""
        layout = make_layout(config, spec, batch, max_len, prefill_len)
        dtype = dtype or config.jnp_dtype
        b, h, d, nb, w = batch, config.num_kv_heads, config.head_dim, layout.num_blocks, spec.window
        groups = d // (spec.group or d)

        def store(seg: Segment) -> Store:
            cap, bits = seg.capacity, seg.bits
            k_stats = (b, h, seg.blocks, d) if spec.key_mode == "channel" else (b, h, cap, groups)
            return Store(k_codes=jnp.zeros((b, h, cap, d * bits // 8), jnp.uint8),
                         v_codes=jnp.zeros((b, h, cap, d * bits // 8), jnp.uint8),
                         slots=jnp.full((b, h, cap), -1, layout.slot_dtype),
                         k_step=jnp.ones(k_stats, jnp.float16), k_min=jnp.zeros(k_stats, jnp.float16),
                         v_step=jnp.ones((b, h, cap, groups), jnp.float16),
                         v_min=jnp.zeros((b, h, cap, groups), jnp.float16))

        def layer() -> LayerKV:
            return LayerKV(stores=tuple(store(seg) for seg in layout.segments()),
                           v_scale=jnp.ones((b, h, nb, d), jnp.float16) if spec.value_mode == "cst" else None,
                           k_buf=jnp.zeros((b, h, w, d), dtype), v_buf=jnp.zeros((b, h, w, d), dtype),
                           mass=jnp.zeros((b, h, w), jnp.float32))

        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        return cls(layers=tuple(layer() for _ in range(config.num_layers)), cursor=zero, starts=starts,
                   buffered=zero, blocks=zero, spec=spec, layout=layout)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.layout.max_len

    @property
    def lengths(self) -> jax.Array:
        return self.cursor - self.starts

    def nbytes(self) -> int:
        """Bytes held by every array of the cache (codes, scales, slots, buffer, counters)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def logical_axes(self) -> QuantizedKVCache:
        """PartitionSpecs of logical axis names: every per-token array is split by batch and KV head."""
        per_head = PartitionSpec("batch", "kv_heads")
        specs = jax.tree.map(lambda x: per_head, self)
        return dataclasses.replace(specs, cursor=PartitionSpec(), starts=PartitionSpec("batch"),
                                   buffered=PartitionSpec(), blocks=PartitionSpec())

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        check_prompt_then_tokens(tokens_shape, "quantized", self.batch, self.layout.prefill_len, self.cursor,
                                 self.max_len)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, QuantizedKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        if q.shape[1] > 1:
            out, state = self._prefill(layer, q, k_new, v_new, sliding_window)
        else:
            out, state = self._decode(layer, q, k_new, v_new, sliding_window)
        return out, dataclasses.replace(self, layers=(*self.layers[:layer], state, *self.layers[layer + 1:]))

    def advance(self, num_tokens: int) -> QuantizedKVCache:
        if num_tokens > 1:
            one = jnp.ones((), jnp.int32)
            return dataclasses.replace(self, cursor=self.cursor + num_tokens, blocks=one,
                                       buffered=jnp.zeros((), jnp.int32))
        full = self.buffered == self.spec.window
        return dataclasses.replace(self, cursor=self.cursor + 1, blocks=self.blocks + full.astype(jnp.int32),
                                   buffered=jnp.where(full, 1, self.buffered + 1))

    def _prefill(self, layer: int, q, k_new, v_new, sliding_window):
        length = q.shape[1]
        slots = jnp.arange(length, dtype=jnp.int32)
        valid = slots[None, :] >= self.starts[:, None]  # [batch, length]
        b_slots = jnp.broadcast_to(slots, valid.shape)
        spec = self.spec
        k = k_new.transpose(0, 2, 1, 3)
        v = v_new.transpose(0, 2, 1, 3)
        key = jax.random.fold_in(jax.random.key(spec.seed), layer)
        order = count = None
        if spec.tau is not None:  # ZipVL: p(tau) from the probe mass, ranking by the normalized score
            mass, score = prompt_statistics(q, k_new, self.starts, method=spec.saliency,
                                            probe_ratio=spec.probe_ratio, normalize=spec.normalize, key=key)
            count, order = important_count(mass, spec.tau), important_order(score)
        elif spec.saliency == "none":
            score = jnp.where(valid[:, None, :], jnp.zeros((q.shape[0], k_new.shape[2], length)), -jnp.inf)
        else:
            score = prompt_saliency(q, k_new, self.starts, method=spec.saliency, probe_ratio=spec.probe_ratio,
                                    normalize=spec.normalize, key=key)
        if spec.tau is not None and spec.sparse_prefill:
            out, _ = sparse_prefill_attention(q, k_new, v_new, order, count, self.starts, buckets=spec.buckets,
                                              sliding_window=sliding_window)
        else:
            out = gqa_attention(q, k, v, causal_mask(b_slots, b_slots, sliding_window, k_valid=valid))
        state = compress_block(self.layers[layer], spec, self.layout, k, v, slots, valid, score, block=None,
                               order=order, count=count)
        return out, state

    def _decode(self, layer: int, q, k_new, v_new, sliding_window):
        spec, layout = self.spec, self.layout
        state = self.layers[layer]
        window = spec.window
        full = self.buffered == window

        def flush(st: LayerKV) -> LayerKV:
            seen = (window - jnp.arange(window)).astype(jnp.float32)  # queries that saw buffered token i
            score = st.mass / seen if spec.saliency != "none" else jnp.zeros_like(st.mass)
            slots = self.cursor - window + jnp.arange(window, dtype=jnp.int32)
            valid = jnp.ones((self.batch, window), bool)
            count = None if spec.tau is None else important_count(st.mass, spec.tau)
            st = compress_block(st, spec, layout, st.k_buf, st.v_buf, slots, valid, score, block=self.blocks,
                                count=count)
            return dataclasses.replace(st, mass=jnp.zeros_like(st.mass))

        state = jax.lax.cond(full, flush, lambda st: st, state)
        count = jnp.where(full, 0, self.buffered)
        index = (0, 0, count, 0)
        k_buf = jax.lax.dynamic_update_slice(state.k_buf, k_new.transpose(0, 2, 1, 3).astype(state.k_buf.dtype), index)
        v_buf = jax.lax.dynamic_update_slice(state.v_buf, v_new.transpose(0, 2, 1, 3).astype(state.v_buf.dtype), index)
        buf_slots = self.cursor - count + jnp.arange(window, dtype=jnp.int32)
        buf_slots = jnp.where(jnp.arange(window) <= count, buf_slots, -1)
        if spec.kernel:
            out, buf_probs = self._kernel_attention(state, q, k_buf, v_buf, buf_slots, sliding_window)
        else:
            out, buf_probs = self._jnp_attention(state, q, k_buf, v_buf, buf_slots, sliding_window)
        mass = state.mass + buf_probs.sum(axis=(2, 3))
        return out.astype(q.dtype), dataclasses.replace(state, k_buf=k_buf, v_buf=v_buf, mass=mass)

    def _jnp_attention(self, state: LayerKV, q, k_buf, v_buf, buf_slots, sliding_window):
        """Dequantize every segment, then one softmax over segments and buffer. Returns the output [batch, 1, heads,
        head_dim] and the buffer's probabilities [batch, kv_heads, group, 1, window]."""
        keys, values, slots = dequantize_layer(state, self.spec, self.layout)
        b, h, window = k_buf.shape[:3]
        keys = jnp.concatenate([*keys, k_buf.astype(jnp.float32)], axis=2)  # [batch, kv_heads, kv_len, head_dim]
        values = jnp.concatenate([*values, v_buf.astype(jnp.float32)], axis=2)
        slots = jnp.concatenate([*slots, jnp.broadcast_to(buf_slots, (b, h, window))], axis=2)
        visible = visible_slots(slots, self.cursor, self.starts[:, None, None], sliding_window)
        out, probs = masked_attention(q, keys, values, visible[:, :, None, :])
        return out, probs[..., -window:]

    def _kernel_attention(self, state: LayerKV, q, k_buf, v_buf, buf_slots, sliding_window):
        """The Pallas kernel per segment over the packed codes, the buffer in jnp, merged by log-sum-exp. Same
        results as `_jnp_attention`."""
        b, h, _, d = k_buf.shape
        qg = q[:, 0].reshape(b, h, -1, d).astype(jnp.float32)  # [batch, kv_heads, group, head_dim]
        states = []
        for st, seg in zip(state.stores, self.layout.segments(), strict=True):
            v_scale = state.v_scale
            if v_scale is not None:
                v_scale = jax.lax.slice_in_dim(v_scale, seg.first_block, seg.first_block + seg.blocks, axis=2)
            states.append(segment_attention_on_backend(
                qg, st.k_codes, st.k_step, st.k_min, st.v_codes, st.v_step, st.v_min, v_scale, st.slots, self.cursor,
                self.starts, bits=seg.bits, block=seg.size, group=self.spec.group, sliding_window=sliding_window))
        # [batch, 1, 1, window]
        visible = visible_slots(buf_slots, self.cursor, self.starts[:, None, None], sliding_window)[:, :, None, :]
        scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k_buf.astype(jnp.float32)) * d**-0.5  # [batch, kv_heads, group, w]
        scores = jnp.where(visible, scores, MASK_VALUE)
        m = scores.max(axis=-1)
        p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
        acc = jnp.einsum("bhgs,bhsd->bhgd", p, v_buf.astype(jnp.float32))
        states.append((m[:, :, None], p.sum(axis=-1)[:, :, None], acc[:, :, None]))
        out, top, total = combine(states)  # [batch, kv_heads, group, head_dim]
        buf_probs = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0) / total[..., None]
        return out.reshape(q.shape), buf_probs[:, :, :, None, :]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention with a mask per KV head. q [batch, q_len, heads, head_dim]; k, v float32 [batch, kv_heads, kv_len,
    head_dim]; mask bool [batch, kv_heads, q_len, kv_len]. Returns (out [batch, q_len, heads, head_dim] float32,
    probs [batch, kv_heads, group, q_len, kv_len])."""
    probs = grouped_probs(q, k, mask[:, :, None])
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(q.shape), probs


def check_prompt_then_tokens(tokens_shape: tuple[int, int], kind: str, batch: int, prefill_len: int,
                             cursor: jax.Array, max_len: int) -> None:
    """The input contract of the compressed caches (quantized, merged): the prompt as one block of `prefill_len`
    tokens first, then one token per step, within `max_len` slots (order and room checked when the cursor is a
    concrete value)."""
    got_batch, num_tokens = tokens_shape
    if got_batch != batch:
        raise ZipjaxError(f"the input holds {got_batch} sequences but the KV cache was made for {batch}")
    if num_tokens not in (1, prefill_len):
        raise ZipjaxError(
            f"a {kind} KV cache takes the prompt as one block of {prefill_len} tokens, then one token per step; "
            f"got {num_tokens} tokens"
        )
    if isinstance(cursor, jax.core.Tracer):
        return
    cursor = int(cursor)
    if num_tokens > 1 and cursor != 0:
        raise ZipjaxError(f"the prompt block must be the first input of a {kind} KV cache")
    if num_tokens == 1 and cursor == 0:
        raise ZipjaxError(f"a {kind} KV cache needs its prompt block before single decode tokens")
    if cursor + num_tokens > max_len:
        raise ZipjaxError(f"the KV cache holds {max_len} slots; {cursor} are used and {num_tokens} more do not fit")


def make_layout(config: ModelConfig, spec: QuantSpec, batch: int, max_len: int, prefill_len: int) -> Layout:
    """Validate the cache geometry against the model and the method, with errors that name the problem."""
    d = config.head_dim
    if batch <= 0:
        raise ZipjaxError(f"a KV cache needs batch > 0, got {batch}")
    if not 1 < prefill_len <= max_len:
        raise ZipjaxError(f"prefill_len must lie in (1, max_len={max_len}], got {prefill_len}")
    for bits in {spec.high_bits, spec.low_bits}:
        if d % (8 // bits):
            raise ZipjaxError(f"{bits}-bit codes pack {8 // bits} channels per byte; head_dim {d} is not a multiple")
    if spec.group is not None and d % spec.group:
        raise ZipjaxError(f"quantization group of {spec.group} channels does not divide head_dim {d}")
    if spec.window > max_len - prefill_len and max_len > prefill_len:
        raise ZipjaxError(
            f"the full-precision window ({spec.window} tokens) is longer than the cache's decode part "
            f"({max_len - prefill_len} slots after a {prefill_len}-token prompt); use a smaller window"
        )
    return Layout(max_len=max_len, prefill_len=prefill_len, window=spec.window, head_dim=d,
                  bits=(spec.high_bits, spec.low_bits), first=spec.split(prefill_len), rest=spec.split(spec.window))


def compress_block(state: LayerKV, spec: QuantSpec, layout: Layout, k: jax.Array, v: jax.Array, slots: jax.Array,
                   valid: jax.Array, score: jax.Array, block: jax.Array | None,
                   order: jax.Array | None = None, count: jax.Array | None = None) -> LayerKV:
    """Rank a block's tokens per (sequence, KV head), quantize each subset, write it at its static place.

    k, v: [batch, kv_heads, n, head_dim]; slots int32 [n]; valid bool [batch, n]; score float32 [batch, kv_heads, n]
    (invalid tokens -inf); block: None for the prompt block (0), else the traced index of a later block.
    ZipVL passes its own ranking `order` int32 [batch, kv_heads, n] and salient count `count` int32 [batch] (p,
    clipped here into the static room).
    """
    n = k.shape[2]
    sizes = layout.first if block is None else layout.rest
    b_index = 0 if block is None else block
    if order is None:
        order = jnp.argsort(-score, axis=-1, stable=True)  # [batch, kv_heads, n], most salient first
    if count is not None:
        count = jnp.clip(count, *spec.clip_count(n)).astype(jnp.int32)
    token_valid = jnp.broadcast_to(valid[:, None, :], score.shape)
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    v_scale = state.v_scale
    if spec.value_mode == "cst":
        c = channel_scale(v, axis=2, valid=token_valid[..., None])  # [batch, kv_heads, 1, head_dim]
        v = v / c.astype(jnp.float32)
        v_scale = jax.lax.dynamic_update_slice_in_dim(v_scale, c, b_index, axis=2)
    stores = list(state.stores)
    bounds = (0, sizes[0], n)
    part = 0 if block is None else 1
    for i, seg in enumerate(layout.segments()):
        s = seg.subset
        if seg.first_block != part or sizes[s] == 0:
            continue
        if count is None:
            idx = jnp.sort(order[..., bounds[s]:bounds[s + 1]], axis=-1)  # [batch, kv_heads, n_s], in slot order
            ok = jnp.take_along_axis(token_valid, idx, axis=2)
        else:  # adaptive: subset 0 takes ranks [0, p), subset 1 ranks [p, n); room is static, p is not
            ranks = jnp.arange(sizes[s], dtype=jnp.int32)[None, None, :]
            ranks = ranks + (0 if s == 0 else count[:, None, None])
            idx = jnp.take_along_axis(order, jnp.minimum(ranks, n - 1), axis=-1)
            inside = ranks < count[:, None, None] if s == 0 else ranks < n
            ok = jnp.take_along_axis(token_valid, idx, axis=2) & inside
        ks = jnp.take_along_axis(k, idx[..., None], axis=2)
        vs = jnp.take_along_axis(v, idx[..., None], axis=2)
        piece = quantize_subset(spec, seg.bits, ks, vs, ok)
        piece["slots"] = jnp.where(ok, slots[idx], -1).astype(layout.slot_dtype)
        local = 0 if block is None else block - 1  # the block's index within the segment
        st = stores[i]
        updates = {}
        for name, value in piece.items():
            per_block = name in ("k_step", "k_min") and spec.key_mode == "channel"
            updates[name] = jax.lax.dynamic_update_slice_in_dim(getattr(st, name), value,
                                                                local if per_block else local * seg.size, axis=2)
        stores[i] = st.replace(**updates)
    return state.replace(stores=tuple(stores), v_scale=v_scale)


def quantize_subset(spec: QuantSpec, bits: int, k: jax.Array, v: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Codes and parameters of one subset of a block: k, v float32 [batch, kv_heads, n, head_dim] (v already divided
    by the CST channel scale), valid bool [batch, kv_heads, n]."""
    d = k.shape[-1]
    g = spec.group or d
    if spec.key_mode == "channel":
        k_codes, k_step, k_min = quantize(k, bits, axis=2, valid=valid[..., None])  # stats [b, h, 1, d]
    else:
        k_codes, k_step, k_min = quantize(grouped(k, g), bits, axis=-1)
        k_codes, k_step, k_min = k_codes.reshape(k.shape), k_step[..., 0], k_min[..., 0]
    v_codes, v_step, v_min = quantize(grouped(v, g), bits, axis=-1)
    return {"k_codes": pack(k_codes.reshape(k.shape), bits), "v_codes": pack(v_codes.reshape(v.shape), bits),
            "k_step": k_step, "k_min": k_min, "v_step": v_step[..., 0], "v_min": v_min[..., 0]}


def dequantize_layer(state: LayerKV, spec: QuantSpec, layout: Layout
                     ) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """Per segment: keys, values float32 [batch, kv_heads, capacity, head_dim], slots [batch, kv_heads, capacity]."""
    keys, values, slots = [], [], []
    for st, seg in zip(state.stores, layout.segments(), strict=True):
        ids = seg.block_ids()
        v_scale = None if state.v_scale is None else state.v_scale[:, :, seg.first_block + ids]
        k, v = dequantize_store(st, spec, seg.bits, ids, v_scale)
        keys.append(k)
        values.append(v)
        slots.append(st.slots.astype(jnp.int32))
    return keys, values, slots


def dequantize_store(st: Store, spec: QuantSpec, bits: int, ids: np.ndarray, v_scale: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array]:
    """Keys and values float32 [batch, kv_heads, n, head_dim] of a store; ids [n]: the block of each token (which
    channel-wise key statistics apply); v_scale [batch, kv_heads, n, head_dim] per token, or None."""
    k_codes, v_codes = unpack(st.k_codes, bits), unpack(st.v_codes, bits)
    d = k_codes.shape[-1]
    g = spec.group or d
    if spec.key_mode == "channel":
        k = dequantize(k_codes, st.k_step[:, :, ids], st.k_min[:, :, ids])
    else:
        k = dequantize(grouped(k_codes, g), st.k_step[..., None], st.k_min[..., None]).reshape(k_codes.shape)
    v = dequantize(grouped(v_codes, g), st.v_step[..., None], st.v_min[..., None]).reshape(v_codes.shape)
    if v_scale is not None:
        v = v * v_scale.astype(jnp.float32)
    return k, v
