"""Parallel-decoding attention for ZipAR: several queries per sequence against a cache written out of order.

ZipAR feeds one query per active image row (plus refreshes), each at its own raster slot (slots and the written
bitmap are per sequence: adaptive schedules differ between samples). A query may see key slot k iff the slot is
written, k <= the query's slot, and k >= the sequence's first prompt slot. This is that attention as a Pallas
kernel, flash-attention style: the queries of one KV head's group are stacked into `rows` ([q_len * group,
head_dim], padded), so GQA never repeats K/V, and the cache is walked in blocks of `block_k` slots with an online
softmax, so the [queries, max_len] score matrix never exists. Blocks no query of the sequence can see (before its
oldest visible key, past its newest written slot at or before its newest query) are skipped: ZipAR writes the cache
up to the decoding frontier only, so early passes read a fraction of it. A query that sees no key at all gets zeros
(the jnp reference, whose masked softmax is uniform then, gives the mean of V; callers ignore such rows).

Two bodies share the wrapper (input checks, grouping, the visibility bitmap, the per-sequence block range) and the
online-softmax step, because Mosaic (TPU) and Triton (GPU) want different shapes of program:

* TPU: grid (batch, kv_head, kv_block), the KV-block axis a sequential reduction with the softmax state in VMEM
  scratch. Each sequence's block range is scalar-prefetched into SMEM: skipped steps do no work, and the K/V
  index maps clamp to the range so a skipped step issues no DMA. Blocks are multiples of 128 slots (Mosaic's
  (8, 128) rule); a cache length that is not a multiple of the block gets a ragged last block, masked in the kernel
  rather than padded in HBM (padding would copy the whole cache on every call).
* GPU: Triton keeps no state across programs, so the loop over KV blocks runs inside the kernel, split-K
  ("flash-decoding"): grid (batch, kv_head, split), each program loops over its share of the sequence's block
  range and writes an unnormalised partial; a small jnp epilogue merges them by log-sum-exp. Every in-kernel array
  is a power of two (rows >= 16 for the MMA, 64-slot blocks; a cache length that is not a multiple of the block
  is padded, which never happens for the library's caches, whose lengths are multiples of 128).

`reference` below is the same computation in plain jax.numpy (the shared grouped attention of
zipjax.kernels.common); the kernel is tested against it in interpret mode (and with the TPU interpreter), and
compiled ahead of time for TPU v5e / v6e and an H100 (tests/test_aot_zipar.py). `zipar_attention` follows the
kernels' wrapper convention (`backend=None, interpret=None, blocks=None`): by default the platform being traced for
(`zipjax.kernels.common.platform()`), compiled on TPU and GPU, the TPU form interpreted on CPU. Whether the kernel or
the reference runs at all is the caller's choice (zipjax.zipar.cache, by the library's kernel policy).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from zipjax.kernels.common import (
    SoftmaxState,
    empty_state,
    grouped_attention,
    merge_states,
    normalise,
    online_softmax_step,
    resolve_backend,
    tile_scores,
)

BACKENDS = ("tpu", "gpu")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TPU_BLOCK_K = 512  # slots per KV block on TPU (a multiple of 128)
GPU_BLOCK_K = 64  # slots per KV block on GPU (a power of two)
_GPU_PROGRAMS = 128  # split-K aims at about one program per H100 SM (132)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable block size (jax's `BlockSizes`): `k` KV slots per block; None takes the backend's
    default (512 on TPU, 64 on GPU). The backend's rule is checked when it is known (TPU: a multiple of 128; GPU: a
    power of two >= 16)."""

    k: int | None = None

    def __post_init__(self):
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1):
            raise ValueError(f"blocks.k: expected a positive int or None, got {self.k!r}")


def reference(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, written: jax.Array,
              starts: jax.Array) -> jax.Array:
    """q [batch, q_len, heads, head_dim]; k, v [batch, kv_heads, max_len, head_dim]; q_slots int32 [batch, q_len];
    written bool [batch, max_len]; starts int32 [batch]. Returns [batch, q_len, heads, head_dim] in q's dtype."""
    slots = jnp.arange(k.shape[2], dtype=jnp.int32)
    mask = written[:, None, :] & (slots[None, None, :] <= q_slots[:, :, None])
    mask &= slots[None, None, :] >= starts[:, None, None]  # [batch, q_len, max_len]
    return grouped_attention(q, k, v, mask[:, None, None])


