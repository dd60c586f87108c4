"""Grouped-query attention in plain jax.numpy, with the masks every cache representation shares.

The scores / softmax pair itself lives in the kernels' leaf (`zipjax.kernels.common`), because each kernel's
reference uses it too and kernels import nothing else of zipjax; this module is the library's attention API on top
of it. Queries are grouped by the KV head they read, so repeated K/V are never materialised; scores and softmax run
in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zipjax.kernels.common import (
    MASK_VALUE,
    group_queries,
    grouped_attention,
    grouped_scores,
    grouped_values,
    masked_softmax,
    ungroup,
    visible_slots,
)

__all__ = ["MASK_VALUE", "causal_mask", "gqa_attention", "group_queries", "grouped_attention", "grouped_probs",
           "grouped_scores", "grouped_values", "masked_attention", "masked_softmax", "ungroup", "visible_slots"]


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
