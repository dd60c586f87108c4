"""Grouped-query attention in plain jax.numpy, with the masks every cache representation shares.

The scores / softmax pair itself lives in the kernels' leaf (`zipjax.kernels.common`), because each kernel's
reference uses it too and kernels import nothing else of zipjax; this module is the library's attention API on top
of it. Queries are grouped by the KV head they read, so repeated K/V are never materialised; scores and softmax run
in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zipjax.kernels.common import (
    MASK_VALUE,
    SoftmaxState,
    combine,
    empty_state,
    group_queries,
    grouped_attention,
    grouped_scores,
    grouped_values,
    masked_softmax,
    online_softmax_step,
    platform,
    ungroup,
    visible_slots,
)
from zipjax.kernels.flash_attention import flash_attention, flash_attention_state
from zipjax.sharding import per_shard, sequence_split

__all__ = ["MASK_VALUE", "causal_attention", "causal_mask", "gqa_attention", "group_queries", "grouped_attention",
           "grouped_probs", "grouped_scores", "grouped_values", "masked_attention", "masked_softmax", "ungroup",
           "visible_slots"]


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention with one mask per sequence.

    Args:
      q: [batch, q_len, heads, head_dim] queries (RoPE applied).
      k, v: [batch, kv_heads, kv_len, head_dim].
      mask: bool, broadcastable to [batch, q_len, kv_len]; True where the query may see the key.
    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    return grouped_attention(q, k, v, mask[:, None, None])


def grouped_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention probabilities, float32 [batch, kv_heads, group, q_len, kv_len], zero where masked.

    q: [batch, q_len, heads, head_dim]; k: [batch, kv_heads, kv_len, head_dim]; mask: bool broadcastable to
    [batch, kv_heads, 1, q_len, kv_len]. For callers that need the probabilities themselves (saliency scores)."""
    qg = group_queries(q.astype(jnp.float32), k.shape[1])
    return masked_softmax(grouped_scores(qg, k.astype(jnp.float32)), mask) * mask


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention with a mask per KV head. q [batch, q_len, heads, head_dim]; k, v float32 [batch, kv_heads, kv_len,
    head_dim]; mask bool [batch, kv_heads, q_len, kv_len]. Returns (out float32 [batch, q_len, heads, head_dim],
    probs [batch, kv_heads, group, q_len, kv_len])."""
    probs = grouped_probs(q, k, mask[:, :, None])
    return ungroup(grouped_values(probs, v)), probs


def causal_mask(
    q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None, k_valid: jax.Array | None = None
) -> jax.Array:
    """bool [batch, q_len, kv_len]: key visible iff it is not after the query and within the sliding window.

    q_pos [batch, q_len] and k_pos [batch, kv_len] are any monotone coordinates shared by queries and keys (cache
    slots, or token positions); k_valid [batch, kv_len] marks keys that hold real tokens.
    """
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    mask = delta >= 0
    if sliding_window is not None:
        mask &= delta < sliding_window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


def slot_mask(q_slots: jax.Array, k_slots: jax.Array, starts: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool [batch, q, k]: key slot s is visible to a query at slot t of sequence b iff starts[b] <= s <= t and, with a
    window W, t - s < W. q_slots [q] or [batch, q]; k_slots [k]."""
    q_slots = jnp.broadcast_to(q_slots, (starts.shape[0], q_slots.shape[-1]))
    delta = q_slots[:, :, None] - k_slots[None, None, :]
    mask = (delta >= 0) & (k_slots[None, None, :] >= starts[:, None, None])
    if sliding_window is not None:
        mask &= delta < sliding_window
    return mask


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
                    sliding_window: int | None) -> jax.Array:
    """Attention of queries at slots cursor .. cursor + q_len - 1 over a slot-addressed cache k, v [batch, kv_heads,
    max_len, head_dim] whose sequence b holds real tokens from starts[b]: the prompt pass and every decode step.
    Only the key blocks some query can see are read (flash prefill, length-bounded decode): on TPU and GPU by the
    Pallas kernel (zipjax.kernels.flash_attention, per shard of the context mesh), on CPU by `chunked_attention`.
    A cache split by sequence over the mesh's "model" axis (KV heads it does not divide) is attended per sequence
    shard, each shard's partial softmax state combined across the axis (zipjax.sharding.per_shard): on CPU too, so
    that path runs wherever a mesh does."""
    target = platform()
    if target == "cpu":
        partial = functools.partial(chunked_attention_state, sliding_window=sliding_window)
        if not sequence_split(k.shape):
            return chunked_attention(q, k, v, cursor, starts, sliding_window)
        return per_shard(None, q, k, v, cursor, starts, partial=partial)
    kernel = functools.partial(flash_attention, sliding_window=sliding_window, backend=target)
    partial = functools.partial(flash_attention_state, sliding_window=sliding_window, backend=target)
    return per_shard(kernel, q, k, v, cursor, starts, partial=partial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None) -> jax.Array:
    """Attention of a whole sequence over itself (slots 0 .. seq - 1, no padding, no cache): q [batch, seq, heads,
    head_dim], k, v [batch, kv_heads, seq, head_dim]. The forward pass is `cache_attention`'s (the flash kernel, or
    `chunked_attention`: no [seq, seq] score matrix); its key-block loops have data-dependent bounds, which
    reverse-mode differentiation cannot go through, so the gradient is the dense masked softmax's (training and
    fine-tuning lengths; it does hold the score matrix)."""
    zero = jnp.zeros((), jnp.int32)
    return cache_attention(q, k, v, zero, jnp.zeros((q.shape[0],), jnp.int32), sliding_window)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None) -> jax.Array:
    """`causal_attention` as one masked softmax over the whole [seq, seq] score matrix (its gradient's reference)."""
    slots = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
    return gqa_attention(q, k, v, causal_mask(slots, slots, sliding_window))