# ---------------------------------------------------------------------------------------------------------------
# shared by both bodies


def _softmax_step(q, k, v, visible, state: SoftmaxState, scale: float) -> SoftmaxState:
    """One KV block of the shared online softmax. q [rows, head_dim]; k, v [block_k, head_dim]; visible bool [rows,
    block_k]; state: max, denom float32 [rows, 1], acc float32 [rows, head_dim]. A row that sees nothing keeps
    denom = 0 and acc = 0 (finalised to 0, never NaN)."""
    return online_softmax_step(state, tile_scores(q, k, scale), visible, v)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static sizes of one call."""

    batch: int
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    max_len: int
    rows: int  # q_len * group, padded for the backend
    block_k: int
    num_blocks: int  # KV blocks covering max_len (the last may be ragged on TPU)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def check_inputs(q, k, v, q_slots, written, starts) -> None:
    """ValueError naming the argument whose shape or dtype does not fit the others."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be 4-D, got q {q.shape}, k {k.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    expected = {"k": (batch, kv_heads, max_len, head_dim), "v": (batch, kv_heads, max_len, head_dim),
                "q_slots": (batch, q_len), "written": (batch, max_len), "starts": (batch,)}
    for name, array in (("k", k), ("v", v), ("q_slots", q_slots), ("written", written), ("starts", starts)):
        if array.shape != expected[name]:
            raise ValueError(f"{name} has shape {array.shape}; q {q.shape} and k {k.shape} need {expected[name]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of k's {kv_heads} KV heads (q {q.shape}, k {k.shape})")
    for name, array in (("q", q), ("k", k), ("v", v)):
        if array.dtype != q.dtype or array.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {array.dtype}; q, k and v must share float32 or bfloat16")
    for name, array in (("q_slots", q_slots), ("starts", starts)):
        if not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{name} has dtype {array.dtype} {array.shape}; it must be integer")
    if written.dtype != jnp.bool_:
        raise ValueError(f"written has dtype {written.dtype} {written.shape}; it must be bool")


def choose_tiling(q: jax.Array, k: jax.Array, backend: str, blocks: Blocks) -> Tiling:
    """Legal block sizes. TPU: rows a multiple of the sublane tile (16 for bf16, 8 for float32), KV blocks a multiple
    of 128 slots (or the whole cache when it is shorter). GPU: rows and KV blocks powers of two, rows >= 16 for the
    MMA (the wrapper pads the cache to a whole number of blocks)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    needed = q_len * (heads // kv_heads)
    block_k = blocks.k
    if backend == "tpu":
        block_k = block_k or TPU_BLOCK_K
        if block_k % 128:
            raise ValueError(f"block_k {block_k} must be a multiple of 128 on TPU")
        block_k = min(block_k, max_len)
        tile = 16 if q.dtype == jnp.bfloat16 else 8
        rows = pl.cdiv(needed, tile) * tile
    elif backend == "gpu":
        block_k = block_k or GPU_BLOCK_K
        if block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"block_k {block_k} must be a power of two >= 16 on GPU")
        rows = max(16, 1 << (needed - 1).bit_length())
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return Tiling(batch, q_len, heads, kv_heads, head_dim, max_len, rows, block_k, pl.cdiv(max_len, block_k))


def _group_rows(q: jax.Array, q_slots: jax.Array, plan: Tiling) -> tuple[jax.Array, jax.Array]:
    """q [batch, q_len, heads, head_dim] -> [batch, kv_heads, rows, head_dim] (row = query * group + head in group)
    and each row's slot, int32 [batch, rows] (padding rows at -1: they see nothing)."""
    needed = plan.q_len * plan.group
    grouped = q.reshape(plan.batch, plan.q_len, plan.kv_heads, plan.group, plan.head_dim).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(plan.batch, plan.kv_heads, needed, plan.head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, plan.rows - needed), (0, 0)))
    row_slots = jnp.repeat(q_slots.astype(jnp.int32), plan.group, axis=1)
    row_slots = jnp.pad(row_slots, ((0, 0), (0, plan.rows - needed)), constant_values=-1)
    return grouped, row_slots


