"""Grouped-query attention in plain jax.numpy, with the masks every cache representation shares.

Queries are grouped by the KV head they read ([batch, seq, kv_heads, group, head_dim]) and contracted against K/V
directly, so repeated K/V are never materialised. Scores and softmax run in float32. Masked entries get a large
finite negative value, not -inf: a query with no visible key (a left-padding slot) then yields a finite, ignored
row instead of NaNs that would leak into later layers through 0 * NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention.

    Args:
      q: [batch, q_len, heads, head_dim] queries (RoPE applied).
      k, v: [batch, kv_heads, kv_len, head_dim].
      mask: bool, broadcastable to [batch, q_len, kv_len]; True where the query may see the key.
    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def grouped_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention probabilities, float32 [batch, kv_heads, group, q_len, kv_len], zero where masked.

    q: [batch, q_len, heads, head_dim]; k: [batch, kv_heads, kv_len, head_dim]; mask: bool broadcastable to
    [batch, kv_heads, 1, q_len, kv_len]. For callers that need the probabilities themselves (saliency scores)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(jnp.float32)) * head_dim**-0.5
    scores = jnp.where(mask, scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1) * mask


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


def visible_slots(slots: jax.Array, q_slot: jax.Array, start: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool, broadcast of the arguments: a decode query at `q_slot` may see a key held at cache slot `slots` (-1: an
    empty slot) of a sequence whose first real slot is `start`. Shared by the compressed caches and their kernel."""
    ok = (slots >= 0) & (slots >= start) & (slots <= q_slot)
    if sliding_window is not None:
        ok &= q_slot - slots < sliding_window
    return ok
