"""What the kernels and zipjax's jax.numpy paths share: the mask value, grouped-query scores and softmax, the slot
visibility rule of the compressed caches, and the packed-code layout.

This is a leaf (it imports jax and the platform switch of zipjax.platform only) so that every kernel module imports
alone and imports nothing else of zipjax;
`zipjax.attention` and `zipjax.kv.codec` build on it, and each kernel's jnp reference uses the same pair of
functions as the library's own attention.

Grouped-query layout: the query heads that read one KV head are grouped, q [batch, kv_heads, group, q_len,
head_dim] against k, v [batch, kv_heads, kv_len, head_dim], so repeated K/V are never materialised. Masked scores
get a large finite negative value, not -inf: a query with no visible key then yields a finite, ignored row instead
of NaNs that would leak through 0 * NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.platform import compiling_for, platform  # noqa: F401  (the kernels' platform switch, a leaf)

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """[batch, q_len, heads, head_dim] -> [batch, kv_heads, group, q_len, head_dim]."""
    batch, q_len, heads, head_dim = q.shape
    return q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def ungroup(out: jax.Array) -> jax.Array:
    """[batch, kv_heads, group, q_len, head_dim] -> [batch, q_len, heads, head_dim]."""
    batch, kv_heads, group, q_len, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, kv_heads * group, head_dim)


def grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled dot products, float32 [batch, kv_heads, group, q_len, kv_len], accumulated in float32 whatever the
    input dtype. q: [batch, kv_heads, group, q_len, head_dim]; k: [batch, kv_heads, kv_len, head_dim]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return scores * (q.shape[-1] ** -0.5)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis with masked entries at MASK_VALUE (exactly zero probability wherever a
    row has a visible entry). mask: bool broadcastable to scores."""
    return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)


def grouped_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [batch, kv_heads, group, q_len, kv_len] @ v [batch, kv_heads, kv_len, head_dim] -> float32 [batch,
    kv_heads, group, q_len, head_dim]; probs are cast to v's dtype first (bf16 matmuls stay bf16)."""
    return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention in the ungrouped layout.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim]; mask: bool broadcastable to
    [batch, kv_heads, group, q_len, kv_len]. Returns [batch, q_len, heads, head_dim] in q's dtype."""
    qg = group_queries(q, k.shape[1])
    probs = masked_softmax(grouped_scores(qg, k), mask)
    return ungroup(grouped_values(probs, v)).astype(q.dtype)


def visible_slots(slots: jax.Array, q_slot: jax.Array, start: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool, broadcast of the arguments: a decode query at `q_slot` may see a key held at cache slot `slots` (-1: an
    empty slot) of a sequence whose first real slot is `start`. Shared by the compressed caches and their kernel."""
    ok = (slots >= 0) & (slots >= start) & (slots <= q_slot)
    if sliding_window is not None:
        ok &= q_slot - slots < sliding_window
    return ok


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., n] (each < 2^bits) -> uint8 [..., n * bits / 8].

    Split-halves layout: with f = 8 / bits codes per byte, the last axis is cut into f equal parts and part j goes to
    bits [j * bits, (j + 1) * bits) of each byte, so unpacking part j is one shift and mask over a contiguous block
    of channels, which a kernel contracts against the matching block of the query."""
    if bits == 8:
        return codes.astype(jnp.uint8)
    parts = jnp.split(codes.astype(jnp.uint8), 8 // bits, axis=-1)
    packed = parts[0]
    for j, part in enumerate(parts[1:], start=1):
        packed = packed | (part << (j * bits))
    return packed


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of `pack`: uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    if bits == 8:
        return packed
    mask = jnp.uint8((1 << bits) - 1)
    return jnp.concatenate([(packed >> (j * bits)) & mask for j in range(8 // bits)], axis=-1)


def reduce_states(states: list[tuple[jax.Array, jax.Array, jax.Array]], axis_name: str | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One partial softmax state from many: m, l [..., parts, G] (running max and sum of exp(score - m)) and acc
    [..., parts, G, d] (unnormalised output) of each of `states`, reduced over their parts and, with `axis_name`
    (inside a shard_map), over that mesh axis too (pmax of the max, psum of the rescaled sums and outputs: the
    sequence-parallel combine). Returns m, l [..., 1, G] and acc [..., 1, G, d], still unnormalised."""
    m = jnp.concatenate([s[0] for s in states], axis=-2)
    l = jnp.concatenate([s[1] for s in states], axis=-2)  # noqa: E741
    acc = jnp.concatenate([s[2] for s in states], axis=-3)
    top = m.max(axis=-2, keepdims=True)
    if axis_name is not None:
        top = jax.lax.pmax(top, axis_name)
    weight = jnp.exp(m - top)  # [..., parts, G]
    total = (l * weight).sum(axis=-2, keepdims=True)
    acc = (acc * weight[..., None]).sum(axis=-3, keepdims=True)
    if axis_name is not None:
        total, acc = jax.lax.psum((total, acc), axis_name)
    return top, total, acc


def combine(states: list[tuple[jax.Array, jax.Array, jax.Array]], axis_name: str | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact softmax attention from partial states (m, l [..., parts, G], acc [..., parts, G, d]) of any number
    of segments, tiles or (with `axis_name`, see `reduce_states`) shards. Returns (out [..., G, d], max [..., G],
    sum [..., G]): the probability of a key with score s is exp(s - max) / sum. A row no state saw gives zeros."""
    top, total, acc = reduce_states(states, axis_name)
    total = jnp.maximum(total[..., 0, :], 1e-30)
    return acc[..., 0, :, :] / total[..., None], top[..., 0, :], total


def merge(states: list[tuple[jax.Array, jax.Array, jax.Array]], axis_name: str | None = None) -> jax.Array:
    """The attention output [..., G, d] of `combine`."""
    return combine(states, axis_name)[0]