def _ungroup_rows(out: jax.Array, plan: Tiling) -> jax.Array:
    """[batch, kv_heads, rows, head_dim] -> [batch, q_len, heads, head_dim]."""
    out = out[:, :, : plan.q_len * plan.group].reshape(plan.batch, plan.kv_heads, plan.q_len, plan.group,
                                                        plan.head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(plan.batch, plan.q_len, plan.heads, plan.head_dim)


def _visible_keys(written: jax.Array, starts: jax.Array) -> jax.Array:
    """int32 [batch, max_len]: 1 where a key slot is written and not before its sequence's start."""
    slots = jnp.arange(written.shape[1], dtype=jnp.int32)
    return (written & (slots[None, :] >= starts[:, None])).astype(jnp.int32)


def _block_range(keys: jax.Array, q_slots: jax.Array, plan: Tiling) -> tuple[jax.Array, jax.Array]:
    """Per sequence, the first and last KV block holding a key some query can see, int32 [batch] each: from the
    oldest visible key to the newest one at or before the newest query slot. Exact, and tight where it matters:
    padding queries sit at the cache's last slot, but nothing past the decoding frontier is written. A sequence
    with nothing to see gets first = num_blocks > last = 0 (the index maps stay in range). keys int32 [batch,
    max_len] (`_visible_keys`); q_slots int [batch, q_len]."""
    slots = jnp.arange(plan.max_len, dtype=jnp.int32)
    oldest = jnp.min(jnp.where(keys != 0, slots, plan.max_len), axis=1)
    newest = jnp.max(jnp.where(keys != 0, slots, -1), axis=1)
    newest = jnp.minimum(newest, jnp.max(q_slots.astype(jnp.int32), axis=1))
    empty = newest < oldest
    first = jnp.where(empty, plan.num_blocks, oldest // plan.block_k)
    return first, jnp.where(empty, 0, newest // plan.block_k)


def _cost(plan: Tiling, itemsize: int, out_bytes: int) -> pl.CostEstimate:
    """Every block visited (the upper bound; skipped blocks cost nothing): two matmuls and one exp per score; reads
    the cache, the queries, the key bitmap and row slots once, writes `out_bytes`."""
    scores = plan.batch * plan.kv_heads * plan.rows * plan.max_len
    cache = 2 * plan.batch * plan.kv_heads * plan.max_len * plan.head_dim * itemsize
    queries = plan.batch * plan.kv_heads * plan.rows * plan.head_dim * itemsize
    return pl.CostEstimate(flops=4 * scores * plan.head_dim, transcendentals=scores,
                           bytes_accessed=cache + queries + 4 * plan.batch * (plan.max_len + plan.rows) + out_bytes)


# ---------------------------------------------------------------------------------------------------------------
# TPU (Mosaic): grid (batch, kv_head, kv_block), softmax state in VMEM scratch


def _tpu_kernel(first_ref, last_ref, slots_ref, keys_ref, q_ref, k_ref, v_ref, o_ref, max_ref, denom_ref, acc_ref, *,
                plan: Tiling, scale: float):
    """One KV block of one (sequence, KV head). first_ref, last_ref int32 [batch] (SMEM); slots_ref int32 [rows, 1];
    keys_ref int32 [1, block_k]; q_ref, o_ref [rows, head_dim]; k_ref, v_ref [block_k, head_dim]; scratch max_ref,
    denom_ref float32 [rows, 1], acc_ref float32 [rows, head_dim]."""
    b, j = pl.program_id(0), pl.program_id(2)
    last_block = plan.num_blocks - 1

    @pl.when(j == 0)
    def _init():
        max_ref[...], denom_ref[...], acc_ref[...] = empty_state((plan.rows,), plan.head_dim)

    def step(ragged: bool):
        k_slots = j * plan.block_k + jax.lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_k), 1)
        visible = (keys_ref[...] != 0) & (k_slots <= slots_ref[...])  # [rows, block_k]
        v = v_ref[...]
        if ragged:  # slots past max_len hold whatever the buffer held: hide their keys, zero their values
            visible &= k_slots < plan.max_len
            v_slots = j * plan.block_k + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(v_slots < plan.max_len, v, jnp.zeros_like(v))
        state = SoftmaxState(max_ref[...], denom_ref[...], acc_ref[...])
        max_ref[...], denom_ref[...], acc_ref[...] = _softmax_step(q_ref[...], k_ref[...], v, visible, state, scale)

    needed = (j >= first_ref[b]) & (j <= last_ref[b])
    if plan.max_len % plan.block_k:
        pl.when(needed & (j < last_block))(lambda: step(ragged=False))
        pl.when(needed & (j == last_block))(lambda: step(ragged=True))
    else:
        pl.when(needed)(lambda: step(ragged=False))

    @pl.when(j == last_block)
    def _finish():
        o_ref[...] = normalise(SoftmaxState(max_ref[...], denom_ref[...], acc_ref[...])).astype(o_ref.dtype)


def _tpu_attention(grouped, row_slots, keys, k, v, first, last, plan: Tiling, interpret) -> jax.Array:
    """grouped [batch, kv_heads, rows, head_dim]; row_slots int32 [batch, rows]; keys int32 [batch, max_len];
    k, v [batch, kv_heads, max_len, head_dim]; first, last int32 [batch]. Returns [batch, kv_heads, rows, head_dim]."""

    def kv_block(b, h, j, first, last):  # skipped steps repeat a needed block's index: no new DMA
        return b, h, jnp.minimum(jnp.maximum(j, first[b]), last[b]), 0

    def key_block(b, h, j, first, last):
        return b, 0, jnp.minimum(jnp.maximum(j, first[b]), last[b])

    row_spec = pl.BlockSpec((None, None, plan.rows, plan.head_dim), lambda b, h, j, first, last: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, plan.block_k, plan.head_dim), kv_block)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(plan.batch, plan.kv_heads, plan.num_blocks),
        in_specs=[pl.BlockSpec((None, plan.rows, 1), lambda b, h, j, first, last: (b, 0, 0)),
                  pl.BlockSpec((None, 1, plan.block_k), key_block), row_spec, kv_spec, kv_spec],
        out_specs=row_spec,
        scratch_shapes=[pltpu.VMEM((plan.rows, 1), jnp.float32), pltpu.VMEM((plan.rows, 1), jnp.float32),
                        pltpu.VMEM((plan.rows, plan.head_dim), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_tpu_kernel, plan=plan, scale=plan.head_dim**-0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(grouped.shape, grouped.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, grouped.dtype.itemsize, grouped.size * grouped.dtype.itemsize),
        interpret=interpret,
        name="zipar_attention",
    )(first, last, row_slots[:, :, None], keys[:, None, :], grouped, k, v)


# ---------------------------------------------------------------------------------------------------------------
# GPU (Triton): grid (batch, kv_head, split), the KV-block loop inside the kernel, splits merged by log-sum-exp


def _gpu_kernel(first_ref, last_ref, slots_ref, keys_ref, q_ref, k_ref, v_ref, acc_ref, max_ref, denom_ref, *,
                plan: Tiling, per_split: int, scale: float):
    """One split of one (sequence, KV head): KV blocks [split * per_split, (split + 1) * per_split) clipped to the
    sequence's range. first_ref, last_ref int32 [1]; slots_ref int32 [rows]; keys_ref int32 [length]; q_ref
    [rows, head_dim]; k_ref, v_ref [length, head_dim]. Writes the unnormalised acc_ref float32 [rows, head_dim] and
    max_ref, denom_ref float32 [rows, 1]."""
    split = pl.program_id(2)
    begin = jnp.maximum(first_ref[0], split * per_split)
    end = jnp.minimum(last_ref[0] + 1, (split + 1) * per_split)  # blocks outside [begin, end) are never read
    q = q_ref[...]
    row_slots = slots_ref[...][:, None]  # [rows, 1]

    def body(block, state):
        window = pl.ds(block * plan.block_k, plan.block_k)
        k_slots = block * plan.block_k + jax.lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_k), 1)
        visible = (keys_ref[window][None, :] != 0) & (k_slots <= row_slots)  # [rows, block_k]
        return _softmax_step(q, k_ref[window, :], v_ref[window, :], visible, state, scale)

    state = jax.lax.fori_loop(begin, end, body, empty_state((plan.rows,), plan.head_dim))
    acc_ref[...], max_ref[...], denom_ref[...] = state.acc, state.max, state.denom


