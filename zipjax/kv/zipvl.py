"""ZipVL's layer-adaptive important tokens and sparse prefill attention (He et al., arXiv 2410.08584).

Per layer, probe queries (ZipCache's: the most recent tokens and as many random earlier ones) give an attention
matrix A' (zipjax.kv.saliency.prompt_statistics). Two statistics of its columns are used, as the paper does:

  count    p = the fewest tokens holding a fraction tau of the probe attention mass (Eq. 6): column masses summed
           over every probe row and query head of the layer, sorted, cumulated; p(1) = the tokens with any mass.
  ranking  which p tokens: the top p by ZipCache's normalized score (Eq. 7), per (sequence, KV head).

Sparse prefill attends only among the important tokens (Algorithm 1: O = Attention(Q[T], K[T], V[T])). T is sorted
by slot so that causality in the compacted index space is the original one. Shapes are static: the important
tokens of each (sequence, KV head) are gathered into a block of P rows, P the smallest of `buckets` fixed sizes
(multiples of length / buckets) that holds the batch's largest p, chosen with `lax.switch`, so only that branch
runs and the attention FLOPs are (P / length)^2 of dense: 1 - rho^2 saved. Rows past a sequence's own p are masked.

Choices where the paper is silent: a query that is not important gets a zero attention output (only its residual
stream carries it on; a reviewer's "padded out"); the prompt's last token is always important, since its query
predicts the first new token; heads are summed for p (one p per sequence and layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zipjax.attention import grouped_attention, grouped_scores, grouped_values, masked_softmax


def important_count(mass: jax.Array, tau: float) -> jax.Array:
    """int32 [batch]: p(tau), the fewest tokens whose summed mass reaches tau of the total (Eq. 6).

    mass: float32 [batch, kv_heads, n] (zero for padding). Monotone in tau; p(1) = the tokens with non-zero mass."""
    column = mass.sum(axis=1)  # [batch, n]: one p per layer, heads summed
    nonzero = (column > 0).sum(axis=-1).astype(jnp.int32)
    cumulative = jnp.cumsum(-jnp.sort(-column, axis=-1), axis=-1)
    needed = (cumulative < tau * cumulative[:, -1:]).sum(axis=-1).astype(jnp.int32) + 1
    p = nonzero if tau >= 1 else jnp.minimum(needed, nonzero)
    return jnp.maximum(p, 1)


def important_order(score: jax.Array, keep_last: bool = True) -> jax.Array:
    """int32 [batch, kv_heads, n]: token indices by decreasing normalized score (the last token first when
    `keep_last`, since its query predicts the next token)."""
    if keep_last:
        score = score.at[..., -1].set(jnp.inf)
    return jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)


def bucket_sizes(length: int, buckets: int) -> tuple[int, ...]:
    """The static block sizes sparse prefill may use: multiples of ceil(length / buckets), up to length."""
    step = -(-length // buckets)
    return tuple(sorted({min(step * i, length) for i in range(1, buckets + 1)}))


def _compact_attention(q: jax.Array, k: jax.Array, v: jax.Array, order: jax.Array, count: jax.Array,
                       starts: jax.Array, size: int, sliding_window: int | None) -> jax.Array:
    """Attention among the top-`count` tokens of `order`, gathered into `size` rows; zero output elsewhere."""
    batch, length, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    rank = jnp.arange(size, dtype=jnp.int32)
    top = order[..., :size]  # [batch, kv_heads, size]
    chosen = rank[None, None, :] < count[:, None, None]
    chosen &= top >= starts[:, None, None]
    slots = jnp.sort(jnp.where(chosen, top, length + top), axis=-1)  # chosen first, in slot order
    valid = slots < length
    slots = jnp.where(valid, slots, slots - length)
    qh = q.reshape(batch, length, kv_heads, group, d).transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, G, length, d]
    qi = jnp.take_along_axis(qh, slots[:, :, None, :, None], axis=3)  # [batch, kv_heads, G, size, d]
    ki = jnp.take_along_axis(k.transpose(0, 2, 1, 3), slots[..., None], axis=2)  # [batch, kv_heads, size, d]
    vi = jnp.take_along_axis(v.transpose(0, 2, 1, 3), slots[..., None], axis=2)
    delta = slots[..., :, None] - slots[..., None, :]  # [batch, kv_heads, size(q), size(k)]
    mask = (delta >= 0) & valid[..., None, :]
    if sliding_window is not None:
        mask &= delta < sliding_window
    probs = masked_softmax(grouped_scores(qi, ki), mask[:, :, None])
    out = grouped_values(probs, vi).transpose(0, 1, 3, 2, 4)  # [batch, kv_heads, size, G, d]
    out = jnp.where(valid[..., None, None], out, 0.0)
    target = jnp.where(valid, slots, length)  # rows past p are dropped by the scatter
    full = jnp.zeros((batch, kv_heads, length, group, d), jnp.float32)
    b_idx = jnp.arange(batch)[:, None, None]
    h_idx = jnp.arange(kv_heads)[None, :, None]
    full = full.at[b_idx, h_idx, target].set(out, mode="drop")
    return full.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


def sparse_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, order: jax.Array, count: jax.Array,
                             starts: jax.Array, *, buckets: int = 8, sliding_window: int | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """Attention among each (sequence, KV head)'s important tokens, in the smallest bucket that holds them.

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]; order int32 [batch, kv_heads,
    length] (from `important_order`); count int32 [batch] (p); starts int32 [batch]. Returns the output [batch,
    length, heads, head_dim] (zero rows for unimportant queries) and the bucket used, int32 [] (index into
    `bucket_sizes(length, buckets)`)."""
    sizes = bucket_sizes(q.shape[1], buckets)
    index = jnp.searchsorted(jnp.asarray(sizes), count.max(), side="left").astype(jnp.int32)
    index = jnp.minimum(index, len(sizes) - 1)
    branches = [functools.partial(_compact_attention, size=s, sliding_window=sliding_window) for s in sizes]
    return jax.lax.switch(index, branches, q, k, v, order, count, starts), index


def restricted_attention(q: jax.Array, k: jax.Array, v: jax.Array, important: jax.Array,
                         starts: jax.Array) -> jax.Array:
    """Dense causal attention in which only important keys are visible and unimportant queries output zero; the
    definition sparse prefill must equal (tests). important: bool [batch, kv_heads, length]."""
    batch, length, heads, d = q.shape
    kv_heads = k.shape[2]
    slots = jnp.arange(length)
    causal = (slots[:, None] >= slots[None, :]) & (slots[None, :] >= starts[:, None, None])  # [batch, q, k]
    mask = causal[:, None] & important[:, :, None, :]  # [batch, kv_heads, q, k]
    to_heads = lambda x: x.transpose(0, 2, 1, 3).astype(jnp.float32)  # [batch, kv_heads, length, d]
    out = grouped_attention(q.astype(jnp.float32), to_heads(k), to_heads(v), mask[:, :, None])
    out = out.reshape(batch, length, kv_heads, heads // kv_heads, d)
    query_ok = important.transpose(0, 2, 1)[..., None, None]  # [batch, length, kv_heads, 1, 1]
    return jnp.where(query_ok, out, 0.0).reshape(q.shape)


def attention_flops(length: int, size: int, heads: int, head_dim: int) -> tuple[int, int]:
    """(dense, sparse) attention FLOPs per sequence of QK^T and PV: 4 * heads * head_dim * rows^2."""
    return 4 * heads * head_dim * length**2, 4 * heads * head_dim * size**2