def _causal_forward(q, k, v, sliding_window):
    return causal_attention(q, k, v, sliding_window), (q, k, v)


def _causal_backward(sliding_window, residuals, grad):
    _, vjp = jax.vjp(lambda q, k, v: dense_causal_attention(q, k, v, sliding_window), *residuals)
    return vjp(grad)


causal_attention.defvjp(_causal_forward, _causal_backward)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
                      sliding_window: int | None, *, block_q: int = 256, block_k: int = 512) -> jax.Array:
    """Blockwise online-softmax attention over a slot-addressed cache, in plain jax.numpy (the CPU path).

    q: [batch, q_len, heads, head_dim], query i at slot cursor + i; k, v: [batch, kv_heads, max_len, head_dim];
    starts int32 [batch]. Each block of queries visits only the key blocks that one of its queries may see (from the
    earliest start / window edge to its last query's slot), so no [q_len, max_len] score matrix exists and a decode
    step reads the filled extent of the cache, not all of it. Returns [batch, q_len, heads, head_dim] in q's dtype;
    a query that sees no key (left padding) gets zeros."""
    state = chunked_attention_state(q, k, v, cursor, starts, sliding_window=sliding_window, block_q=block_q,
                                    block_k=block_k)
    return combine([state])[0].astype(q.dtype)


def chunked_attention_state(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
                            first_slot: jax.Array | int = 0, *, sliding_window: int | None, block_q: int = 256,
                            block_k: int = 512) -> SoftmaxState:
    """`chunked_attention`'s partial softmax state over part of the cache, as the flash kernel's
    (zipjax.kernels.flash_attention.flash_attention_state): k, v [batch, kv_heads, n, head_dim] hold slots
    first_slot .. first_slot + n - 1, cursor and starts count slots of the whole cache. Returns the `SoftmaxState`
    float32 max, denom [batch, q_len, 1, heads] and acc [batch, q_len, 1, heads, head_dim], unnormalised
    (zipjax.kernels.common.combine)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    cursor, starts = cursor - first_slot, starts - first_slot  # the mask is invariant under a shift of all slots
    block_q, block_k = min(block_q, q_len), min(block_k, max_len)
    n_q = -(-q_len // block_q)
    pad_k = -(-max_len // block_k) * block_k - max_len  # padded slots lie past every query: never visible
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_k), (0, 0))) for x in (k, v))
    qg = group_queries(jnp.pad(q, ((0, 0), (0, n_q * block_q - q_len), (0, 0), (0, 0))), kv_heads)
    qg = qg.reshape(*qg.shape[:3], n_q, block_q, head_dim).transpose(3, 0, 1, 2, 4, 5)  # [n_q, b, kv, G, bq, d]
    first_key = jnp.min(starts)

    def one_block(args):
        index, q_block = args  # q_block [batch, kv_heads, group, block_q, head_dim]
        q_slots = cursor + index * block_q + jnp.arange(block_q, dtype=jnp.int32)
        lowest = first_key if sliding_window is None else jnp.maximum(first_key, q_slots[0] - sliding_window + 1)
        # within the part's blocks: a shard's queries may lie before or past it, its starts below it
        lo = jnp.maximum(lowest, 0) // block_k
        hi = jnp.maximum(jnp.minimum(q_slots[-1], max_len - 1) // block_k + 1, lo)
        return _online_softmax(q_block, k, v, q_slots, starts, sliding_window, lo, hi, block_k, max_len)

    m, total, acc = jax.lax.map(one_block, (jnp.arange(n_q, dtype=jnp.int32), qg))  # [n_q, b, kv, G, bq, 1 | d]
    # -> [batch, q_len, 1, heads(, head_dim)]: one part per query
    m, total = (x[..., 0].transpose(1, 0, 4, 2, 3).reshape(batch, n_q * block_q, 1, heads)[:, :q_len]
                for x in (m, total))
    acc = acc.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_q * block_q, 1, heads, head_dim)[:, :q_len]
    return SoftmaxState(m, total, acc)


def _online_softmax(q_block: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, starts: jax.Array,
                    sliding_window: int | None, lo: jax.Array, hi: jax.Array, block_k: int, max_len: int
                    ) -> SoftmaxState:
    """Key blocks lo .. hi - 1 folded into the shared online-softmax state (zipjax.kernels.common.
    online_softmax_step): max, denom float32 [b, kv, G, bq, 1], acc [b, kv, G, bq, d]; slots from max_len on (block
    padding) are never seen."""
    batch, kv_heads, group, block_q, head_dim = q_block.shape

    def step(j, state):
        k_block = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=2)  # [b, kv, bk, d]
        v_block = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=2)
        k_slots = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        visible = slot_mask(q_slots, k_slots, starts, sliding_window)[:, None, None]  # [b, 1, 1, bq, bk]
        visible &= k_slots < max_len
        # slots of a visited block that no query sees may hold anything (stale, NaN): keep them out of 0 * x
        v_block = jnp.where(visible.any(axis=3)[..., None].squeeze(2), v_block, 0)
        return online_softmax_step(state, grouped_scores(q_block, k_block), visible, v_block, values=grouped_values)

    return jax.lax.fori_loop(lo, hi, step, empty_state((batch, kv_heads, group, block_q), head_dim))