def _gpu_attention(grouped, row_slots, keys, k, v, first, last, plan: Tiling, interpret) -> jax.Array:
    """As `_tpu_attention`, with keys, k and v padded to num_blocks * block_k slots."""
    splits = min(plan.num_blocks, pl.cdiv(_GPU_PROGRAMS, plan.batch * plan.kv_heads))
    per_split = pl.cdiv(plan.num_blocks, splits)
    splits = pl.cdiv(plan.num_blocks, per_split)  # no split without a block
    length = plan.num_blocks * plan.block_k
    warps = 8 if plan.rows * plan.head_dim >= 128 * 128 else 4  # a [128, 128] float32 accumulator: 8 warps
    sequence = lambda b, h, s: (b, 0)
    state = lambda b, h, s: (b, h, s, 0, 0)
    scalar = pl.BlockSpec((1,), lambda b, h, s: (b,))
    cache = pl.BlockSpec((None, None, length, plan.head_dim), lambda b, h, s: (b, h, 0, 0))
    partials = plan.batch * plan.kv_heads * splits * plan.rows  # rows of unnormalised state, float32
    acc, row_max, denom = pl.pallas_call(
        functools.partial(_gpu_kernel, plan=plan, per_split=per_split, scale=plan.head_dim**-0.5),
        grid=(plan.batch, plan.kv_heads, splits),
        in_specs=[scalar, scalar, pl.BlockSpec((None, plan.rows), sequence), pl.BlockSpec((None, length), sequence),
                  pl.BlockSpec((None, None, plan.rows, plan.head_dim), lambda b, h, s: (b, h, 0, 0)), cache, cache],
        out_specs=[pl.BlockSpec((None, None, None, plan.rows, plan.head_dim), state),
                   pl.BlockSpec((None, None, None, plan.rows, 1), state),
                   pl.BlockSpec((None, None, None, plan.rows, 1), state)],
        out_shape=[jax.ShapeDtypeStruct((plan.batch, plan.kv_heads, splits, plan.rows, plan.head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((plan.batch, plan.kv_heads, splits, plan.rows, 1), jnp.float32),
                   jax.ShapeDtypeStruct((plan.batch, plan.kv_heads, splits, plan.rows, 1), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        cost_estimate=_cost(plan, grouped.dtype.itemsize, 4 * partials * (plan.head_dim + 2)),
        interpret=interpret,
        name="zipar_attention",
    )(first, last, row_slots, keys, grouped, k, v)
    # the splits' states [batch, kv_heads, splits, rows(, 1 | head_dim)] merged by the shared log-sum-exp
    merged = merge_states([SoftmaxState(row_max, denom, acc)])
    return normalise(merged)[:, :, 0].astype(grouped.dtype)


# ---------------------------------------------------------------------------------------------------------------
# entry points


@functools.partial(jax.jit, static_argnames=("backend", "blocks", "interpret"))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, written: jax.Array, starts: jax.Array,
               *, backend: str, blocks: Blocks, interpret) -> jax.Array:
    """The shared wrapper of both bodies: group the rows, the visibility bitmap and block range, the backend's body,
    ungroup. Arguments as `zipar_attention`, backend and interpret resolved."""
    plan = choose_tiling(q, k, backend, blocks)
    grouped, row_slots = _group_rows(q, q_slots, plan)  # [batch, kv_heads, rows, head_dim], [batch, rows]
    keys = _visible_keys(written, starts)  # [batch, max_len]
    first, last = _block_range(keys, q_slots, plan)  # [batch] each
    if backend == "tpu":
        out = _tpu_attention(grouped, row_slots, keys, k, v, first, last, plan, interpret)
    else:
        pad = plan.num_blocks * plan.block_k - plan.max_len  # zero unless the cache length is not a block multiple
        keys = jnp.pad(keys, ((0, 0), (0, pad)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
        out = _gpu_attention(grouped, row_slots, keys, k, v, first, last, plan, interpret)
    return _ungroup_rows(out, plan)


def zipar_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, written: jax.Array,
                    starts: jax.Array, *, backend: str | None = None, interpret=None,
                    blocks: Blocks | None = None) -> jax.Array:
    """The Pallas kernel; same arguments and result as `reference`.

    backend: "tpu" (Mosaic) or "gpu" (Triton) picks the body; None is the platform being traced for
    (`zipjax.kernels.common.resolve_backend`: on a CPU the TPU body, interpreted). interpret: None (True on a CPU,
    else False), True (Pallas' interpreter, any backend), or a TPU `InterpretParams`. blocks: a `Blocks` (None: 512
    KV slots per block on TPU, 64 on GPU)."""
    with jax.named_scope("zipar_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a zipar_attention.Blocks or None, got {blocks!r}")
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        check_inputs(q, k, v, q_slots, written, starts)
        choose_tiling(q, k, backend, blocks or Blocks())  # refuses illegal blocks before tracing
        return _attention(q, k, v, q_slots, written, starts, backend=backend, blocks=blocks or Blocks(),
                          interpret=interpret)
