"""Flash attention over a slot-addressed KV cache: the prompt pass (flash prefill) and length-bounded decode.

New queries attend to one layer's cache, reading only the key blocks some query of a block can see. Query i of a
pass sits at cache slot cursor + i (its K/V are already written there); key slot s is visible to query i of
sequence b iff starts[b] <= s <= cursor + i (left padding before starts[b]) and, with a sliding window W,
cursor + i - s < W. So a prefill touches about half the square of the prompt and a decode step (q_len 1) reads the
filled extent of the cache, not all max_len slots: slots past cursor + q_len are never loaded, whatever they hold.

GQA without repeated K/V: the (query, group head) pairs of one KV head are the rows of the query block, query-major
(row r is query r // group), and every tile is scored against that KV head's keys. Row r sees slot s iff
(s - cursor) * group <= r (and r < (s - cursor + W) * group with a window), so the kernel divides nothing.
Softmax is online and in float32; a row that sees no key (a left-padding query) outputs zeros.

Two kernels share the tile math (`_attend_tile`, over the online-softmax step of zipjax.kernels.common) and the
block range (`_visible_span`):
  TPU (Mosaic)   grid (batch, kv_heads, q_blocks, k_blocks), the k-block axis "arbitrary", m / l / acc in VMEM
                 scratch, cursor and starts scalar-prefetched; blocks outside [first, last] visible are skipped with
                 pl.when and the k/v index_map clamps into that range, so a skipped block issues no DMA.
  GPU (Triton)   grid (batch, kv_heads, q_blocks), an in-kernel fori_loop from the first to the last visible block
                 (unseen blocks are never loaded); power-of-two arrays only.
On "cpu" the loop kernel runs in Pallas interpret mode (the library uses its jnp path there; this keeps the kernel
testable). `reference` is the same computation in plain jax.numpy (the shared grouped attention of
zipjax.kernels.common). The wrapper pads q_len x group rows and max_len to whole blocks: padded rows repeat the last
query and are dropped, padded key slots lie past cursor + q_len and are never visible. Padding max_len copies the
cache, so real cache lengths should be multiples of the key block (512 covers both backends).

Imports: jax, numpy and the kernels' leaf only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from zipjax.kernels.common import (
    SoftmaxState,
    empty_state,
    grouped_attention,
    normalise,
    online_softmax_step,
    resolve_backend,
    tile_scores,
)

BACKENDS = ("tpu", "gpu", "cpu")
# (block_rows, block_k) per backend and pass; rows are (query, group) pairs. TPU blocks are (8, 128)-tile and bf16
# (16, 128)-tile multiples; Triton blocks are powers of two, rows at least 16 (the MMA's smallest M).
PREFILL_BLOCKS = {"tpu": (512, 512), "gpu": (128, 64)}
DECODE_BLOCKS = {"tpu": (16, 512), "gpu": (16, 128)}
# Triton launch parameters by pass. Passing them is also what routes a GPU pallas_call to Triton: without them jax
# 0.10.2 lowers to Mosaic GPU, which rejects these blocks.
TRITON_PARAMS = {"prefill": dict(num_warps=8, num_stages=3), "decode": dict(num_warps=4, num_stages=3)}


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable block sizes (jax's `BlockSizes`): `rows` (query, group head) rows per query block and
    `k` key slots per key block; None takes the backend's default for the pass, shrunk to a small problem. What a
    backend's compiler accepts is checked when the backend is known (TPU rows a multiple of 16, key blocks of 128;
    Triton powers of two, rows >= 16)."""

    rows: int | None = None
    k: int | None = None

    def __post_init__(self):
        for name in ("rows", "k"):
            size = getattr(self, name)
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"blocks.{name}: expected a positive int or None, got {size!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static layout of one call: `group` query heads per KV head, `q_len` real queries, blocks of `block_rows`
    rows and `block_k` key slots, `k_blocks` key blocks in the (padded) cache of `max_len` real slots, optional
    sliding `window`; `state`: return the partial softmax state instead of the output."""

    group: int
    q_len: int
    block_rows: int
    block_k: int
    k_blocks: int
    window: int | None
    max_len: int
    state: bool = False

    @property
    def padded(self) -> bool:
        """Key slots past max_len exist (the cache was padded to whole blocks)."""
        return self.k_blocks * self.block_k > self.max_len


def reference(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
              sliding_window: int | None = None) -> jax.Array:
    """The kernel's computation in plain jax.numpy, the mask materialised over all max_len slots. A row with no
    visible key gets the uniform average of the cache (the kernel gives zeros); compare rows that see a key.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_heads, max_len, head_dim]; cursor int32 []; starts int32
    [batch]. Returns [batch, q_len, heads, head_dim] in q's dtype."""
    q_slots = cursor + jnp.arange(q.shape[1], dtype=jnp.int32)  # [q_len]
    slots = jnp.arange(k.shape[2], dtype=jnp.int32)  # [max_len]
    delta = q_slots[None, :, None] - slots[None, None, :]  # [1, q_len, max_len]
    mask = (delta >= 0) & (slots[None, None, :] >= starts[:, None, None])  # [batch, q_len, max_len]
    if sliding_window is not None:
        mask &= delta < sliding_window
    return grouped_attention(q, k, v, mask[:, None, None])


