"""Decode attention over packed quantized KV codes, without a dequantized copy of the cache in memory.

A segment holds `blocks` blocks of `block` tokens for one precision (2, 4 or 8 bits): packed key and value codes,
channel-wise key (step, min) per block, token-wise value (step, min) per token (and per group of channels), and an
optional CST channel scale per block. The kernel takes the decode queries of each KV head's GQA group and returns
partial softmax states (running max m, sum l, unnormalized output acc); `combine` merges the states of every tile
of every segment (and of the full-precision window) exactly by log-sum-exp, which is how mixed precision is merged.

The scales never touch the cache: keys are k = code * step_c + min_c per channel, so q . k = (q * step) . code +
q . min, the block's step folded into the query and its min into one bias; values are v = (code * step_t + min_t)
* c, so the output is c * ((p * step_t) @ code + p @ min_t), the token's step applied to its probability. Codes are
unpacked in registers: with f = 8 / bits codes per byte, plane j (bits [j * bits, (j + 1) * bits) of every byte)
holds the contiguous channels [j * w, (j + 1) * w), w = d * bits / 8, so each plane is one shift and mask of the
loaded tile, contracted against the matching static slice of the query / output refs. Nothing is gathered or
concatenated inside the kernel (Triton lowers neither).

Tiling. Cache blocks have arbitrary sizes (the prompt segment's block is the prompt's salient count, e.g. 2458;
streaming blocks are a window's split, e.g. 60), which neither Mosaic (tiles of 128 lanes / 32 uint8 rows) nor
Triton (powers of two) accept, and padding the codes would copy them. So one program takes a legal tile of `tile`
consecutive tokens of the segment, across block boundaries: a tile meets at most `window` blocks, one key pass
each (a CST value pass each too), and each token takes the pass of its own block, selected by position; the
per-block statistics (key step and min, CST scale: rows of d) are read whole once per KV head. The last tile is
partial: on TPU Mosaic clips its copy (the rows past the end are masked); on GPU, where Triton loads are unmasked,
the last window is shifted back inside the segment and the tokens it shares with the previous tile are masked.
On TPU the tile axis is sequential and the state accumulates in the resident output block (one state per KV
head); on GPU programs run concurrently and each tile returns its own state.

Layouts and dtypes. On TPU, XLA's default HBM layout of a uint8 [.., tokens, width < 128] array puts tokens
minor, so the kernel reads codes as [width, tile] tiles of that view (tokens on lanes: the swapaxes is a bitcast,
no copy); a width of 128 keeps [tile, width]. On GPU codes are read row-major [tile, width]. The per-token side
data, whether the query sees the token (the shared `visible_slots` rule) and the value steps and mins, is one
small float16 array [1 + 2 groups, tokens] the wrapper builds in one pass over slots and scales (2 bytes per row
and token, beside the codes' 2 * width). Mosaic cannot load float16 on any TPU generation, so on TPU the float16
arrays are passed as their uint16 bits (a free bitcast) and decoded in the kernel into float32 VMEM scratch (the
side rows per tile, the statistics once per KV head); Triton reads float16 directly. Dots are float32-exact
(Mosaic's fp32 contraction; 3-pass TF32 on Triton, which keeps the tensor cores). `cost_estimate` counts the
kernel's contractions and the bytes it reads and writes.

`segment_attention` takes the segment as one `PackedSegment` record and follows the kernels' wrapper convention
(`backend=None, interpret=None, blocks=None`): by default it compiles for `zipjax.kernels.common.platform()` ("tpu":
Mosaic, "gpu": Triton) and interprets the TPU form on "cpu"; it returns the shared `SoftmaxState`. `reference` is
the same computation in plain jax.numpy (dequantize, then attend with the shared grouped scores and softmax); the
kernel is tested against it in interpret mode (both forms) and with the TPU interpreter, and compiled ahead of time
for TPU v5e / v6e and an H100 (tests/test_aot_quantized.py). Imports: jax and the kernels' leaf only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from zipjax.kernels.common import (  # noqa: F401  (combine, merge: this kernel's states, re-exported)
    MASK_VALUE,
    SoftmaxState,
    combine,
    empty_state,
    grouped_scores,
    grouped_values,
    masked_softmax,
    merge,
    platform,
    resolve_backend,
    unpack,
    visible_slots,
)

BITS = (2, 4, 8)
BACKENDS = ("tpu", "gpu")
TPU_LANES = 128  # a TPU tile with tokens on lanes is a multiple of this, or the whole segment
TPU_MAX_TILE = 512
GPU_TILE = 128  # at most; a power of two (Triton) no longer than the segment
GPU_MIN_TILE = 16  # Triton dots need at least 16 columns


class PackedSegment(NamedTuple):
    """One precision's segment of a quantized cache as the kernel reads it, [batch, kv_heads, blocks * block, ...]
    (a pytree: it goes through jit and shard_map whole). k_codes, v_codes: uint8 [..., tokens, d * bits / 8];
    k_step, k_min (channel-wise keys) and v_scale (CST, or None): [..., blocks, d]; v_step, v_min (token-wise values):
    [..., tokens, d / group]; slots: int [..., tokens], the cache slot of each token (-1: empty)."""

    k_codes: jax.Array
    k_step: jax.Array
    k_min: jax.Array
    v_codes: jax.Array
    v_step: jax.Array
    v_min: jax.Array
    v_scale: jax.Array | None
    slots: jax.Array


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable block size (jax's `BlockSizes`): `tile` tokens per program; None takes the backend's
    choice (`choose_tiling`). Checked against the segment once known: at most its length; compiled for TPU a
    multiple of 128 or the whole segment, for GPU a power of two >= 16."""

    tile: int | None = None

    def __post_init__(self):
        if self.tile is not None and (not isinstance(self.tile, int) or isinstance(self.tile, bool) or self.tile < 1):
            raise ValueError(f"blocks.tile: expected a positive int or None, got {self.tile!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static geometry of one pallas_call: how a segment's tokens are cut into tiles, and what each tile reads."""

    backend: str  # "tpu" or "gpu": whose block rules the tiles obey
    bits: int
    head_dim: int
    group: int  # channels per value group (head_dim: one group)
    block: int  # tokens per quantization block
    length: int  # tokens in the segment, blocks * block
    tile: int  # tokens per program
    rows: int  # query rows per program: G, padded to a power of two on GPU
    cst: bool  # a CST channel scale per block multiplies the values
    precision: lax.Precision | lax.DotAlgorithmPreset  # float32-exact: fp32 (Mosaic), 3-pass TF32 (Triton)
    per_row: bool = False  # each query row has its own slot bounds (zipjax.kernels.quantized_multi_query)

    @property
    def width(self) -> int:
        return self.head_dim * self.bits // 8

    @property
    def planes(self) -> int:
        return 8 // self.bits

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    @property
    def blocks(self) -> int:
        return self.length // self.block

    @property
    def tiles(self) -> int:
        return -(-self.length // self.tile)

    @property
    def channels_major(self) -> bool:
        """Codes tiles are [width, tile] (tokens on lanes, TPU's default layout for narrow rows) or [tile, width]."""
        return self.backend == "tpu" and self.width < TPU_LANES

    @property
    def accumulates(self) -> bool:
        """One state per KV head, accumulated over the sequential tile axis (TPU), or one per tile (GPU, whose
        programs run concurrently)."""
        return self.backend == "tpu"

    @property
    def states(self) -> int:
        return 1 if self.accumulates else self.tiles

    @property
    def stats(self) -> int:
        """Per-block statistics: key step, key min (and CST scale)."""
        return 3 if self.cst else 2

    @property
    def window(self) -> int:
        """The most blocks one tile meets (one key pass each)."""
        starts = np.arange(self.tiles) * self.tile
        last = np.minimum(starts + self.tile, self.length) - 1
        return int((last // self.block - starts // self.block).max()) + 1

    def plane_groups(self, j: int) -> range:
        """The value groups whose channels meet plane j's channels [j * width, (j + 1) * width)."""
        return range(j * self.width // self.group, ((j + 1) * self.width - 1) // self.group + 1)


def choose_tiling(backend: str, bits: int, head_dim: int, group: int, block: int, length: int, heads_per_kv: int,
                  cst: bool, compiled: bool, tile: int | None = None, per_row: bool = False) -> Tiling:
    """TPU: a multiple of 128 tokens near the block size, at most 512 (a tile meets fewer blocks, so fewer key
    passes), or the whole segment when it is shorter than 128. GPU: 128 tokens, or the largest power of two that
    fits in the segment; the G query rows padded to a power of two. `tile` (from `Blocks`) overrides the tokens per
    program. `per_row`: the rows are several queries', each with its own visible slots."""
    if tile is not None:
        _check_tile(backend, tile, length, compiled)
    if backend == "tpu":
        near_block = int(np.clip(block // TPU_LANES, 1, TPU_MAX_TILE // TPU_LANES)) * TPU_LANES
        tile = tile or (length if length <= TPU_LANES else near_block)
        rows, precision = heads_per_kv, lax.Precision.HIGHEST
    else:
        tile = tile or min(GPU_TILE, 1 << (length.bit_length() - 1))
        rows = 1 << (heads_per_kv - 1).bit_length()
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if compiled else lax.Precision.HIGHEST
    return Tiling(backend, bits, head_dim, group, block, length, tile, rows, cst, precision, per_row)


def _check_tile(backend: str, tile: int, length: int, compiled: bool) -> None:
    """ValueError unless `tile` tokens per program fit a segment of `length` tokens and the compiler's rules."""
    if tile > length:
        raise ValueError(f"blocks.tile {tile} exceeds the segment's {length} tokens")
    if compiled and backend == "tpu" and tile % TPU_LANES and tile != length:
        raise ValueError(f"blocks.tile {tile}: Mosaic needs a multiple of {TPU_LANES} or the whole segment ({length})")
    if backend == "gpu" and (tile & (tile - 1) or tile < GPU_MIN_TILE):
        raise ValueError(f"blocks.tile {tile}: Triton needs a power of two >= {GPU_MIN_TILE}")


def _planes(codes_ref, t: Tiling) -> list[jax.Array]:
    """The code planes of a tile as float32 ([width, tile] or [tile, width]); uint8 is widened to int32 before the
    shifts (Mosaic cannot shift uint8 vectors)."""
    wide = codes_ref[...].astype(jnp.int32)
    if t.bits == 8:
        return [wide.astype(jnp.float32)]
    mask = (1 << t.bits) - 1
    return [((wide >> (j * t.bits)) & mask).astype(jnp.float32) for j in range(t.planes)]


def decode_float16_bits(bits: jax.Array) -> jax.Array:
    """IEEE half-precision bit patterns (int32 holding 16 bits) -> float32, exactly (zeros, subnormals, inf/nan)."""
    sign, exponent, mantissa = bits >> 15, (bits >> 10) & 0x1F, bits & 0x3FF
    wide_exponent = jnp.where(exponent == 0x1F, 0xFF, exponent + (127 - 15))
    normal = lax.bitcast_convert_type((sign << 31) | (wide_exponent << 23) | (mantissa << 13), jnp.float32)
    subnormal = mantissa.astype(jnp.float32) * 2.0**-24 * (1 - 2 * sign).astype(jnp.float32)
    return jnp.where(exponent == 0, subnormal, normal)


def _float32(x: jax.Array) -> jax.Array:
    """A loaded scale as float32: float16 (GPU) or its bits as uint16 (TPU, where Mosaic cannot load float16)."""
    if x.dtype == jnp.uint16:
        return decode_float16_bits(x.astype(jnp.int32))
    return x.astype(jnp.float32)


def _scores_dot(folded: jax.Array, plane: jax.Array, t: Tiling) -> jax.Array:
    """[rows, width] . plane -> [rows, tile]."""
    dims = (((1,), (0 if t.channels_major else 1,)), ((), ()))
    return lax.dot_general(folded, plane, dims, precision=t.precision, preferred_element_type=jnp.float32)


def _values_dot(weights: jax.Array, plane: jax.Array, t: Tiling) -> jax.Array:
    """[rows, tile] . plane -> [rows, width]."""
    dims = (((1,), (1 if t.channels_major else 0,)), ((), ()))
    return lax.dot_general(weights, plane, dims, precision=t.precision, preferred_element_type=jnp.float32)


def _block_row(ref, block: jax.Array, j: int, t: Tiling) -> jax.Array:
    """float32 [1, width]: plane j's channels of a per-block statistic (ref [blocks, d]) for one block."""
    return _float32(ref[pl.ds(block, 1), pl.ds(j * t.width, t.width)])


def _key_scores(q_ref, planes, ks_ref, km_ref, tile_blocks, members, t: Tiling) -> jax.Array:
    """float32 [rows, tile]: q . k of every token of the tile, each with the key step and min of its own block."""
    scores = jnp.zeros((t.rows, t.tile), jnp.float32)
    for block, member in zip(tile_blocks, members, strict=True):
        block_scores = jnp.zeros((t.rows, 1), jnp.float32)
        for j, plane in enumerate(planes):
            q = q_ref[:, pl.ds(j * t.width, t.width)]  # [rows, width], already scaled by head_dim^-0.5
            folded = q * _block_row(ks_ref, block, j, t)  # the block's per-channel key step folded into the query
            bias = jnp.sum(q * _block_row(km_ref, block, j, t), axis=1, keepdims=True)  # q . min, [rows, 1]
            block_scores = block_scores + _scores_dot(folded, plane, t) + bias
        scores = jnp.where(member, block_scores, scores)
    return scores


def _plane_values(j: int, plane, p, passes, side_ref, cs_ref, t: Tiling) -> jax.Array:
    """float32 [rows, width]: sum over the tile of p * v for plane j's channels. `passes`: (block, its visible
    tokens) per block the tile meets when a CST scale differs per block, else one (None, all visible tokens)."""
    column = j * t.width + lax.broadcasted_iota(jnp.int32, (1, t.width), 1)  # channel of each output column
    part = jnp.zeros((t.rows, t.width), jnp.float32)
    for block, mask in passes:
        for g in t.plane_groups(j):
            step = _float32(side_ref[pl.ds(1 + g, 1), :])  # [1, tile]
            minimum = _float32(side_ref[pl.ds(1 + t.groups + g, 1), :])
            weights = jnp.where(mask, p * step, 0.0)  # where, not *: rows past the segment's end hold garbage
            sums = _values_dot(weights, plane, t) + jnp.sum(jnp.where(mask, p * minimum, 0.0), axis=1, keepdims=True)
            if not (g * t.group <= j * t.width and (j + 1) * t.width <= (g + 1) * t.group):
                sums = jnp.where((column >= g * t.group) & (column < (g + 1) * t.group), sums, 0.0)  # shared plane
            part = part + (sums * _block_row(cs_ref, block, j, t) if t.cst else sums)
    return part


def _tile_tokens(i: jax.Array, side_ref, row_refs, t: Tiling):
    """Which tokens of tile i the query sees ([1, tile] bool; per row, [rows, tile]), the blocks the tile meets
    (clamped indices, for the statistics rows) and each one's tokens ([1, tile] bool). row_refs: with `per_row`,
    the tile's slots [1, tile] int32 and the rows' lowest and highest visible slot [rows, 1] int32 (lowest >= 0)."""
    # on GPU the last window is shifted back inside the segment (see the module docstring)
    start = jnp.minimum(i * t.tile, t.length - t.tile) if t.backend == "gpu" else i * t.tile
    position = start + lax.broadcasted_iota(jnp.int32, (1, t.tile), 1)  # token index in the segment
    owned = (position >= i * t.tile) & (position < t.length)
    visible = owned & (side_ref[pl.ds(0, 1), :] != 0)  # 1.0 or its bits
    if t.per_row:
        slots_ref, lowest_ref, highest_ref = row_refs
        slot = jnp.where(visible, slots_ref[...], -1)  # [1, tile]; -1: below every row's lowest slot
        visible = (slot >= lowest_ref[...]) & (slot <= highest_ref[...])  # [rows, tile]
    first = lax.div(i * t.tile, t.block)  # the first block the tile meets
    blocks = [jnp.minimum(first + k, t.blocks - 1) for k in range(t.window)]
    members = [(position >= (first + k) * t.block) & (position < (first + k + 1) * t.block) for k in range(t.window)]
    return visible, blocks, members


def _decoded(side_ref, stat_refs, scratch, t: Tiling):
    """The side and statistics refs to read rows from. On TPU, float32 VMEM copies decoded from the float16 bits:
    the tile's side rows at every tile, the statistics at the KV head's first tile (single rows of a uint16 ref do
    not lower in Mosaic); on GPU, the float16 inputs themselves."""
    if not scratch:
        return side_ref, stat_refs
    side_scratch, *stat_scratch = scratch
    side_scratch[...] = _float32(side_ref[...])

    @pl.when(pl.program_id(2) == 0)
    def _decode_statistics():
        for source, target in zip(stat_refs, stat_scratch, strict=True):
            target[...] = _float32(source[...])

    return side_scratch, stat_scratch


def _kernel(q_ref, kc_ref, vc_ref, side_ref, *refs, t: Tiling):
    """One (sequence, KV head, tile). q_ref [rows, d] float32; kc_ref, vc_ref uint8 [width, tile] or [tile, width];
    side_ref [1 + 2 groups, tile]; then in `refs`: the key step, key min (and CST scale) refs [blocks, d]; with
    `per_row`, the tile's slots and the rows' bounds (`_tile_tokens`); m, l
    [rows, 1] and acc [rows, d], the tile's state (GPU) or the running state over the tiles of the KV head (TPU:
    the output block stays in VMEM along the sequential tile axis); on TPU, the scratch of `_decoded`.

    This is the online-softmax step of zipjax.kernels.common (same mask value, same empty state, same rescale)
    written out, because acc is updated plane by plane in column slices (nothing is concatenated in a kernel)."""
    inputs = t.stats + (3 if t.per_row else 0)
    stat_refs, row_refs = refs[:t.stats], refs[t.stats:inputs]
    (m_ref, l_ref, acc_ref), scratch = refs[inputs:inputs + 3], refs[inputs + 3:]
    side_ref, stat_refs = _decoded(side_ref, stat_refs, scratch, t)
    ks_ref, km_ref, cs_ref = (*stat_refs, None)[:3]
    i = pl.program_id(2)
    visible, blocks, members = _tile_tokens(i, side_ref, row_refs, t)
    scores = _key_scores(q_ref, _planes(kc_ref, t), ks_ref, km_ref, blocks, members, t)
    scores = jnp.where(visible, scores, MASK_VALUE)
    m = scores.max(axis=1, keepdims=True)  # [rows, 1]
    rescale = None  # of the running state, when accumulating
    if t.accumulates:
        @pl.when(i == 0)
        def _start():
            m_ref[...], l_ref[...], acc_ref[...] = empty_state((t.rows,), t.head_dim)

        m = jnp.maximum(m_ref[...], m)
        rescale = jnp.exp(m_ref[...] - m)
    p = jnp.where(visible, jnp.exp(scores - m), 0.0)  # [rows, tile]
    passes = [(None, visible)]  # one value pass over the visible tokens, or one per block for its CST scale
    if t.cst:
        passes = [(block, visible & member) for block, member in zip(blocks, members, strict=True)]
    for j, plane in enumerate(_planes(vc_ref, t)):
        part = _plane_values(j, plane, p, passes, side_ref, cs_ref, t)
        columns = pl.ds(j * t.width, t.width)
        acc_ref[:, columns] = part if rescale is None else rescale * acc_ref[:, columns] + part
    total = p.sum(axis=1, keepdims=True)
    l_ref[...] = total if rescale is None else rescale * l_ref[...] + total
    m_ref[...] = m


def _token_side(v_step, v_min, slots, q_slot, starts, sliding_window) -> jax.Array:
    """float16 [batch, kv_heads, 1 + 2 groups, length]: whether the query sees each token (1 or 0, the shared slot
    rule), then the value steps and mins per group, tokens on the last axis."""
    visible = visible_slots(slots, q_slot, starts[:, None, None], sliding_window)[:, :, None, :]
    rows = [visible.astype(jnp.float16), jnp.swapaxes(v_step, 2, 3), jnp.swapaxes(v_min, 2, 3)]
    return jnp.concatenate([x.astype(jnp.float16) for x in rows], axis=2)


def _loadable(x: jax.Array, backend: str) -> jax.Array:
    """float16 as the kernel loads it: as is (Triton), or its bits as uint16 (Mosaic cannot load float16 on any TPU
    generation; the bitcast is free)."""
    return x if backend == "gpu" else lax.bitcast_convert_type(x, jnp.uint16)


def _in_specs(t: Tiling, side_rows: int, block_stats: int) -> list[pl.BlockSpec]:
    """Query, key codes, value codes, side data, then the per-block statistics (whole, once per KV head); with
    `per_row`, the slots [1, tile] of the tile and the rows' two bounds [rows, 1] (once per sequence)."""
    if t.backend == "gpu":  # element offsets: windows clamped inside the segment
        start = lambda i: jnp.minimum(i * t.tile, t.length - t.tile)
        window = lambda rows, cols: (None, None, pl.Element(rows), pl.Element(cols))
        codes = pl.BlockSpec(window(t.tile, t.width), lambda b, h, i: (b, h, start(i), 0))
        side, slots = (pl.BlockSpec(window(rows, t.tile), lambda b, h, i: (b, h, 0, start(i)))
                       for rows in (side_rows, 1))
    else:
        if t.channels_major:
            codes = pl.BlockSpec((None, None, t.width, t.tile), lambda b, h, i: (b, h, 0, i))
        else:
            codes = pl.BlockSpec((None, None, t.tile, t.width), lambda b, h, i: (b, h, i, 0))
        side, slots = (pl.BlockSpec((None, None, rows, t.tile), lambda b, h, i: (b, h, 0, i))
                       for rows in (side_rows, 1))
    per_head = lambda rows: pl.BlockSpec((None, None, rows, t.head_dim), lambda b, h, i: (b, h, 0, 0))
    bounds = pl.BlockSpec((None, t.rows, 1), lambda b, h, i: (b, 0, 0))
    rows = [slots, bounds, bounds] if t.per_row else []
    return [per_head(t.rows), codes, codes, side] + [per_head(t.blocks)] * block_stats + rows


def _cost(t: Tiling, batch: int, kv_heads: int, inputs: list[jax.Array]) -> pl.CostEstimate:
    """What the kernel does and reads: the two contractions per pass (a key pass per block a tile meets; a value
    pass per group a plane meets, per block with CST), one exp per score, every input once (on GPU the last
    window's overlap twice) and the outputs."""
    programs = batch * kv_heads * t.tiles
    value_passes = sum(len(t.plane_groups(j)) for j in range(t.planes)) * (t.window if t.cst else 1)
    flops = programs * 2 * t.rows * t.tile * t.width * (t.planes * t.window + value_passes)
    read = sum(x.size * x.dtype.itemsize for x in inputs)
    if t.backend == "gpu":
        side = inputs[3]
        overlap = t.tiles * t.tile - t.length
        read += batch * kv_heads * overlap * (2 * t.width + side.shape[2] * side.dtype.itemsize)
    written = batch * kv_heads * t.states * t.rows * (t.head_dim + 2) * 4
    return pl.CostEstimate(flops=flops, transcendentals=programs * t.rows * t.tile, bytes_accessed=read + written)


def _scratch(t: Tiling, side_rows: int) -> list:
    """TPU: float32 VMEM for the decoded side rows of a tile and the decoded statistics of a KV head."""
    if t.backend == "gpu":
        return []
    return [pltpu.VMEM((side_rows, t.tile), jnp.float32)] + [pltpu.VMEM((t.blocks, t.head_dim), jnp.float32)] * t.stats


def _compiler_params(t: Tiling):
    """Triton on GPU (without these a GPU pallas_call goes to Mosaic GPU); Mosaic with the tile axis sequential
    (the state accumulates along it)."""
    if t.backend == "gpu":
        return plt.CompilerParams(num_warps=4, num_stages=2)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def check_inputs(q, segment: PackedSegment, q_slot, starts, *, bits: int, block: int, group: int | None,
                  backend: str) -> None:
    """ValueError naming the argument and its shape unless the segment is what `segment_attention` reads."""
    if not isinstance(segment, PackedSegment):
        raise ValueError(f"segment: expected a PackedSegment, got {type(segment).__name__}")
    if bits not in BITS or backend not in BACKENDS:
        raise ValueError(f"bits must be one of {BITS} and backend one of {BACKENDS}, got {bits}, {backend!r}")
    if q.ndim != 4 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be float [batch, kv_heads, G, head_dim], got {q.dtype} {q.shape}")
    batch, kv_heads, _, d = q.shape
    g = group or d
    if d % g or d * bits % 8:
        raise ValueError(f"head_dim {d} (q {q.shape}) must be a multiple of group {g} and of {8 // bits} codes a byte")
    k_codes = segment.k_codes
    if k_codes.ndim != 4 or block < 1 or k_codes.shape[2] % block:
        raise ValueError(f"k_codes must be [batch, kv_heads, blocks * {block}, width], got shape {k_codes.shape}")
    length = k_codes.shape[2]
    if backend == "gpu" and length < GPU_MIN_TILE:
        raise ValueError(f"the GPU kernel needs >= {GPU_MIN_TILE} tokens, k_codes has shape {k_codes.shape}")
    codes, per_block = (batch, kv_heads, length, d * bits // 8), (batch, kv_heads, length // block, d)
    per_token = (*codes[:3], d // g)
    expected = dict(k_codes=(codes, "uint8"), v_codes=(codes, "uint8"), k_step=(per_block, "float"),
                    k_min=(per_block, "float"), v_step=(per_token, "float"), v_min=(per_token, "float"),
                    v_scale=(per_block, "float"), slots=(codes[:3], "int"))
    arrays = {**segment._asdict(), "q_slot": q_slot, "starts": starts}
    expected.update(q_slot=((), "int"), starts=((batch,), "int"))
    for name, (shape, kind) in expected.items():
        array = arrays[name]
        if array is None and name == "v_scale":
            continue
        dtype = jnp.result_type(array)
        if tuple(jnp.shape(array)) != shape or (dtype != jnp.uint8 if kind == "uint8" else dtype.kind != kind[0]):
            raise ValueError(f"{name} must be {kind} of shape {shape} (q {q.shape}, bits {bits}, block {block}, "
                             f"group {group}), got {dtype} {tuple(jnp.shape(array))}")


@functools.partial(jax.jit, static_argnames=("bits", "block", "group", "sliding_window", "backend", "interpret",
                                             "blocks"))
def _segment_attention(q: jax.Array, segment: PackedSegment, q_slot: jax.Array, starts: jax.Array, *, bits: int,
                       block: int, group: int | None, sliding_window: int | None, backend: str, interpret,
                       blocks: Blocks) -> SoftmaxState:
    """`segment_attention`, its backend and interpret resolved and its inputs checked."""
    _, _, heads_per_kv, d = q.shape
    k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, slots = segment
    t = choose_tiling(backend, bits, d, group or d, block, k_codes.shape[2], heads_per_kv, v_scale is not None,
                      compiled=not interpret, tile=blocks.tile)
    loadable = lambda x: _loadable(x.astype(jnp.float16), backend)
    side = loadable(_token_side(v_step, v_min, slots, q_slot, starts, sliding_window))
    block_stats = [loadable(x) for x in (k_step, k_min, v_scale) if x is not None]  # [b, h, blocks, d]
    rows = ((0, 0), (0, 0), (0, t.rows - heads_per_kv), (0, 0))
    queries = jnp.pad(q.astype(jnp.float32) * d**-0.5, rows)  # [batch, kv_heads, rows, d]
    state = _run_kernel(t, queries, k_codes, v_codes, side, block_stats, (), interpret)
    return SoftmaxState(state.max[..., :heads_per_kv], state.denom[..., :heads_per_kv],
                        state.acc[..., :heads_per_kv, :])


def _run_kernel(t: Tiling, queries: jax.Array, k_codes: jax.Array, v_codes: jax.Array, side: jax.Array,
                block_stats: list[jax.Array], row_inputs: tuple[jax.Array, ...], interpret) -> SoftmaxState:
    """The pallas_call over a prepared segment: queries float32 [batch, kv_heads, t.rows, d] (scaled, padded), codes
    as the cache stores them, the side rows and per-block statistics as the kernel loads them, and with `per_row`
    the slots int32 [batch, kv_heads, 1, tokens] and the rows' bounds int32 [batch, t.rows, 1] (lowest, highest).
    Returns the states of all t.rows rows (padding included)."""
    batch, kv_heads, _, d = queries.shape
    k_view, v_view = (jnp.swapaxes(c, 2, 3) if t.channels_major else c for c in (k_codes, v_codes))
    inputs = [queries, k_view, v_view, side, *block_stats, *row_inputs]
    tile_state = lambda width: pl.BlockSpec((None, None, None, t.rows, width),
                                            lambda b, h, i: (b, h, 0 if t.accumulates else i, 0, 0))
    state = lambda width: jax.ShapeDtypeStruct((batch, kv_heads, t.states, t.rows, width), jnp.float32)
    m, total, acc = pl.pallas_call(
        functools.partial(_kernel, t=t),
        grid=(batch, kv_heads, t.tiles),
        in_specs=_in_specs(t, side.shape[2], len(block_stats)),
        scratch_shapes=_scratch(t, side.shape[2]),
        out_specs=[tile_state(1), tile_state(1), tile_state(d)],
        out_shape=[state(1), state(1), state(d)],
        compiler_params=_compiler_params(t),
        cost_estimate=_cost(t, batch, kv_heads, inputs),
        interpret=interpret,
        name="segment_attention",
    )(*inputs)
    return SoftmaxState(m[..., 0], total[..., 0], acc)


def segment_attention(q: jax.Array, segment: PackedSegment, q_slot: jax.Array, starts: jax.Array, *, bits: int,
                      block: int, group: int | None = None, sliding_window: int | None = None,
                      backend: str | None = None, interpret=None, blocks: Blocks | None = None) -> SoftmaxState:
    """Partial attention states of one decode query per sequence over a quantized segment.

    q: [batch, kv_heads, G, d] (the G query heads of each KV head); segment: the `PackedSegment` of `bits`-bit codes
    in blocks of `block` tokens, values in groups of `group` channels (None: the whole head); q_slot: int32 [];
    starts: int32 [batch]. backend: whose kernel ("tpu": Mosaic, "gpu": Triton); None is the platform being traced
    for (on "cpu" the TPU form, interpreted). interpret: None (True on "cpu", else False), True, or
    pltpu.InterpretParams(). blocks: a `Blocks` (None: `choose_tiling`'s tile). Returns the `SoftmaxState` max, denom
    float32 [batch, kv_heads, parts, G] and acc [batch, kv_heads, parts, G, d]: one state per KV head (TPU) or per
    tile of the segment (GPU), merged by `combine`.
    """
    with jax.named_scope("segment_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a quantized_attention.Blocks or None, got {blocks!r}")
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        check_inputs(q, segment, q_slot, starts, bits=bits, block=block, group=group, backend=backend)
        blocks = blocks or Blocks()
        if blocks.tile is not None:
            _check_tile(backend, blocks.tile, segment.k_codes.shape[2], not interpret)
        return _segment_attention(q, segment, q_slot, starts, bits=bits, block=block, group=group,
                                  sliding_window=sliding_window, backend=backend, interpret=interpret, blocks=blocks)


def dequantize_segment(segment: PackedSegment, *, bits: int, block: int, group: int | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """The segment's keys and values, float32 [batch, kv_heads, blocks * block, d] (reference only; it unpacks with
    the codec's `unpack`, independently of the kernel's in-register unpacking)."""
    k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, _ = segment
    k = unpack(k_codes, bits).astype(jnp.float32)
    d = k.shape[-1]
    per_token = lambda x: jnp.repeat(x.astype(jnp.float32), block, axis=2)  # [.., blocks, d] -> per token
    k = k * per_token(k_step) + per_token(k_min)
    v = unpack(v_codes, bits).astype(jnp.float32)
    channel_group = jnp.arange(d) // (group or d)
    v = v * v_step.astype(jnp.float32)[..., channel_group] + v_min.astype(jnp.float32)[..., channel_group]
    if v_scale is not None:
        v = v * per_token(v_scale)
    return k, v


def kernel_takes(tokens: int) -> bool:
    """Whether the kernel takes a segment of `tokens` tokens on the platform being traced for: Triton's dots need
    at least GPU_MIN_TILE; Mosaic's form (compiled or interpreted) takes any. Callers pick the reference otherwise."""
    return platform() != "gpu" or tokens >= GPU_MIN_TILE


def reference_state(q: jax.Array, segment: PackedSegment, q_slot: jax.Array, starts: jax.Array, *, bits: int,
                    block: int, group: int | None = None, sliding_window: int | None = None) -> SoftmaxState:
    """`segment_attention`'s result (one state per KV head) by dequantizing: for a segment the kernel does not take
    (`kernel_takes`). max, denom float32 [batch, kv_heads, 1, G]; acc [batch, kv_heads, 1, G, d]."""
    k, v = dequantize_segment(segment, bits=bits, block=block, group=group)  # [batch, kv_heads, n, d]
    visible = visible_slots(segment.slots, q_slot, starts[:, None, None], sliding_window)[:, :, None, :]
    scores = jnp.where(visible, grouped_scores(q[:, :, :, None].astype(jnp.float32), k)[:, :, :, 0], MASK_VALUE)
    top = scores.max(axis=-1)  # [batch, kv_heads, G]
    p = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
    acc = grouped_values(p[:, :, :, None], v)[:, :, :, 0]  # [batch, kv_heads, G, d]
    return SoftmaxState(top[:, :, None], p.sum(axis=-1)[:, :, None], acc[:, :, None])


def reference(q: jax.Array, segment: PackedSegment, q_slot: jax.Array, starts: jax.Array, *, bits: int, block: int,
              group: int | None = None, sliding_window: int | None = None) -> jax.Array:
    """Dequantize, then softmax attention: [batch, kv_heads, G, d] for a segment alone."""
    k, v = dequantize_segment(segment, bits=bits, block=block, group=group)
    visible = visible_slots(segment.slots, q_slot, starts[:, None, None], sliding_window)[:, :, None, None, :]
    probs = masked_softmax(grouped_scores(q[:, :, :, None].astype(jnp.float32), k), visible) * visible
    return grouped_values(probs, v)[:, :, :, 0]
