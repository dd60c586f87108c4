"""Grouped dequantize-matmul for ME-Switch: each row multiplies its own expert's low-bit delta, read packed.

Many fine-tuned experts share one base; expert e's delta weight of a linear is stored as integer codes [in, out]
(`minimum + step * code` per output channel), packed. A batch mixes experts row by row (`expert_ids`, -1 = base
only), and the delta term of row i is

    y[i] = (x[i] @ code_e) * step_e + sum(x[i]) * minimum_e,        e = expert_ids[i]

so step and minimum fold onto the output and no dequantized weight ever exists. The codes are the whole cost of
decode (memory-bound), so the kernel reads each expert's code tile once per tile of rows, never once per row, and
not at all for experts no row of the tile asks for.

Code layout. `planes` holds one uint8 array per bit plane, plane p of width w_p being [E, in * w_p / 8, out]: the
codes packed along `in` in the split-halves layout of `zipjax.kernels.common.pack` (with f = 8 / w codes per byte,
the in axis is cut into f equal parts and part j sits in bits [j * w, (j + 1) * w) of each byte). A code is the sum
of its planes, plane p shifted by the widths before it: 3-bit codes are widths (2, 1), code = plane0 + 4 * plane1.
With F = the most codes per byte of any plane (8 for 3-bit) and K = in / F, channel c = g * K + r (group g, row r)
lives in every plane at packed row (g mod F/f_p) * K + r, bits (g div F/f_p) * w_p. So one step of the kernel
reads, per plane, F/f_p tiles of `block_k` packed rows (the same rows r at offsets s * K), unpacks F code tiles
[block_k, block_n] with shifts and masks, and contracts each against the matching contiguous block of x columns
[g * K + r]. Nothing is gathered or concatenated in the kernel; x is never copied.

Two bodies share the wrapper, the unpacking and the contraction, because Mosaic (TPU) and Triton (GPU) want
different programs:

* TPU: grid (m tiles, out tiles, k tiles, expert slots), the last two a sequential reduction into the resident
  float32 output block. Per m-tile, the wrapper lists the experts its rows use (`present`, `count`) and
  scalar-prefetches the lists into SMEM; slot s of tile i is expert present[i, s]. Slots past the count do no
  work and their index maps repeat the previous step's block, so Pallas issues no DMA for them: an expert's code
  tile is read once per m-tile if a row of the tile uses it, and never otherwise (megablox-gmm's idea, without the
  sorting: prefill rows of one request are contiguous already, so a tile meets one or two experts; decode batches
  are one tile). The float16 step and minimum are widened to float32 [E, 2, out] by the wrapper (Mosaic cannot load
  float16; E * out * 8 bytes beside E * in * out * bits / 8 of codes).
* GPU: Triton keeps nothing across programs and has no scalar prefetch, so the loops are inside the kernel:
  grid (m tiles, out tiles, k splits); each program loops over the experts, skips (pl.when) those absent from its
  rows, and for the others loops over its share of the k tiles, loading code tiles with dynamic slices of the
  whole [E, rows, block_n] column of codes. Split-K keeps ~2 programs per SM when the batch is one tile (decode);
  a small jnp sum merges the float32 partials. Every loaded array is a power of two (rows padded to >= 16 for the
  MMA; m is padded to the tile, a copy of x only when m is not a multiple of it).

Tiles. TPU: block_m = m up to 512 rows (else 512, the last tile clipped by Mosaic: rows past m compute garbage
that is never written back), block_n a multiple of 128 dividing out (up to 2048), block_k a multiple of 128 packed
rows dividing K, block_k * block_n <= 2^18 (a float32 code tile of 1 MiB in VMEM). GPU: block_m 16..64, block_n
<= 128 and block_k <= 64, powers of two dividing out and K. Accumulation is float32 throughout: bfloat16 x meets
bfloat16 codes (exact small integers) with a float32 result; float32 x uses float32-exact dots (Mosaic's fp32
contraction, Triton's 3-pass TF32).

`reference` is the same math in plain jax.numpy (unpack every expert with `zipjax.kernels.common.unpack`, multiply
all of them, select per row); tests/test_pallas_delta.py checks the kernel against it in interpret mode (both
forms) and tests/test_aot_delta.py compiles it for TPU v5e and an H100. Imports: jax and the kernels' leaf only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from zipjax.kernels.common import resolve_backend, unpack

BACKENDS = ("tpu", "gpu")
PLANE_WIDTHS = (1, 2, 4, 8)
TPU_LANES = 128
TPU_MAX_ROWS = 512
TPU_TILE_ELEMENTS = 1 << 18  # block_k * block_n: one unpacked float32 code tile of 1 MiB
GPU_MIN_ROWS = 16  # Triton dots need at least 16 rows
GPU_MAX_ROWS = 64
GPU_BLOCK_N = 128
GPU_BLOCK_K = 64
GPU_PROGRAMS = 2 * 132  # split-K aims at ~2 programs per SM of an H100


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable tiles (jax's `BlockSizes`): `m` rows of x, `n` output columns and `k` packed rows of each
    plane per step, and on GPU `splits` programs along k; None takes `choose_tiling`'s choice (tests use small ones to
    make several tiles). What the compiler accepts is checked once the shapes are known."""

    m: int | None = None
    n: int | None = None
    k: int | None = None
    splits: int | None = None

    def __post_init__(self):
        for name in ("m", "n", "k", "splits"):
            size = getattr(self, name)
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"blocks.{name}: expected a positive int or None, got {size!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static geometry of one call."""

    backend: str
    widths: tuple[int, ...]
    m: int  # rows of x
    fan_in: int
    fan_out: int
    experts: int
    block_m: int
    block_n: int
    block_k: int  # packed rows of each plane tile (= x columns per group) per step
    splits: int  # GPU: programs along k per (m tile, out tile)
    precision: lax.Precision | lax.DotAlgorithmPreset | None

    @property
    def groups(self) -> int:
        """F: the most codes per byte of any plane; x's columns are F contiguous groups of K."""
        return max(8 // w for w in self.widths)

    @property
    def part(self) -> int:
        """K = in / F."""
        return self.fan_in // self.groups

    def subtiles(self, p: int) -> int:
        """Tiles of plane p per step: F / f_p (its rows are F / f_p blocks of K)."""
        return self.groups // (8 // self.widths[p])

    @property
    def m_tiles(self) -> int:
        return -(-self.m // self.block_m)

    @property
    def n_tiles(self) -> int:
        return self.fan_out // self.block_n

    @property
    def k_tiles(self) -> int:
        return self.part // self.block_k

    @property
    def experts_per_tile(self) -> int:
        """The most experts one m-tile can meet (one per row)."""
        return min(self.experts, self.block_m, self.m)


def _largest_divisor(n: int, candidates) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def fits(backend: str, widths: tuple[int, ...], fan_in: int, fan_out: int) -> bool:
    """Whether compiled tiles exist for a site of this shape (what `choose_tiling` would otherwise refuse)."""
    part = fan_in // max(8 // w for w in widths)
    if backend == "tpu":
        return part % TPU_LANES == 0
    return fan_out % 16 == 0 and part % 16 == 0


def choose_tiling(backend: str, widths: tuple[int, ...], m: int, fan_in: int, fan_out: int, experts: int, *,
                  blocks: Blocks | None = None, x_dtype=jnp.float32, compiled: bool = True) -> Tiling:
    """The tiles of the module docstring; explicit `blocks` override (tests use small ones to make several tiles).
    Compiled for TPU, K and out must be multiples of 128 (or out the whole width)."""
    blocks = blocks or Blocks()
    block_m, block_n, block_k, splits = blocks.m, blocks.n, blocks.k, blocks.splits
    groups = max(8 // w for w in widths)
    part = fan_in // groups
    bf16 = jnp.dtype(x_dtype) == jnp.bfloat16
    if backend == "tpu":
        bm = block_m or (m if m <= TPU_MAX_ROWS else TPU_MAX_ROWS)
        bn = block_n or _largest_divisor(fan_out, [2048, 1024, 512, 256, 128]) or fan_out
        bk = block_k or _largest_divisor(part, [c for c in (1024, 512, 256, 128) if c * bn <= TPU_TILE_ELEMENTS])
        if bk is None:
            if compiled:
                raise ValueError(f"in / {groups} = {part} must be a multiple of {TPU_LANES} for the TPU kernel "
                                 f"(in {fan_in}, widths {widths})")
            bk = part
        precision = None if bf16 else lax.Precision.HIGHEST
        return Tiling(backend, widths, m, fan_in, fan_out, experts, bm, bn, bk, 1, precision)
    bm = block_m or min(GPU_MAX_ROWS, max(GPU_MIN_ROWS, 1 << (m - 1).bit_length()))
    bn = block_n or _largest_divisor(fan_out, [GPU_BLOCK_N >> i for i in range(4)])
    bk = block_k or _largest_divisor(part, [GPU_BLOCK_K >> i for i in range(3)])
    if bn is None or bk is None:
        raise ValueError(f"the GPU kernel needs out ({fan_out}) and in / {groups} ({part}) to be multiples of 16")
    k_tiles = part // bk
    if splits is None:
        programs = -(-m // bm) * (fan_out // bn)
        target = max(1, GPU_PROGRAMS // programs)
        splits = max(s for s in range(1, k_tiles + 1) if k_tiles % s == 0 and s <= target)
    exact = lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if compiled else lax.Precision.HIGHEST
    precision = None if bf16 else exact
    return Tiling(backend, widths, m, fan_in, fan_out, experts, bm, bn, bk, splits, precision)


def _code_tiles(plane_tiles: list[list[jax.Array]], t: Tiling, dtype) -> list[jax.Array]:
    """The F code tiles [block_k, block_n] (as `dtype`) of one step, group g first: from each plane p, subtile
    g mod F/f_p, bits (g div F/f_p) * w_p, shifted by the widths before p. uint8 is widened to int32 before the
    shifts (Mosaic cannot shift uint8 vectors)."""
    wide = [[tile.astype(jnp.int32) for tile in tiles] for tiles in plane_tiles]
    codes = []
    for g in range(t.groups):
        code, offset = None, 0
        for p, w in enumerate(t.widths):
            part, sub = divmod(g, t.subtiles(p))
            piece = wide[p][sub]
            if w < 8:
                piece = (piece >> (part * w)) & ((1 << w) - 1) if part else piece & ((1 << w) - 1)
            if offset:
                piece = piece << offset
            code = piece if code is None else code | piece
            offset += w
        codes.append(code.astype(jnp.float32).astype(dtype))
    return codes


def _step(x_tiles: list[jax.Array], plane_tiles: list[list[jax.Array]], t: Tiling) -> tuple[jax.Array, jax.Array]:
    """One k step for one expert: sum_g x_g @ code_g, float32 [block_m, block_n], and the x tiles' row sums
    [block_m, 1] (which the minimum multiplies)."""
    dtype = x_tiles[0].dtype
    product = None
    for x, code in zip(x_tiles, _code_tiles(plane_tiles, t, dtype), strict=True):
        dot = jnp.dot(x, code, precision=t.precision, preferred_element_type=jnp.float32)
        product = dot if product is None else product + dot
    sums = sum(jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) for x in x_tiles)
    return product, sums


def _split_refs(refs, t: Tiling):
    """x refs (F), plane refs grouped per plane, then the rest."""
    x_refs, rest = refs[:t.groups], refs[t.groups:]
    planes = []
    for p in range(len(t.widths)):
        planes.append(rest[:t.subtiles(p)])
        rest = rest[t.subtiles(p):]
    return x_refs, planes, rest


def _tpu_kernel(present_ref, count_ref, ids_ref, *refs, t: Tiling):
    """One (m tile, out tile, k tile, expert slot). present_ref int32 [m_tiles * E], count_ref int32 [m_tiles]
    (SMEM); ids_ref int32 [block_m, 1]; x refs [block_m, block_k]; plane refs uint8 [block_k, block_n]; scale_ref
    float32 [2, block_n] (step, minimum); o_ref float32 [block_m, block_n], resident over k and slots."""
    x_refs, plane_refs, (scale_ref, o_ref) = _split_refs(refs, t)
    i, k, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when((k == 0) & (s == 0))
    def _start():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    @pl.when(s < count_ref[i])
    def _accumulate():
        expert = present_ref[i * t.experts + s]
        product, sums = _step([r[...] for r in x_refs], [[r[...] for r in refs] for refs in plane_refs], t)
        scales = scale_ref[...]  # [2, block_n]
        member = ids_ref[...] == expert  # [block_m, 1]
        o_ref[...] += jnp.where(member, product * scales[0:1] + sums * scales[1:2], 0.0)


def _tpu_call(x, ids, planes, scales, t: Tiling, interpret) -> jax.Array:
    # which experts each m-tile's rows use, those first (in id order), and how many
    rows = jnp.pad(ids, (0, t.m_tiles * t.block_m - t.m), constant_values=-1).reshape(t.m_tiles, t.block_m)
    hit = (rows[:, :, None] == jnp.arange(t.experts, dtype=jnp.int32)).any(axis=1)  # [m_tiles, E]
    count = hit.sum(axis=1).astype(jnp.int32)
    present = jnp.argsort(~hit, axis=1, stable=True).astype(jnp.int32).reshape(-1)

    def expert(i, s, present, count):
        return present[i * t.experts + jnp.minimum(s, jnp.maximum(count[i] - 1, 0))]

    def k_tile(i, k, count):
        return jnp.where(count[i] == 0, 0, k)  # a tile of base-only rows fetches one code tile per out tile

    x_specs = [pl.BlockSpec((t.block_m, t.block_k), lambda i, n, k, s, present, count, g=g: (i, g * t.k_tiles + k))
               for g in range(t.groups)]
    plane_specs = [pl.BlockSpec((None, t.block_k, t.block_n),
                                lambda i, n, k, s, present, count, sub=sub: (
                                    expert(i, s, present, count), sub * t.k_tiles + k_tile(i, k, count), n))
                   for p in range(len(t.widths)) for sub in range(t.subtiles(p))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(t.m_tiles, t.n_tiles, t.k_tiles, t.experts),
        in_specs=[pl.BlockSpec((t.block_m, 1), lambda i, n, k, s, present, count: (i, 0)), *x_specs, *plane_specs,
                  pl.BlockSpec((None, 2, t.block_n), lambda i, n, k, s, present, count: (
                      expert(i, s, present, count), 0, n))],
        out_specs=pl.BlockSpec((t.block_m, t.block_n), lambda i, n, k, s, present, count: (i, n)))
    x_views = [x] * t.groups
    plane_views = [plane for p, plane in enumerate(planes) for _ in range(t.subtiles(p))]
    return pl.pallas_call(
        functools.partial(_tpu_kernel, t=t),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((t.m, t.fan_out), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=48 << 20),
        cost_estimate=_cost(t, x.dtype.itemsize),
        interpret=interpret,
        name="delta_matmul",
    )(present, count, ids[:, None], *x_views, *plane_views, scales)


def _gpu_kernel(ids_ref, x_ref, *refs, t: Tiling):
    """One (m tile, out tile, k split). ids_ref int32 [block_m]; x_ref [block_m, in]; one ref per plane, uint8 [E,
    rows_p, block_n]; scale_ref float32 [E, 2, block_n]; o_ref float32 [block_m, block_n], this split's partial."""
    *plane_refs, scale_ref, o_ref = refs
    split = pl.program_id(2)
    per_split = t.k_tiles // t.splits
    ids = ids_ref[...]
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    def expert_pass(e, carry):
        member = ids == e  # [block_m]

        @pl.when(jnp.max(member.astype(jnp.int32)) > 0)
        def _accumulate():
            def k_step(k, state):
                row = pl.multiple_of((split * per_split + k) * t.block_k, t.block_k)
                xs = [x_ref[:, pl.ds(g * t.part + row, t.block_k)] for g in range(t.groups)]
                tiles = [[ref[e, pl.ds(sub * t.part + row, t.block_k), :] for sub in range(t.subtiles(p))]
                         for p, ref in enumerate(plane_refs)]
                product, sums = _step(xs, tiles, t)
                return state[0] + product, state[1] + sums

            zeros = (jnp.zeros((t.block_m, t.block_n), jnp.float32), jnp.zeros((t.block_m, 1), jnp.float32))
            product, sums = lax.fori_loop(0, per_split, k_step, zeros)
            step, minimum = scale_ref[e, 0, :], scale_ref[e, 1, :]  # [block_n]
            o_ref[...] += jnp.where(member[:, None], product * step[None, :] + sums * minimum[None, :], 0.0)

        return carry

    lax.fori_loop(0, t.experts, expert_pass, 0)


def _gpu_call(x, ids, planes, scales, t: Tiling, interpret) -> jax.Array:
    padded = t.m_tiles * t.block_m
    if padded != t.m:  # Triton loads are unmasked: whole tiles only
        x = jnp.pad(x, ((0, padded - t.m), (0, 0)))
        ids = jnp.pad(ids, (0, padded - t.m), constant_values=-1)
    whole_column = lambda plane: pl.BlockSpec((t.experts, plane.shape[1], t.block_n), lambda i, n, s: (0, 0, n))
    partials = pl.pallas_call(
        functools.partial(_gpu_kernel, t=t),
        grid=(t.m_tiles, t.n_tiles, t.splits),
        in_specs=[pl.BlockSpec((t.block_m,), lambda i, n, s: (i,)),
                  pl.BlockSpec((t.block_m, t.fan_in), lambda i, n, s: (i, 0)),
                  *[whole_column(plane) for plane in planes],
                  pl.BlockSpec((t.experts, 2, t.block_n), lambda i, n, s: (0, 0, n))],
        out_specs=pl.BlockSpec((None, t.block_m, t.block_n), lambda i, n, s: (s, i, n)),
        out_shape=jax.ShapeDtypeStruct((t.splits, padded, t.fan_out), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=_cost(t, x.dtype.itemsize),
        interpret=interpret,
        name="delta_matmul",
    )(ids, x, *planes, scales)
    return partials.sum(axis=0)[:t.m] if t.splits > 1 else partials[0, :t.m]


def _cost(t: Tiling, x_itemsize: int) -> pl.CostEstimate:
    """What the kernel does and moves from HBM, counting every m-tile as meeting min(E, block_m) experts (exact for
    decode, where a batch is one tile of E or more rows; an upper bound for prefill, whose tiles meet one or two):
    per tile and expert, the contraction of all block_m rows and one read of the expert's codes and float32
    scales; x once per out tile on TPU (its tiles are DMA'd again for each), once on GPU (programs re-read their
    rows for every expert and out tile, m * in bytes that stay in L2); the float32 output (GPU: one partial per
    split)."""
    visits = t.m_tiles * t.experts_per_tile
    per_expert = t.fan_in * sum(t.widths) // 8 * t.fan_out + 2 * 4 * t.fan_out
    rows = t.m if t.backend == "tpu" else t.m_tiles * t.block_m
    x_bytes = rows * t.fan_in * x_itemsize * (t.n_tiles if t.backend == "tpu" else 1)
    written = t.splits * rows * t.fan_out * 4
    return pl.CostEstimate(flops=2 * visits * t.block_m * t.fan_in * t.fan_out, transcendentals=0,
                           bytes_accessed=visits * per_expert + x_bytes + 4 * rows + written)


def cost_estimate(x, planes, step, *, widths: tuple[int, ...], backend: str, blocks: Blocks | None = None
                  ) -> pl.CostEstimate:
    """The CostEstimate `delta_matmul` gives the compiler for these arguments (abstract ones will do; `blocks` as
    delta_matmul's). Triton's custom call does not carry it into the compiled HLO, so this says it."""
    m, fan_in = x.shape
    experts, fan_out = step.shape
    t = choose_tiling(backend, tuple(widths), m, fan_in, fan_out, experts, blocks=blocks, x_dtype=x.dtype)
    return _cost(t, 2 if x.dtype == jnp.bfloat16 else 4)


def check_inputs(x, expert_ids, planes, step, minimum, widths) -> None:
    """ValueError naming the argument and its shape unless the arguments are what `delta_matmul` reads."""
    widths = tuple(widths)
    if not widths or any(w not in PLANE_WIDTHS for w in widths) or sum(widths) > 8:
        raise ValueError(f"widths must be plane widths from {PLANE_WIDTHS} summing to at most 8, got {widths}")
    if jnp.ndim(x) != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x must be float [m, in], got {jnp.result_type(x)} {jnp.shape(x)}")
    m, fan_in = jnp.shape(x)
    groups = max(8 // w for w in widths)
    if fan_in % groups:
        raise ValueError(f"in ({fan_in}, x {jnp.shape(x)}) must be a multiple of {groups} for widths {widths}")
    if len(planes) != len(widths):
        raise ValueError(f"{len(widths)} planes expected for widths {widths}, got {len(planes)}")
    if jnp.ndim(step) != 2:
        raise ValueError(f"step must be [E, out], got shape {jnp.shape(step)}")
    experts, fan_out = jnp.shape(step)
    for p, (plane, w) in enumerate(zip(planes, widths, strict=True)):
        shape = (experts, fan_in * w // 8, fan_out)
        if tuple(jnp.shape(plane)) != shape or jnp.result_type(plane) != jnp.uint8:
            raise ValueError(f"planes[{p}] ({w}-bit) must be uint8 {shape}, got {jnp.result_type(plane)} "
                             f"{tuple(jnp.shape(plane))}")
    if tuple(jnp.shape(minimum)) != (experts, fan_out) or not jnp.issubdtype(jnp.result_type(minimum), jnp.floating):
        raise ValueError(f"minimum must be float {(experts, fan_out)} like step, got {jnp.shape(minimum)}")
    if tuple(jnp.shape(expert_ids)) != (m,) or not jnp.issubdtype(jnp.result_type(expert_ids), jnp.integer):
        raise ValueError(f"expert_ids must be int [{m}], got {jnp.result_type(expert_ids)} {jnp.shape(expert_ids)}")


@functools.partial(jax.jit, static_argnames=("widths", "backend", "interpret", "blocks"))
def _delta_matmul(x, expert_ids, planes, step, minimum, *, widths, backend, interpret, blocks: Blocks) -> jax.Array:
    m, fan_in = x.shape
    experts, fan_out = step.shape
    t = choose_tiling(backend, widths, m, fan_in, fan_out, experts, blocks=blocks, x_dtype=x.dtype,
                      compiled=not interpret)
    if x.dtype != jnp.bfloat16:
        x = x.astype(jnp.float32)
    ids = expert_ids.astype(jnp.int32)
    scales = jnp.stack([step, minimum], axis=1).astype(jnp.float32)  # [E, 2, out]
    call = _tpu_call if backend == "tpu" else _gpu_call
    return call(x, ids, list(planes), scales, t, interpret)


def delta_matmul(x: jax.Array, expert_ids: jax.Array, planes: tuple[jax.Array, ...], step: jax.Array,
                 minimum: jax.Array, *, widths: tuple[int, ...], backend: str | None = None, interpret=None,
                 blocks: Blocks | None = None) -> jax.Array:
    """The delta term of every row against its own expert's packed codes, float32 [m, out].

    x: float32 or bfloat16 [m, in]; expert_ids: int [m] (a row whose id is outside [0, E), e.g. -1 for base only,
    gets zeros); planes: uint8 [E, in * widths[p] / 8, out] each (module docstring); step, minimum: float [E, out].
    backend: "tpu" (Mosaic's form) or "gpu" (Triton's); by default the platform being traced for
    (`zipjax.kernels.common.platform()`, which zipjax.aot sets while compiling ahead of time), and on "cpu", where
    Pallas only interprets, the TPU form interpreted (`zipjax.kernels.common.resolve_backend`). interpret: None (True
    on "cpu", else False), True or pltpu.InterpretParams() to run on the CPU. blocks: a `Blocks` overriding the
    tiling (module docstring).
    """
    with jax.named_scope("delta_matmul"):
        widths = tuple(widths)
        planes = tuple(planes)
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a delta_matmul.Blocks or None, got {blocks!r}")
        check_inputs(x, expert_ids, planes, step, minimum, widths)
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        return _delta_matmul(x, expert_ids, planes, step, minimum, widths=widths, backend=backend,
                             interpret=interpret, blocks=blocks or Blocks())


def codes(planes: tuple[jax.Array, ...], widths: tuple[int, ...]) -> jax.Array:
    """The integer codes, int32 [E, in, out], of packed planes (each unpacked with the codec's `unpack` along in)."""
    total, offset = None, 0
    for plane, w in zip(planes, widths, strict=True):
        code = jnp.swapaxes(unpack(jnp.swapaxes(plane, 1, 2), w), 1, 2).astype(jnp.int32) << offset
        total = code if total is None else total + code
        offset += w
    return total


@functools.partial(jax.jit, static_argnames=("widths",))
def reference(x, expert_ids, planes, step, minimum, *, widths) -> jax.Array:
    """`delta_matmul` in plain jax.numpy, float32 [m, out]: every expert's product, then each row's own."""
    code = codes(tuple(planes), tuple(widths)).astype(jnp.float32)  # [E, in, out]
    x = x.astype(jnp.float32)
    every = jnp.einsum("mi,eio->meo", x, code, precision=lax.Precision.HIGHEST)  # [m, E, out]
    every = every * step.astype(jnp.float32) + jnp.sum(x, axis=1)[:, None, None] * minimum.astype(jnp.float32)
    experts = step.shape[0]
    valid = (expert_ids >= 0) & (expert_ids < experts)
    own = jnp.take_along_axis(every, jnp.clip(expert_ids, 0, experts - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where(valid[:, None], own, 0.0)
