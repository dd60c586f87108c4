"""Attention of several queries per sequence over packed quantized KV codes: ZipAR's rows and SJD's drafts over the
compressed part of a cache, each query at its own slot with its own visibility.

The packed-code kernel of `quantized_attention` (same tiles, same in-register unpacking, same folded scales) with
the Q queries of a sequence stacked into its rows: the G query heads of each KV head times Q queries, row
q * G + g, so one program reads each tile of codes once for every query of the pass. Visibility is per row: the
kernel also reads the tile's slots (int32, 4 bytes a token beside the codes' 2 * width) and each row's lowest and
highest visible slot, and a query at slot s sees a key held at slot k iff k >= 0, k >= the sequence's start, k <= s
(and s - k < sliding_window): `visible_slots`, the rule of the one-query kernel and of ZipAR's dense attention.

Entry points:
  multi_query_attention  the kernel (wrapper convention `backend=None, interpret=None, blocks=None`), returning
                         the partial `SoftmaxState` in the grouped layout [batch, kv_heads, parts, Q * G(, d)]
  reference              the same attention in plain jax.numpy (dequantize, grouped scores, masked softmax)
  multi_query            the library's call: `kernel: bool | None` resolved by zipjax.platform.use_kernel (the
                         kernel on TPU / GPU, jnp on a CPU), returning (out, lse) per query and head
  merge_lse              merges (out, lse) pairs exactly, e.g. this segment's with a dense band's
  kernel_takes           whether the kernel takes a segment that short on the platform traced for (Triton: >= 16)

A query that sees no key gets out 0 and lse = MASK_VALUE (finite: it weighs nothing in `merge_lse`). Tested against
`reference` in interpret mode (tests/test_pallas_quantized.py) and compiled ahead of time for TPU v5e / v6e and an
H100 at Emu3-Gen 90x90 ZipAR / SJD shapes (tests/test_aot_quantized.py). Imports: jax and the kernels' package.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from zipjax.kernels.common import (
    MASK_VALUE,
    TINY,
    SoftmaxState,
    combine,
    group_queries,
    grouped_scores,
    grouped_values,
    resolve_backend,
    ungroup,
    visible_slots,
)
from zipjax.kernels.quantized_attention import (  # noqa: F401  (Blocks, Tiling, kernel_takes: re-exported)
    BACKENDS,
    BITS,
    Blocks,
    PackedSegment,
    Tiling,
    _check_tile,
    _loadable,
    _run_kernel,
    _token_side,
    choose_tiling,
    dequantize_segment,
    kernel_takes,
)
from zipjax.kernels.quantized_attention import check_inputs as check_segment

from zipjax.platform import use_kernel


def check_inputs(q, segment: PackedSegment, q_slots, starts, *, bits: int, block: int, group: int | None,
                 backend: str) -> None:
    """ValueError naming the argument and its shape unless q [batch, queries, heads, d], q_slots int [batch,
    queries] and the segment (`quantized_attention.check_inputs`, on the grouped queries) fit together."""
    if not isinstance(segment, PackedSegment):
        raise ValueError(f"segment: expected a PackedSegment, got {type(segment).__name__}")
    if jnp.ndim(q) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(f"q must be float [batch, queries, heads, head_dim], got {jnp.result_type(q)} {jnp.shape(q)}")
    batch, queries, heads, d = q.shape
    kv_heads = segment.k_codes.shape[1] if segment.k_codes.ndim == 4 else 0
    if not kv_heads or heads % kv_heads:
        raise ValueError(f"q's {heads} heads must be a multiple of the segment's KV heads, k_codes has shape "
                         f"{segment.k_codes.shape}")
    dtype = jnp.result_type(q_slots)
    if tuple(jnp.shape(q_slots)) != (batch, queries) or dtype.kind not in "iu":
        raise ValueError(f"q_slots must be int of shape {(batch, queries)} (q {q.shape}), got {dtype} "
                         f"{tuple(jnp.shape(q_slots))}")
    grouped = jax.ShapeDtypeStruct((batch, kv_heads, queries * heads // kv_heads, d), q.dtype)
    check_segment(grouped, segment, jnp.int32(0), starts, bits=bits, block=block, group=group, backend=backend)


def _row_bounds(q_slots: jax.Array, group: int, rows: int, sliding_window: int | None
                ) -> tuple[jax.Array, jax.Array]:
    """int32 [batch, rows, 1] twice: each row's lowest and highest visible slot (row q * group + g reads query q;
    the padding rows past queries * group see nothing: lowest 1, highest 0). The lowest is >= 0, so the kernel's
    -1 for a hidden token is below it; the sequence's start is in the side rows' visibility."""
    highest = jnp.repeat(q_slots.astype(jnp.int32), group, axis=1)  # [batch, queries * group]
    lowest = jnp.zeros_like(highest)
    if sliding_window is not None:
        lowest = jnp.maximum(highest - sliding_window + 1, 0)
    pad = ((0, 0), (0, rows - highest.shape[1]))
    lowest, highest = jnp.pad(lowest, pad, constant_values=1), jnp.pad(highest, pad, constant_values=0)
    return lowest[..., None], highest[..., None]


@functools.partial(jax.jit, static_argnames=("bits", "block", "group", "sliding_window", "backend", "interpret",
                                             "blocks"))
def _multi_query_attention(q: jax.Array, segment: PackedSegment, q_slots: jax.Array, starts: jax.Array, *,
                           bits: int, block: int, group: int | None, sliding_window: int | None, backend: str,
                           interpret, blocks: Blocks) -> SoftmaxState:
    """`multi_query_attention`, its backend and interpret resolved and its inputs checked."""
    batch, queries, heads, d = q.shape
    k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, slots = segment
    kv_heads = k_codes.shape[1]
    used = queries * heads // kv_heads  # query rows per KV head
    t = choose_tiling(backend, bits, d, group or d, block, k_codes.shape[2], used, v_scale is not None,
                      compiled=not interpret, tile=blocks.tile, per_row=True)
    loadable = lambda x: _loadable(x.astype(jnp.float16), backend)
    # the side rows' visibility is the per-sequence part (a written slot, at or after the start): every slot as
    # the query's own; the per-row bounds do the rest
    slots = slots.astype(jnp.int32)
    side = loadable(_token_side(v_step, v_min, slots, slots, starts, None))
    block_stats = [loadable(x) for x in (k_step, k_min, v_scale) if x is not None]  # [b, h, blocks, d]
    grouped = group_queries(q.astype(jnp.float32) * d**-0.5, kv_heads)  # [batch, kv_heads, G, queries, d]
    grouped = grouped.transpose(0, 1, 3, 2, 4).reshape(batch, kv_heads, used, d)  # row q * G + g
    queries_in = jnp.pad(grouped, ((0, 0), (0, 0), (0, t.rows - used), (0, 0)))
    bounds = _row_bounds(q_slots, heads // kv_heads, t.rows, sliding_window)
    row_inputs = (slots[:, :, None, :], *bounds)
    state = _run_kernel(t, queries_in, k_codes, v_codes, side, block_stats, row_inputs, interpret)
    return SoftmaxState(state.max[..., :used], state.denom[..., :used], state.acc[..., :used, :])


def multi_query_attention(q: jax.Array, segment: PackedSegment, q_slots: jax.Array, starts: jax.Array, *,
                          bits: int, block: int, group: int | None = None, sliding_window: int | None = None,
                          backend: str | None = None, interpret=None, blocks: Blocks | None = None) -> SoftmaxState:
    """Partial attention states of several queries per sequence over a quantized segment (the kernel).

    q: [batch, queries, heads, d]; segment: a `PackedSegment` ([batch, kv_heads, tokens, ...]) of `bits`-bit codes in
    blocks of `block` tokens, values in groups of `group` channels (None: the whole head); q_slots: int [batch,
    queries], each query's own slot (it sees keys at slots <= it); starts: int [batch]. backend / interpret /
    blocks: the kernels' wrapper convention (`quantized_attention.segment_attention`). Returns the `SoftmaxState`
    max, denom float32 [batch, kv_heads, parts, queries * G] and acc [batch, kv_heads, parts, queries * G, d], row
    q * G + g for query q and head kv_head * G + g; `combine` merges it with other states.
    """
    with jax.named_scope("multi_query_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a quantized_attention.Blocks or None, got {blocks!r}")
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        check_inputs(q, segment, q_slots, starts, bits=bits, block=block, group=group, backend=backend)
        blocks = blocks or Blocks()
        if blocks.tile is not None:
            _check_tile(backend, blocks.tile, segment.k_codes.shape[2], not interpret)
        return _multi_query_attention(q, segment, q_slots, starts, bits=bits, block=block, group=group,
                                      sliding_window=sliding_window, backend=backend, interpret=interpret,
                                      blocks=blocks)


def state_output(state: SoftmaxState, queries: int) -> tuple[jax.Array, jax.Array]:
    """(out float32 [batch, queries, heads, d], lse float32 [batch, queries, heads]) from the grouped states of
    `multi_query_attention`; a query that saw nothing: out 0, lse MASK_VALUE."""
    out, top, total = combine([state])  # [batch, kv_heads, queries * G, d], [.., queries * G] twice
    batch, kv_heads, rows, _ = out.shape
    lse = jnp.where(total > TINY, top + jnp.log(total), MASK_VALUE)
    to_heads = lambda x: ungroup(x.reshape(batch, kv_heads, queries, rows // queries, -1).transpose(0, 1, 3, 2, 4))
    return to_heads(out), to_heads(lse[..., None])[..., 0]


def reference(q: jax.Array, segment: PackedSegment, q_slots: jax.Array, starts: jax.Array, *, bits: int,
              block: int, group: int | None = None, sliding_window: int | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Dequantize, then attend in jax.numpy: (out float32 [batch, queries, heads, d], lse float32 [batch, queries,
    heads]) as `multi_query` returns them."""
    k, v = dequantize_segment(segment, bits=bits, block=block, group=group)  # [batch, kv_heads, tokens, d]
    qg = group_queries(q.astype(jnp.float32), k.shape[1])  # [batch, kv_heads, G, queries, d]
    slots = segment.slots.astype(jnp.int32)[:, :, None, None, :]
    visible = visible_slots(slots, q_slots[:, None, None, :, None], starts[:, None, None, None, None],
                            sliding_window)  # [batch, kv_heads, 1, queries, tokens]
    scores = jnp.where(visible, grouped_scores(qg, k), MASK_VALUE)
    top = scores.max(axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    out = grouped_values(p, v) / jnp.maximum(total, TINY)
    lse = jnp.where(total > 0, top + jnp.log(jnp.maximum(total, TINY)), MASK_VALUE)
    return ungroup(out), ungroup(lse)[..., 0]


def multi_query(q: jax.Array, segment: PackedSegment, q_slots: jax.Array, starts: jax.Array, *, bits: int,
                block: int, group: int | None = None, sliding_window: int | None = None,
                kernel: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of several queries per sequence over a quantized segment, by the library's kernel policy: `kernel`
    None runs the compiled kernel where the platform traced for is a TPU or GPU and `reference` on a CPU; True or
    False forces one (zipjax.platform.use_kernel). Arguments as `multi_query_attention`. Returns (out float32
    [batch, queries, heads, d], lse float32 [batch, queries, heads]): merge with other parts by `merge_lse`."""
    settings = dict(bits=bits, block=block, group=group, sliding_window=sliding_window)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if use_kernel(kernel):
        return state_output(multi_query_attention(q, segment, q_slots, starts, **settings), q.shape[1])
    check_inputs(q, segment, q_slots, starts, bits=bits, block=block, group=group, backend="tpu")
    return reference(q, segment, q_slots, starts, **settings)


def merge_lse(parts: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """One (out, lse) from attention over disjoint sets of keys, exactly: out [..., d] weighted by exp(lse [...])
    (e.g. this segment's and a dense band's). Parts that saw nothing (lse MASK_VALUE) weigh nothing."""
    lse = jnp.stack([part[1] for part in parts])  # [parts, ...]
    top = lse.max(axis=0)
    weight = jnp.exp(lse - top)
    total = weight.sum(axis=0)
    out = sum(w[..., None] * part[0].astype(jnp.float32) for w, part in zip(weight, parts, strict=True))
    return out / total[..., None], top + jnp.log(total)
