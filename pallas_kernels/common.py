"""What the kernels and zipjax's jax.numpy paths share: the mask value, grouped-query scores and softmax, the online
softmax (one state record, one step, one merge of partial states), the slot visibility rule of the compressed
caches, the packed-code layout, and the wrapper convention's backend rule.

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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zipjax.platform import compiling_for, platform  # noqa: F401  (the kernels' platform switch, a leaf)

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
TINY = 1e-30  # the smallest softmax denominator divided by: a row that saw nothing (denom 0) normalises to 0

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


class SoftmaxState(NamedTuple):
    """The state of an online softmax over the keys seen so far, float32: `max` the largest score, `denom` the sum of
    exp(score - max), `acc` the sum of exp(score - max) * value (the output, unnormalised).

    Two layouts of the same record: stepped inside a kernel or a jnp loop (`online_softmax_step`), max and denom
    keep a trailing axis, [..., rows, 1] against acc [..., rows, head_dim]; exchanged between tiles, splits,
    segments and shards (`merge_states`, `combine`), one state per part, max and denom [..., parts, rows] against acc
    [..., parts, rows, head_dim] (the trailing axis of 1 is accepted there too)."""

    max: jax.Array
    denom: jax.Array
    acc: jax.Array


def empty_state(rows: tuple[int, ...], head_dim: int) -> SoftmaxState:
    """Nothing seen yet: max at MASK_VALUE (finite, so the first correction is exp(MASK_VALUE - m) = 0, not NaN),
    denom and acc zero. max, denom [*rows, 1]; acc [*rows, head_dim]."""
    return SoftmaxState(jnp.full((*rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((*rows, 1), jnp.float32),
                        jnp.zeros((*rows, head_dim), jnp.float32))


def tile_scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [rows, head_dim] . k [block_k, head_dim] -> float32 scores [rows, block_k], times `scale` (a kernel tile)."""
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def tile_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [rows, block_k] @ v [block_k, head_dim] -> float32 [rows, head_dim], p cast to v's dtype (a kernel tile)."""
    return jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def online_softmax_step(state: SoftmaxState, scores: jax.Array, visible: jax.Array, v: jax.Array,
                        values: Callable[[jax.Array, jax.Array], jax.Array] = tile_values) -> SoftmaxState:
    """Fold one block of keys into the running state (flash attention's step; every kernel and the CPU path).

    scores float32 [..., rows, block_k]; visible bool broadcastable to scores; v the block's values; `values(p, v)`
    the weighted sum of the block's values [..., rows, head_dim] (default: one tile's matmul). Hidden scores get
    MASK_VALUE and weigh exactly 0, so a row that sees nothing keeps denom = 0 and acc = 0 (normalised to 0, never
    NaN). The caller zeroes values a visited block holds for no visible key when they may be NaN (0 * NaN)."""
    scores = jnp.where(visible, scores, MASK_VALUE)
    new_max = jnp.maximum(state.max, jnp.max(scores, axis=-1, keepdims=True))
    correction = jnp.exp(state.max - new_max)
    p = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
    denom = correction * state.denom + jnp.sum(p, axis=-1, keepdims=True)
    return SoftmaxState(new_max, denom, correction * state.acc + values(p, v))


def _per_row(x: jax.Array, acc: jax.Array) -> jax.Array:
    """max or denom, shaped to broadcast against acc [..., rows, head_dim]."""
    return x if x.ndim == acc.ndim else x[..., None]


def normalise(state: SoftmaxState) -> jax.Array:
    """The attention output acc / denom, float32 like acc; a row that saw no key (denom 0) gives zeros."""
    return state.acc / jnp.maximum(_per_row(state.denom, state.acc), TINY)


def merge_states(states: Sequence[SoftmaxState], axis_name: str | None = None) -> SoftmaxState:
    """One state from many, exactly (log-sum-exp): the parts of every state (acc [..., parts, rows, d]; max, denom
    [..., parts, rows], or [..., parts, rows, 1]) merged into one part, and with `axis_name` (inside a shard_map)
    across that mesh axis too (pmax of the max, psum of the rescaled sums and outputs: the sequence-parallel
    combine). Plain (max, denom, acc) tuples are taken as states. Returns the state with parts = 1, in the layout
    given, still unnormalised."""
    states = [SoftmaxState(*state) for state in states]
    acc = jnp.concatenate([s.acc for s in states], axis=-3)
    axis = -3 if states[0].max.ndim == acc.ndim else -2  # the parts axis of max and denom
    maxes = jnp.concatenate([s.max for s in states], axis=axis)
    denom = jnp.concatenate([s.denom for s in states], axis=axis)
    top = maxes.max(axis=axis, keepdims=True)
    if axis_name is not None:
        top = jax.lax.pmax(top, axis_name)
    weight = jnp.exp(maxes - top)  # [..., parts, rows(, 1)]
    total = (denom * weight).sum(axis=axis, keepdims=True)
    acc = (acc * _per_row(weight, acc)).sum(axis=-3, keepdims=True)
    if axis_name is not None:
        total, acc = jax.lax.psum((total, acc), axis_name)
    return SoftmaxState(top, total, acc)


def combine(states: Sequence[SoftmaxState], axis_name: str | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact softmax attention from the partial states (max, denom [..., parts, G], acc [..., parts, G, d]) of any
    number of segments, tiles or (with `axis_name`, see `merge_states`) shards. Returns (out [..., G, d], max
    [..., G], sum [..., G]): the probability of a key with score s is exp(s - max) / sum. A row no state saw gives
    zeros (and a sum of TINY, so dividing by it stays finite)."""
    merged = merge_states(states, axis_name)
    one = SoftmaxState(merged.max[..., 0, :], merged.denom[..., 0, :], merged.acc[..., 0, :, :])
    return normalise(one), one.max, jnp.maximum(one.denom, TINY)


def merge(states: Sequence[SoftmaxState], axis_name: str | None = None) -> jax.Array:
    """The attention output [..., G, d] of `combine`."""
    return combine(states, axis_name)[0]


def resolve_backend(backend: str | None, interpret, backends: tuple[str, ...]) -> tuple[str, object]:
    """The (backend, interpret) of a kernel call, by the one wrapper convention of every kernel entry point
    (`name(..., *, backend=None, interpret=None, blocks=None)`): backend None is the platform being traced for
    (`platform()`, which zipjax.aot sets while compiling ahead of time), and on "cpu" a kernel without a "cpu" form
    runs its TPU form; interpret None is True on "cpu" (Pallas only interprets there) and False elsewhere; True or a
    TPU `pltpu.InterpretParams` interprets any form. ValueError for a backend not in `backends`."""
    if backend is None:
        backend = platform()
        if backend == "cpu" and "cpu" not in backends:
            if interpret is False:
                raise ValueError("interpret: Pallas only interprets on a CPU; got interpret=False")
            return "tpu", True if interpret is None else interpret
    if backend not in backends:
        raise ValueError(f"backend: expected one of {backends} or None, got {backend!r}")
    if interpret is None:
        interpret = backend == "cpu"
    elif backend == "cpu" and interpret is False:
        raise ValueError("interpret: Pallas only interprets on backend 'cpu'; got interpret=False")
    return backend, interpret