def _visible_span(xp, q_block, cursor, start, g: Tiling):
    """Key slots [lo, hi] some row of query block `q_block` can see, and the key blocks [first, last] holding them
    (last = first - 1 when there are none). `xp` is jnp inside kernels and numpy for the static cost estimate."""
    first_query = (q_block * g.block_rows) // g.group
    last_query = xp.minimum(((q_block + 1) * g.block_rows - 1) // g.group, g.q_len - 1)
    hi = xp.minimum(cursor + last_query, g.max_len - 1)  # a shard's queries may lie past its last slot
    lo = start if g.window is None else xp.maximum(start, cursor + first_query - g.window + 1)
    first = xp.clip(lo // g.block_k, 0, g.k_blocks - 1)
    last = xp.where(lo <= hi, xp.minimum(hi // g.block_k, g.k_blocks - 1), first - 1)
    return lo, hi, first, last


def _key_block(q_block, k_block, cursor, start, g: Tiling):
    """The key block the TPU grid step (q_block, k_block) maps: k_block clamped into the visible [first, last], so a
    skipped step repeats its neighbour's block index and the pipeline issues no DMA for it."""
    _, _, first, last = _visible_span(jnp, q_block, cursor, start, g)
    return jnp.clip(k_block, first, jnp.maximum(first, last))


def _attend_tile(q, k, v, state: SoftmaxState, q_block, k_block, cursor, start, span, g: Tiling, scale: float
                 ) -> SoftmaxState:
    """One [block_rows, block_k] tile of the online softmax. q [block_rows, head_dim]; k, v [block_k, head_dim];
    state: max, denom [block_rows, 1], acc [block_rows, head_dim]."""
    lo, hi = span
    tile = (g.block_rows, g.block_k)
    rows = q_block * g.block_rows + lax.broadcasted_iota(jnp.int32, tile, 0)
    rows = jnp.minimum(rows, g.q_len * g.group - 1)  # padded rows repeat the last real query
    slots = k_block * g.block_k + lax.broadcasted_iota(jnp.int32, tile, 1)
    ahead = slots - cursor  # key slot relative to the first query's slot
    visible = (slots >= start) & (ahead * g.group <= rows)  # slot <= cursor + row // group
    if g.window is not None:
        visible &= rows < (ahead + g.window) * g.group  # cursor + row // group - slot < window
    if g.padded:
        visible &= slots <= hi  # padding slots a shard's later queries would otherwise see
    value_slots = k_block * g.block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where((value_slots >= lo) & (value_slots <= hi), v, jnp.zeros_like(v))  # 0 * NaN would poison rows
    # NaN keys of unseen slots drop out: their scores are masked
    return online_softmax_step(state, tile_scores(q, k, scale), visible, v)


def _tpu_kernel(cursor_ref, starts_ref, q_ref, k_ref, v_ref, o_ref, *refs, g: Tiling, scale: float):
    """Grid step (sequence, KV head, query block, key block). q_ref, o_ref [block_rows, head_dim]; k_ref, v_ref
    [block_k, head_dim]; `refs`: with g.state, the max and sum outputs [block_rows, 128]; then scratch m_ref, l_ref
    [block_rows, 128] (lane-replicated), acc_ref [block_rows, head_dim]. With g.state o_ref gets acc unnormalised."""
    state_refs, (m_ref, l_ref, acc_ref) = refs[:-3], refs[-3:]
    batch, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    cursor, start = cursor_ref[0], starts_ref[batch]
    lo, hi, first, last = _visible_span(jnp, q_block, cursor, start, g)

    @pl.when(k_block == 0)
    def _init():
        empty = empty_state((m_ref.shape[0],), acc_ref.shape[1])
        m_ref[...] = jnp.broadcast_to(empty.max, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(empty.denom, l_ref.shape)
        acc_ref[...] = empty.acc

    @pl.when((k_block >= first) & (k_block <= last))
    def _step():
        state = SoftmaxState(m_ref[:, :1], l_ref[:, :1], acc_ref[...])
        m, total, acc = _attend_tile(q_ref[...], k_ref[...], v_ref[...], state, q_block, k_block, cursor, start,
                                     (lo, hi), g, scale)
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(total, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(k_block == pl.num_programs(3) - 1)
    def _finish():
        if g.state:
            m_out, l_out = state_refs
            o_ref[...] = acc_ref[...]
            m_out[...], l_out[...] = m_ref[...], l_ref[...]
        else:
            o_ref[...] = normalise(SoftmaxState(m_ref[:, :1], l_ref[:, :1], acc_ref[...])).astype(o_ref.dtype)


def _gpu_kernel(cursor_ref, start_ref, q_ref, k_ref, v_ref, o_ref, *state_refs, g: Tiling, scale: float):
    """Program (sequence, KV head, query block). q_ref, o_ref [block_rows, head_dim]; k_ref, v_ref [max_len,
    head_dim] of this KV head, read block by block only from the first to the last visible key block. With g.state,
    o_ref gets acc unnormalised and state_refs the max and sum [block_rows, 1]."""
    q_block = pl.program_id(2)
    cursor, start = cursor_ref[0], start_ref[0]
    lo, hi, first, last = _visible_span(jnp, q_block, cursor, start, g)
    q = q_ref[...]

    def body(k_block, state):
        window = pl.ds(pl.multiple_of(k_block * g.block_k, g.block_k), g.block_k)
        return _attend_tile(q, k_ref[window, :], v_ref[window, :], state, q_block, k_block, cursor, start,
                            (lo, hi), g, scale)

    state = lax.fori_loop(first, last + 1, body, empty_state((q_ref.shape[0],), q_ref.shape[1]))
    if g.state:
        m_out, l_out = state_refs
        o_ref[...], m_out[...], l_out[...] = state.acc, state.max, state.denom
    else:
        o_ref[...] = normalise(state).astype(o_ref.dtype)


def _cost(g: Tiling, batch: int, kv_heads: int, q_blocks: int, head_dim: int, dtype, max_len: int
          ) -> pl.CostEstimate:
    """What one pass ending at the cache's end (cursor = max_len - q_len, no left padding) visits: about half the
    square for a prefill, the filled cache for a decode step; K/V blocks are read once per visiting query block."""
    cursor = max(max_len - g.q_len, 0)
    _, _, first, last = _visible_span(np, np.arange(q_blocks), cursor, 0, g)
    tiles = int(np.maximum(last - first + 1, 0).sum()) * batch * kv_heads
    tile = g.block_rows * g.block_k
    itemsize = jnp.dtype(dtype).itemsize
    q_and_out = 2 * batch * kv_heads * q_blocks * g.block_rows * head_dim * itemsize
    return pl.CostEstimate(flops=4 * tile * head_dim * tiles, transcendentals=(tile + g.block_rows) * tiles,
                           bytes_accessed=2 * g.block_k * head_dim * itemsize * tiles + q_and_out)


def _out_shapes(g: Tiling, rows: jax.Array, lanes: int) -> list[jax.ShapeDtypeStruct]:
    """The output shaped like rows; with g.state, float32 and followed by the max and sum [.., total_rows, lanes]."""
    if not g.state:
        return [jax.ShapeDtypeStruct(rows.shape, rows.dtype)]
    stat = jax.ShapeDtypeStruct((*rows.shape[:3], lanes), jnp.float32)
    return [jax.ShapeDtypeStruct(rows.shape, jnp.float32), stat, stat]


def _tpu_call(g: Tiling, rows: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
              interpret, cost: pl.CostEstimate) -> list[jax.Array]:
    """rows [batch, kv_heads, q_blocks * block_rows, head_dim]; k, v [batch, kv_heads, k_blocks * block_k,
    head_dim] -> [out shaped like rows] (+ max, sum [batch, kv_heads, total_rows, 128] with g.state)."""
    batch, kv_heads, total_rows, head_dim = rows.shape
    q_blocks = total_rows // g.block_rows

    def kv_index(b, h, i, j, cursor_ref, starts_ref):
        return b, h, _key_block(i, j, cursor_ref[0], starts_ref[b], g), 0

    row_spec = pl.BlockSpec((None, None, g.block_rows, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    stat_spec = pl.BlockSpec((None, None, g.block_rows, 128), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, g.block_k, head_dim), kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, kv_heads, q_blocks, g.k_blocks),
        in_specs=[row_spec, kv_spec, kv_spec], out_specs=[row_spec] + [stat_spec] * (2 if g.state else 0),
        scratch_shapes=[pltpu.VMEM((g.block_rows, 128), jnp.float32), pltpu.VMEM((g.block_rows, 128), jnp.float32),
                        pltpu.VMEM((g.block_rows, head_dim), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_tpu_kernel, g=g, scale=head_dim**-0.5),
        grid_spec=grid_spec,
        out_shape=_out_shapes(g, rows, 128),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="flash_attention",
    )(cursor.reshape(1), starts, rows, k, v)


def _gpu_call(g: Tiling, rows: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
              interpret, cost: pl.CostEstimate) -> jax.Array:
    """Same arguments and result as `_tpu_call` (max and sum [.., total_rows, 1]); one program per query block."""
    batch, kv_heads, total_rows, head_dim = rows.shape
    length = k.shape[2]
    row_spec = pl.BlockSpec((None, None, g.block_rows, head_dim), lambda b, h, i: (b, h, i, 0))
    stat_spec = pl.BlockSpec((None, None, g.block_rows, 1), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h, 0, 0))
    params = TRITON_PARAMS["decode" if g.q_len == 1 else "prefill"]
    return pl.pallas_call(
        functools.partial(_gpu_kernel, g=g, scale=head_dim**-0.5),
        grid=(batch, kv_heads, total_rows // g.block_rows),
        in_specs=[pl.BlockSpec((1,), lambda b, h, i: (0,)), pl.BlockSpec((1,), lambda b, h, i: (b,)),
                  row_spec, kv_spec, kv_spec],
        out_specs=[row_spec] + [stat_spec] * (2 if g.state else 0),
        out_shape=_out_shapes(g, rows, 1),
        compiler_params=plgpu.CompilerParams(**params),
        cost_estimate=cost, interpret=interpret, name="flash_attention",
    )(cursor.reshape(1), starts, rows, k, v)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def choose_blocks(backend: str, compiled: bool, q_len: int, group: int, max_len: int, blocks: Blocks) -> Blocks:
    """Block sizes: the caller's, else the defaults of the backend's pass, shrunk to a small problem. Compiled
    blocks follow the backend's rules (interpret mode takes any): TPU rows a multiple of 16 (bf16 sublane tiles) and
    key blocks of 128 (lanes); Triton powers of two, rows at least 16 (the MMA's smallest M)."""
    block_rows, block_k = blocks.rows, blocks.k
    kind = "tpu" if backend == "tpu" else "gpu"
    rows_default, k_default = (DECODE_BLOCKS if q_len == 1 else PREFILL_BLOCKS)[kind]
    if kind == "gpu":
        fit_rows, fit_k = pl.next_power_of_2(max(q_len * group, 16)), pl.next_power_of_2(max(max_len, 16))
    else:
        fit_rows, fit_k = _round_up(q_len * group, 16), _round_up(max_len, 128)
    if block_k is None:  # the largest legal block that divides the cache, so the cache is never padded (copied)
        block_k = min(k_default, fit_k)
        smallest = 128 if kind == "tpu" else 16
        halvings = [block_k >> i for i in range(8) if (block_k >> i) >= smallest]
        block_k = next((size for size in halvings if max_len % size == 0), block_k)
    block_rows = block_rows or min(rows_default, fit_rows)
    if block_rows < 1 or block_k < 1:
        raise ValueError(f"block_rows, block_k: expected positive sizes, got {block_rows}, {block_k}")
    if compiled and kind == "tpu" and (block_rows % 16 or block_k % 128):
        raise ValueError(f"block_rows, block_k: Mosaic needs multiples of 16 and 128, got {block_rows}, {block_k}")
    power_of_two = lambda n: n & (n - 1) == 0
    if compiled and kind == "gpu" and not (power_of_two(block_rows) and power_of_two(block_k) and block_rows >= 16):
        raise ValueError(f"block_rows, block_k: Triton needs powers of two, rows >= 16, got {block_rows}, {block_k}")
    return Blocks(block_rows, block_k)


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array, backend: str,
                 sliding_window: int | None, shard: bool = False) -> None:
    """ValueError naming the argument and its shape for anything the kernel cannot take."""
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, q_len, heads, head_dim], got shape {q.shape}")
    batch, q_len, heads, head_dim = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[1]:
        raise ValueError(f"k: expected [batch={batch}, kv_heads dividing heads={heads}, max_len, "
                         f"head_dim={head_dim}], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {k.shape}, got shape {v.shape}")
    if q_len > k.shape[2] and not shard:
        raise ValueError(f"q: q_len {q_len} exceeds the cache's max_len {k.shape[2]} (q shape {q.shape})")
    if not (q.dtype == k.dtype == v.dtype and jnp.issubdtype(q.dtype, jnp.floating)):
        raise ValueError(f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if jnp.shape(cursor) != () or not jnp.issubdtype(jnp.result_type(cursor), jnp.integer):
        raise ValueError(f"cursor: expected an integer scalar, got shape {jnp.shape(cursor)}")
    if jnp.shape(starts) != (batch,) or not jnp.issubdtype(jnp.result_type(starts), jnp.integer):
        raise ValueError(f"starts: expected integers [batch={batch}], got shape {jnp.shape(starts)}")
    if backend == "gpu" and head_dim & (head_dim - 1):
        raise ValueError(f"q: Triton needs a power-of-two head_dim, got shape {q.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: expected a positive size or None, got {sliding_window}")


@functools.partial(jax.jit, static_argnames=("sliding_window", "backend", "interpret", "blocks", "state"))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array, *,
               sliding_window: int | None, backend: str, interpret, blocks: Blocks, state: bool = False
               ) -> jax.Array | SoftmaxState:
    """The shared wrapper: group and pad the rows, pad the cache to whole key blocks, call the backend's kernel,
    drop the padding. Arguments as `flash_attention`, backend resolved; `state`: as `flash_attention_state`, with
    cursor and starts already in the cache's own slot numbers."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_rows, block_k = blocks.rows, blocks.k
    length = _round_up(max_len, block_k)
    if length != max_len:  # copies the cache: real caches should be whole key blocks
        pad = ((0, 0), (0, 0), (0, length - max_len), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    g = Tiling(group, q_len, block_rows, block_k, length // block_k, sliding_window, max_len, state)
    rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(batch, kv_heads, q_len * group, head_dim)  # row r = (query r // group, head r % group)
    total_rows = _round_up(q_len * group, block_rows)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, total_rows - q_len * group), (0, 0)))
    cost = _cost(g, batch, kv_heads, total_rows // block_rows, head_dim, q.dtype, max_len)
    call = _tpu_call if backend == "tpu" else _gpu_call
    out, *stats = call(g, rows, k, v, jnp.asarray(cursor, jnp.int32), jnp.asarray(starts, jnp.int32), interpret,
                       cost)
    out = out[:, :, : q_len * group].reshape(batch, kv_heads, q_len, group, head_dim)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, heads, head_dim)
    if not state:
        return out
    # [batch, kv_heads, rows, lanes] -> [batch, q_len, 1, heads]: one part per query, G = all heads
    m, total = (x[:, :, : q_len * group, 0].reshape(batch, kv_heads, q_len, group).transpose(0, 2, 1, 3)
                .reshape(batch, q_len, 1, heads) for x in stats)
    return SoftmaxState(m, total, out[:, :, None])


def _settings(q, k, v, cursor, starts, sliding_window, backend, interpret, blocks, *, shard: bool):
    """Checked inputs, then the backend, interpret flag and blocks of a call (`flash_attention`'s options)."""
    if blocks is not None and not isinstance(blocks, Blocks):
        raise ValueError(f"blocks: expected a flash_attention.Blocks or None, got {blocks!r}")
    backend, interpret = resolve_backend(backend, interpret, BACKENDS)
    check_inputs(q, k, v, cursor, starts, backend, sliding_window, shard=shard)
    q_len, group, max_len = q.shape[1], q.shape[2] // k.shape[1], k.shape[2]
    blocks = choose_blocks(backend, interpret is False, q_len, group, max_len, blocks or Blocks())
    return backend, interpret, blocks


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array, *,
                    sliding_window: int | None = None, backend: str | None = None, interpret=None,
                    blocks: Blocks | None = None) -> jax.Array:
    """Attention of new queries over a slot-addressed cache, reading only the key blocks they can see.

    q [batch, q_len, heads, head_dim] (query i at slot cursor + i, RoPE applied); k, v [batch, kv_heads, max_len,
    head_dim] with the new tokens' K/V already at slots cursor .. cursor + q_len - 1; cursor int32 []; starts int32
    [batch] (first real slot of each sequence). Returns [batch, q_len, heads, head_dim] in q's dtype.

    backend: "tpu" (Mosaic kernel), "gpu" (Triton kernel) or "cpu" (the loop kernel, interpreted); None means
    zipjax.kernels.common.platform() (`resolve_backend`). interpret: None (True on "cpu", else False), True, or a TPU
    `pltpu.InterpretParams` to run the TPU kernel under the TPU interpreter. blocks: a `Blocks` (None: the
    backend's defaults per pass, q_len 1 being a decode step; its rows count (query, group head) rows)."""
    with jax.named_scope("flash_attention"):
        backend, interpret, blocks = _settings(q, k, v, cursor, starts, sliding_window, backend, interpret, blocks,
                                               shard=False)
        return _attention(q, k, v, cursor, starts, sliding_window=sliding_window, backend=backend,
                          interpret=interpret, blocks=blocks)


def flash_attention_state(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array,
                          first_slot: jax.Array | int = 0, *, sliding_window: int | None = None,
                          backend: str | None = None, interpret=None, blocks: Blocks | None = None) -> SoftmaxState:
    """The partial softmax state of `flash_attention` over part of the cache: k, v [batch, kv_heads, n, head_dim]
    hold cache slots first_slot .. first_slot + n - 1 (one sequence shard of a cache split by sequence), cursor and
    starts are in the whole cache's slot numbers, and every rule of the mask (starts, cursor + i, the window) holds
    as in the whole cache; queries may lie past the part's last slot. Returns the `SoftmaxState` float32 max, denom
    [batch, q_len, 1, heads] and acc [batch, q_len, 1, heads, head_dim] (unnormalised output): the layout of
    zipjax.kernels.common.merge_states, so the parts' states combine exactly (across a mesh axis inside a shard_map
    with its `axis_name`). Options as `flash_attention`."""
    with jax.named_scope("flash_attention_state"):
        backend, interpret, blocks = _settings(q, k, v, cursor, starts, sliding_window, backend, interpret, blocks,
                                               shard=True)
        # the mask is invariant under a shift of every slot: the kernel sees the part's own slot numbers
        first_slot = jnp.asarray(first_slot, jnp.int32)
        return _attention(q, k, v, jnp.asarray(cursor, jnp.int32) - first_slot,
                          jnp.asarray(starts, jnp.int32) - first_slot, sliding_window=sliding_window, backend=backend,
                          interpret=interpret, blocks=blocks, state=True)


def flash_prefill(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array, *,
                  sliding_window: int | None = None, backend: str | None = None, interpret=None,
                  blocks: Blocks | None = None) -> jax.Array:
    """The prompt pass (q_len > 1): `flash_attention` with the backend's prefill blocks."""
    if q.ndim != 4 or q.shape[1] < 2:
        raise ValueError(f"q: a prefill takes [batch, q_len > 1, heads, head_dim], got shape {q.shape}")
    return flash_attention(q, k, v, cursor, starts, sliding_window=sliding_window, backend=backend,
                           interpret=interpret, blocks=blocks)


def flash_decode(q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array, starts: jax.Array, *,
                 sliding_window: int | None = None, backend: str | None = None, interpret=None,
                 blocks: Blocks | None = None) -> jax.Array:
    """One decode step (q_len 1): `flash_attention` with the group's rows as the query block, reading only slots
    up to cursor."""
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"q: a decode step takes [batch, 1, heads, head_dim], got shape {q.shape}")
    return flash_attention(q, k, v, cursor, starts, sliding_window=sliding_window, backend=backend,
                           interpret=interpret, blocks=blocks)
