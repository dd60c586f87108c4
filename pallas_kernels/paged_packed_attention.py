"""Decode attention over packed quantized KV pages read through a page table: the serving engine's compressed pool
(zipjax.serve.packed), without a dequantized copy of any page in memory.

A packed pool holds, per layer, one subset per precision (ZipCache: salient tokens at 4 bits and the rest at 2 bits
in the same page; KIVI and uniform: one subset), each [pages, kv_heads, n_s, ...] with the page as batch axis
(`PagedSubset`): packed key and value codes, each token's slot within its page, key statistics channel-wise per page
(ZipCache) or per run of `key_block` tokens (KIVI), or token-wise per group of channels (uniform), token-wise value
statistics per group, and for CST values (ZipCache) a channel scale per page and KV head. A sequence's packed pages
are the logical pages 0 .. count - 1 of its table; a key's position is logical page * page_size + slot (the ranking
orders tokens differently per KV head), and a query at position p sees it iff position <= p (and p - position <
sliding_window); a query at -1 is padding and sees nothing.

One program per (sequence, KV head, split) walks the sequence's pages; the rows of a program are the queries of the
sequence times the G query heads of the KV head (row q * G + g), so every page's codes are read once for all of them.
The scales never touch the pool: channel-wise keys fold the page's step into the query and its min into a bias
(q . k = (q * step) . code + q . min), token-wise keys scale the plane's partial scores by the token's step and add
its min times the query's sum over the group, and values apply the token's step to its probability, the page's CST
scale to the output columns. Codes are unpacked in registers plane by plane (`zipjax.kernels.common.pack`'s
split-halves layout), as in zipjax.kernels.quantized_attention.

TPU (Mosaic): the page table and the packed-page counts are scalar-prefetched; the grid is (sequence, KV head,
split, table slot) with the slot axis sequential, and each block's index map reads the page id from the table (a
slot past the count repeats the last page, so nothing is copied for it, and its program does nothing). Codes and the
per-token statistics are read with tokens on lanes (the convention of quantized_attention for narrow uint8 rows);
float16 statistics arrive as their uint16 bits and are decoded into float32 VMEM scratch (Mosaic loads no float16).
The slots of a page are read for all KV heads ([kv_heads, n] uint8, the pool's own layout) and the program's row
selected in registers. Known cost: XLA lays a pool array such as uint8 [pages, kv_heads, 39, 64] out page-minor on
a TPU (its default for narrow rows, which avoids padding), and Mosaic reads row-major tiles, so a call relayouts
the pool it reads (tests/test_pallas_paged.py prints the temporaries; the serving step copies every layer's codes),
and zipjax.serve.packed runs this form only when asked (kernel=True) until a lane-dense page format removes that.
GPU (Triton): no scalar prefetch; one program per (sequence, KV head, split) walks its table slots up to the count
in a loop, loading each page's rows by pointer from flat views of the pool (free reshapes), the subset's tokens
rounded up to a power of two (ZipCache's 64-token page splits 39 / 25) and masked past its size; the state
accumulates in the output block. Only the pages a table names are read: the H100 compile plans no pool copy.

Entry point `paged_packed_attention(q, subsets, v_scale, table, count, positions, *, ..., backend=None,
interpret=None, blocks=None)` returns (out float32 [n, qn, heads, d], lse float32 [n, qn, heads]): a row that sees
nothing has out 0 and lse MASK_VALUE, and merges with the dense tail by log-sum-exp. Its jnp reference is
zipjax.serve.packed's `packed_state` (tests/test_pallas_paged.py: both forms interpreted, and compiled ahead of time
for a v5e and an H100). Imports: jax and the kernels' package only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from zipjax.kernels.common import MASK_VALUE, TINY, group_queries, resolve_backend, ungroup
from zipjax.kernels.quantized_attention import decode_float16_bits

BITS = (2, 4, 8)
BACKENDS = ("tpu", "gpu")
TPU_LANES = 128
GPU_ROW_BLOCK = 32  # query rows per Triton program at most (a prefill block's 64 queries x G would overflow SRAM)


class PagedSubset(NamedTuple):
    """One precision's subset of a packed page pool, the page as batch axis: k_codes, v_codes uint8 [pages,
    kv_heads, n, d * bits / 8]; slots uint8 / int16 [pages, kv_heads, n] (offset in the page); k_step, k_min float16
    [pages, kv_heads, runs, d] (channel-wise keys) or [pages, kv_heads, n, groups] (token-wise); v_step, v_min
    float16 [pages, kv_heads, n, groups]. The fields and order of zipjax.kv.codec's `Store`."""

    k_codes: jax.Array
    v_codes: jax.Array
    slots: jax.Array
    k_step: jax.Array
    k_min: jax.Array
    v_step: jax.Array
    v_min: jax.Array


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable block: `splits` programs share one sequence's page table (each folds a contiguous part
    of it into its own state; the states merge by log-sum-exp), for parallelism when sequences x KV heads are few.
    None: 1."""

    splits: int | None = None

    def __post_init__(self):
        if self.splits is not None and (not isinstance(self.splits, int) or isinstance(self.splits, bool)
                                        or self.splits < 1):
            raise ValueError(f"blocks.splits: expected a positive int or None, got {self.splits!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static plan of one pallas_call."""

    backend: str
    bits: tuple[int, ...]  # per subset
    sizes: tuple[int, ...]  # tokens per subset per page
    head_dim: int
    kv_heads: int
    rows: int  # query rows per program: queries x G (GPU: padded to a power of two)
    key_mode: str  # "channel" or "token"
    key_block: int | None  # channel-wise keys: tokens per statistic run (None: the whole subset)
    group: int  # channels per token-wise group
    cst: bool
    sliding_window: int | None
    splits: int
    slots_per_split: int  # table slots each split walks
    row_blocks: int = 1  # programs sharing a sequence's query rows (GPU), t.rows each

    @property
    def page_size(self) -> int:
        return sum(self.sizes)

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    def width(self, s: int) -> int:
        return self.head_dim * self.bits[s] // 8

    def planes(self, s: int) -> int:
        return 8 // self.bits[s]

    def runs(self, s: int) -> int:
        if self.key_mode != "channel" or not self.key_block:
            return 1
        return -(-self.sizes[s] // self.key_block)

    def channels_major(self, s: int) -> bool:
        """Codes read [width, n] (tokens on lanes, TPU) when a code row is narrower than a lane tile."""
        return self.backend == "tpu" and self.width(s) < TPU_LANES

    def lanes(self, s: int) -> int:
        """Tokens of subset s a program holds per page: its size (TPU), rounded up to a power of two (Triton)."""
        n = self.sizes[s]
        return n if self.backend == "tpu" else 1 << (n - 1).bit_length()

    def plane_groups(self, s: int, j: int) -> range:
        """The token-wise groups whose channels meet plane j's channels [j * width, (j + 1) * width)."""
        w = self.width(s)
        return range(j * w // self.group, ((j + 1) * w - 1) // self.group + 1)

    @property
    def per_subset(self) -> int:
        """Inputs per subset: codes (2), slots, key step / min, value step / min."""
        return 7


def check_inputs(q, subsets, v_scale, table, count, positions, *, bits, page_size: int, key_mode: str,
                 key_block: int | None, group: int | None, backend: str) -> None:
    """ValueError naming the argument and its shape unless the pool, table and queries fit together."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if key_mode not in ("channel", "token"):
        raise ValueError(f"key_mode must be 'channel' or 'token', got {key_mode!r}")
    if jnp.ndim(q) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(f"q must be float [n, queries, heads, head_dim], got {jnp.result_type(q)} {jnp.shape(q)}")
    n, queries, heads, d = q.shape
    if len(subsets) != len(bits) or not subsets or any(not isinstance(s, PagedSubset) for s in subsets):
        raise ValueError(f"subsets: expected {len(bits)} PagedSubset (one per bits {bits}), got {len(subsets)}")
    pages, kv_heads = subsets[0].k_codes.shape[:2]
    g = group or d
    if heads % kv_heads or d % g:
        raise ValueError(f"q's {heads} heads / head_dim {d} must be multiples of the pool's {kv_heads} KV heads "
                         f"/ group {g}")
    if sum(s.k_codes.shape[2] for s in subsets) != page_size:
        raise ValueError(f"subset sizes {[s.k_codes.shape[2] for s in subsets]} must sum to page_size {page_size}")
    for index, (subset, b) in enumerate(zip(subsets, bits, strict=True)):
        if b not in BITS:
            raise ValueError(f"bits must be in {BITS}, got {bits}")
        size = subset.k_codes.shape[2]
        runs = -(-size // key_block) if key_mode == "channel" and key_block else 1
        key_stats = (pages, kv_heads, runs, d) if key_mode == "channel" else (pages, kv_heads, size, d // g)
        codes = (pages, kv_heads, size, d * b // 8)
        expected = dict(k_codes=codes, v_codes=codes, slots=codes[:3], k_step=key_stats, k_min=key_stats,
                        v_step=(*codes[:3], d // g), v_min=(*codes[:3], d // g))
        for name, shape in expected.items():
            if tuple(getattr(subset, name).shape) != shape:
                raise ValueError(f"subsets[{index}].{name} must have shape {shape} (bits {b}, q {q.shape}), got "
                                 f"{tuple(getattr(subset, name).shape)}")
    if v_scale is not None and tuple(v_scale.shape) != (pages, kv_heads, 1, d):
        raise ValueError(f"v_scale must have shape {(pages, kv_heads, 1, d)}, got {tuple(v_scale.shape)}")
    for name, array, shape in (("table", table, (n, None)), ("count", count, (n,)),
                               ("positions", positions, (n, queries))):
        dtype = jnp.result_type(array)
        if dtype.kind not in "iu" or jnp.ndim(array) != len(shape) or any(
                want is not None and got != want for got, want in zip(jnp.shape(array), shape, strict=True)):
            raise ValueError(f"{name} must be int of shape {shape} (None: any), got {dtype} {tuple(jnp.shape(array))}")


def _planes(codes: jax.Array, bits: int) -> list[jax.Array]:
    """The code planes of a loaded uint8 tile as float32 (widened to int32 before the shifts: Mosaic cannot shift
    uint8 vectors)."""
    wide = codes.astype(jnp.int32)
    if bits == 8:
        return [wide.astype(jnp.float32)]
    mask = (1 << bits) - 1
    return [((wide >> (j * bits)) & mask).astype(jnp.float32) for j in range(8 // bits)]


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """a [m, k] against b ([k, n] with contract_b 0, [n, k] with 1), float32-exact."""
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _subset_scores(q_ref, planes, stats, s: int, t: Tiling) -> jax.Array:
    """float32 [rows, n]: q . k of every token of subset s of the page (queries already scaled by d^-0.5)."""
    ks, km = stats[0], stats[1]
    n, w, major = t.lanes(s), t.width(s), t.channels_major(s)
    scores = jnp.zeros((t.rows, n), jnp.float32)
    if t.key_mode == "channel":
        token = lax.broadcasted_iota(jnp.int32, (1, n), 1)
        for r in range(t.runs(s)):
            run = jnp.zeros((t.rows, 1), jnp.float32)
            for j, plane in enumerate(planes):
                q = q_ref[:, pl.ds(j * w, w)]  # [rows, width]
                step, minimum = ks[pl.ds(r, 1), pl.ds(j * w, w)], km[pl.ds(r, 1), pl.ds(j * w, w)]
                run = run + _dot(q * step, plane, 0 if major else 1) + jnp.sum(q * minimum, axis=1, keepdims=True)
            if t.runs(s) == 1:
                return run
            scores = jnp.where((token >= r * t.key_block) & (token < (r + 1) * t.key_block), run, scores)
        return scores
    for j, plane in enumerate(planes):
        q = q_ref[:, pl.ds(j * w, w)]
        column = j * w + lax.broadcasted_iota(jnp.int32, (1, w), 1)
        for g in t.plane_groups(s, j):
            q_g = jnp.where((column >= g * t.group) & (column < (g + 1) * t.group), q, 0.0)
            partial = _dot(q_g, plane, 0 if major else 1)  # [rows, n]
            scores = scores + partial * ks[pl.ds(g, 1), :] + jnp.sum(q_g, axis=1, keepdims=True) * km[pl.ds(g, 1), :]
    return scores


def _subset_values(acc_ref, planes, p, stats, scale_ref, s: int, t: Tiling) -> None:
    """Add sum over the page's subset-s tokens of p * v to acc_ref [rows, d], plane by plane."""
    vs, vm = stats[2], stats[3]
    w, major = t.width(s), t.channels_major(s)
    for j, plane in enumerate(planes):
        column = j * w + lax.broadcasted_iota(jnp.int32, (1, w), 1)
        part = jnp.zeros((t.rows, w), jnp.float32)
        for g in t.plane_groups(s, j):
            step, minimum = vs[pl.ds(g, 1), :], vm[pl.ds(g, 1), :]  # [1, n]
            sums = _dot(p * step, plane, 1 if major else 0) + jnp.sum(p * minimum, axis=1, keepdims=True)
            if not (g * t.group <= j * w and (j + 1) * w <= (g + 1) * t.group):
                sums = jnp.where((column >= g * t.group) & (column < (g + 1) * t.group), sums, 0.0)
            part = part + sums
        if t.cst:
            part = part * scale_ref[pl.ds(0, 1), pl.ds(j * w, w)]
        acc_ref[:, pl.ds(j * w, w)] += part


def _decode_stats(refs, scratch, t: Tiling):
    """Each subset's (key step, key min, value step, value min) and the CST scale, decoded from float16 bits into
    float32 VMEM (single rows of a uint16 ref do not lower in Mosaic); returns the scratch refs."""
    stats, at = [], 0
    for s in range(len(t.sizes)):
        subset = refs[s * t.per_subset + 3:(s + 1) * t.per_subset]
        for source, target in zip(subset, scratch[at:at + 4], strict=True):
            target[...] = decode_float16_bits(source[...].astype(jnp.int32))
        stats.append(scratch[at:at + 4])
        at += 4
    scale = None
    if t.cst:
        scale = scratch[at]
        scale[...] = decode_float16_bits(refs[len(t.sizes) * t.per_subset][...].astype(jnp.int32))
    return stats, scale


class _Page(NamedTuple):
    """What `_fold_page` reads of one subset of a page: the loaded codes (uint8, [width, n] or [n, width]), each
    token's slot [1, n] int32, and the statistics as refs (or `_Rows` readers) indexed [rows, columns]."""

    k_codes: jax.Array
    v_codes: jax.Array
    slot_row: jax.Array
    stats: tuple


def _fold_page(q_ref, row_pos, logical, pages: list[_Page], scale_ref, m_ref, l_ref, acc_ref, t: Tiling) -> None:
    """Fold one page (every subset) into the state refs m, l [rows, 1] and acc [rows, d]: the online-softmax step of
    zipjax.kernels.common written out, acc updated plane by plane in column slices."""
    scores, visible = [], []
    for s, page in enumerate(pages):
        delta = row_pos - (logical * t.page_size + page.slot_row)  # [rows, n]
        seen = delta >= 0
        if t.sliding_window is not None:
            seen &= delta < t.sliding_window
        visible.append(seen)
        scores.append(jnp.where(seen, _subset_scores(q_ref, _planes(page.k_codes, t.bits[s]), page.stats, s, t),
                                MASK_VALUE))
    m_old = m_ref[...]
    m = functools.reduce(jnp.maximum, [x.max(axis=1, keepdims=True) for x in scores], m_old)
    rescale = jnp.exp(m_old - m)
    acc_ref[...] = rescale * acc_ref[...]
    total = rescale * l_ref[...]
    for s, (x, seen) in enumerate(zip(scores, visible, strict=True)):
        p = jnp.where(seen, jnp.exp(x - m), 0.0)
        total = total + p.sum(axis=1, keepdims=True)
        _subset_values(acc_ref, _planes(pages[s].v_codes, t.bits[s]), p, pages[s].stats, scale_ref, s, t)
    l_ref[...] = total
    m_ref[...] = m


def _start_state(m_ref, l_ref, acc_ref, t: Tiling) -> None:
    m_ref[...] = jnp.full((t.rows, 1), MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros((t.rows, 1), jnp.float32)
    acc_ref[...] = jnp.zeros((t.rows, t.head_dim), jnp.float32)


def _tpu_kernel(table_ref, count_ref, q_ref, pos_ref, *refs, t: Tiling):
    """One (sequence, KV head, split, table slot). q_ref [rows, d] float32 (scaled); pos_ref [rows, 1] int32; per
    subset the page's codes, slots [kv_heads, n], statistics; the CST scale [1, d]; then the state m, l [rows, 1]
    and acc [rows, d] (resident over the sequential slot axis); then the float32 scratch of `_decode_stats`."""
    del table_ref
    inputs = len(t.sizes) * t.per_subset + (1 if t.cst else 0)
    m_ref, l_ref, acc_ref = refs[inputs:inputs + 3]
    b, h, split, slot = (pl.program_id(i) for i in range(4))
    logical = split * t.slots_per_split + slot

    @pl.when(slot == 0)
    def _start():
        _start_state(m_ref, l_ref, acc_ref, t)

    @pl.when(logical < count_ref[b])
    def _page():
        stats, scale_ref = _decode_stats(refs, refs[inputs + 3:], t)
        pages = []
        for s in range(len(t.sizes)):
            kc, vc, slots_ref = refs[s * t.per_subset:s * t.per_subset + 3]
            head = lax.broadcasted_iota(jnp.int32, (t.kv_heads, t.sizes[s]), 0) == h
            slot_row = jnp.sum(jnp.where(head, slots_ref[...].astype(jnp.int32), 0), axis=0, keepdims=True)
            pages.append(_Page(kc[...], vc[...], slot_row, stats[s]))
        _fold_page(q_ref, pos_ref[...], logical, pages, scale_ref, m_ref, l_ref, acc_ref, t)


class _Rows:
    """GPU: a [pages * kv_heads * rows_per, columns] view of a statistic read as the kernel indexes a per-page
    block, `reader[pl.ds(row, 1), columns]`: rows of (page, KV head) `first` onward (`token_rows`: a column of the
    page's `tokens` tokens, masked past `valid`, returned as a row [1, tokens]). float32."""

    def __init__(self, ref, first, token_rows: bool = False, tokens: int = 0, valid: int = 0):
        self.ref, self.first, self.token_rows, self.tokens, self.valid = ref, first, token_rows, tokens, valid

    def __getitem__(self, index):
        rows, columns = index
        if not self.token_rows:
            return self.ref[pl.ds(self.first + rows.start, rows.size), columns].astype(jnp.float32)
        mask = (lax.broadcasted_iota(jnp.int32, (self.tokens, 1), 0) < self.valid)
        column = plt.load(self.ref.at[pl.ds(self.first, self.tokens), pl.ds(rows.start, 1)], mask=mask, other=0)
        return column.astype(jnp.float32).reshape(1, self.tokens)


def _gpu_kernel(table_ref, count_ref, q_ref, pos_ref, *refs, t: Tiling):
    """One (sequence, KV head, split): its table slots walked in a loop, each page's tokens loaded (masked past the
    subset's size, rounded up to a power of two for Triton) from the flat pool views of `_gpu_views`; the state is
    accumulated in the output refs m, l [rows, 1], acc [rows, d]."""
    inputs = len(t.sizes) * t.per_subset + (1 if t.cst else 0)
    m_ref, l_ref, acc_ref = refs[inputs:inputs + 3]
    b, h, split = pl.program_id(0) // t.row_blocks, pl.program_id(1), pl.program_id(2)
    _start_state(m_ref, l_ref, acc_ref, t)
    first = split * t.slots_per_split
    last = jnp.minimum(count_ref[b], first + t.slots_per_split)

    def body(logical, carry):
        page = table_ref[b, logical]
        pages = []
        for s in range(len(t.sizes)):
            kc, vc, slots_ref, ks, km, vs, vm = refs[s * t.per_subset:(s + 1) * t.per_subset]
            n, lanes, base = t.sizes[s], t.lanes(s), (page * t.kv_heads + h) * t.sizes[s]
            token = lax.broadcasted_iota(jnp.int32, (lanes, 1), 0)
            codes = lambda ref, base=base, n=n, lanes=lanes, token=token, s=s: plt.load(
                ref.at[pl.ds(base, lanes), :], mask=jnp.broadcast_to(token < n, (lanes, t.width(s))), other=0)
            slots = plt.load(slots_ref.at[pl.ds(base, lanes)], mask=token[:, 0] < n, other=0).astype(jnp.int32)
            slot_row = jnp.where(token[:, 0] < n, slots, 1 << 29).reshape(1, lanes)  # padding: past every query
            runs = t.runs(s) if t.key_mode == "channel" else 0
            key = [_Rows(x, (page * t.kv_heads + h) * runs) if runs else _Rows(x, base, True, lanes, n)
                   for x in (ks, km)]
            stats = (*key, *(_Rows(x, base, True, lanes, n) for x in (vs, vm)))
            pages.append(_Page(codes(kc), codes(vc), slot_row, stats))
        scale = _Rows(refs[inputs - 1], page * t.kv_heads + h) if t.cst else None
        _fold_page(q_ref, pos_ref[...], logical, pages, scale, m_ref, l_ref, acc_ref, t)
        return carry

    lax.fori_loop(first, last, body, 0)


def _specs(t: Tiling, subsets: tuple[PagedSubset, ...]) -> tuple[list, list, list]:
    """In specs, out specs and scratch of the TPU form; the index maps read the page id from the prefetched table
    (a slot at or past the count repeats the last page: no copy, and its program does nothing)."""
    def page(b, split, slot, table, count):
        logical = split * t.slots_per_split + slot
        return table[b, jnp.clip(logical, 0, jnp.maximum(count[b] - 1, 0))]

    per_head = lambda *shape: pl.BlockSpec((None, None, *shape),
                                           lambda b, h, s, j, table, count: (page(b, s, j, table, count), h, 0, 0))
    all_heads = lambda n: pl.BlockSpec((None, t.kv_heads, n),
                                       lambda b, h, s, j, table, count: (page(b, s, j, table, count), 0, 0))
    specs = [pl.BlockSpec((None, None, t.rows, t.head_dim), lambda b, h, s, j, *_: (b, h, 0, 0)),
             pl.BlockSpec((None, t.rows, 1), lambda b, h, s, j, *_: (b, 0, 0))]
    scratch = []
    for s, subset in enumerate(subsets):
        n, w = t.sizes[s], t.width(s)
        codes = per_head(w, n) if t.channels_major(s) else per_head(n, w)
        key_rows = subset.k_step.shape[2] if t.key_mode == "channel" else t.groups
        key = per_head(key_rows, t.head_dim) if t.key_mode == "channel" else per_head(t.groups, n)
        specs += [codes, codes, all_heads(n), key, key, per_head(t.groups, n), per_head(t.groups, n)]
        key_shape = (key_rows, t.head_dim) if t.key_mode == "channel" else (t.groups, n)
        scratch += [pltpu.VMEM(key_shape, jnp.float32)] * 2 + [pltpu.VMEM((t.groups, n), jnp.float32)] * 2
    if t.cst:
        specs.append(per_head(1, t.head_dim))
        scratch.append(pltpu.VMEM((1, t.head_dim), jnp.float32))
    state = lambda width: pl.BlockSpec((None, None, None, t.rows, width), lambda b, h, s, j, *_: (b, h, s, 0, 0))
    return specs, [state(1), state(1), state(t.head_dim)], scratch


def _views(t: Tiling, subsets: tuple[PagedSubset, ...], v_scale: jax.Array | None) -> list[jax.Array]:
    """The pool as the kernel reads it: narrow codes and per-token statistics with tokens minor (bitcasts of XLA's
    default layout), float16 as uint16 bits."""
    bits16 = lambda x: lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16)
    tokens_minor = lambda x: jnp.swapaxes(x, 2, 3)
    views = []
    for s, subset in enumerate(subsets):
        codes = (tokens_minor if t.channels_major(s) else (lambda x: x))
        key = (lambda x: x) if t.key_mode == "channel" else tokens_minor
        views += [codes(subset.k_codes), codes(subset.v_codes), subset.slots, bits16(key(subset.k_step)),
                  bits16(key(subset.k_min)), bits16(tokens_minor(subset.v_step)), bits16(tokens_minor(subset.v_min))]
    if t.cst:
        views.append(bits16(v_scale))
    return views


def _cost(t: Tiling, n: int, slots: int) -> pl.CostEstimate:
    """The contractions and reads of every page the table can name (an upper bound: slots past a count do nothing)."""
    programs = n * t.row_blocks * t.kv_heads * t.splits * slots
    flops = sum(2 * t.rows * size * t.head_dim * 2 * (t.runs(s) if t.key_mode == "channel" else t.groups)
                for s, size in enumerate(t.sizes)) * programs
    per_page = sum(size * (2 * t.width(s) + 1 + 4 * t.groups) for s, size in enumerate(t.sizes)) + 4 * t.head_dim
    return pl.CostEstimate(flops=flops, transcendentals=programs * t.rows * t.page_size,
                           bytes_accessed=programs * per_page + n * t.kv_heads * t.rows * (t.head_dim + 2) * 8)


@functools.partial(jax.jit, static_argnames=("bits", "page_size", "key_mode", "key_block", "group",
                                             "sliding_window", "backend", "interpret", "blocks"))
def _paged_packed_attention(q, subsets, v_scale, table, count, positions, *, bits, page_size, key_mode, key_block,
                            group, sliding_window, backend, interpret, blocks: Blocks):
    """`paged_packed_attention`, its backend and interpret resolved and its inputs checked."""
    n, queries, heads, d = q.shape
    kv_heads = subsets[0].k_codes.shape[1]
    used = queries * heads // kv_heads
    splits = min(blocks.splits or 1, table.shape[1])
    per_split = -(-table.shape[1] // splits)
    rows, row_blocks = used, 1
    if backend == "gpu":  # Triton: a power of two, at most GPU_ROW_BLOCK per program
        rows = min(1 << (used - 1).bit_length(), GPU_ROW_BLOCK)
        row_blocks = -(-used // rows)
    t = Tiling(backend, tuple(bits), tuple(s.k_codes.shape[2] for s in subsets), d, kv_heads, rows, key_mode,
               key_block, group or d, v_scale is not None, sliding_window, splits, per_split, row_blocks)
    rows = rows * row_blocks
    qg = group_queries(q.astype(jnp.float32) * d**-0.5, kv_heads)  # [n, kv_heads, G, queries, d]
    rows_q = qg.transpose(0, 1, 3, 2, 4).reshape(n, kv_heads, used, d)  # row q * G + g
    rows_q = jnp.pad(rows_q, ((0, 0), (0, 0), (0, rows - used), (0, 0)))
    row_pos = jnp.repeat(positions.astype(jnp.int32), heads // kv_heads, axis=1)  # [n, used]
    row_pos = jnp.pad(row_pos, ((0, 0), (0, rows - used)), constant_values=-1)[..., None]  # [n, rows, 1]
    table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, splits * per_split - table.shape[1])))
    args = (table, count.astype(jnp.int32), rows_q, row_pos)
    run = _run_tpu if backend == "tpu" else _run_gpu
    m, total, acc = run(t, args, subsets, v_scale, interpret)
    return _output(m[..., :used, 0], total[..., :used, 0], acc[..., :used, :], queries)


def _run_tpu(t: Tiling, args: tuple, subsets: tuple[PagedSubset, ...], v_scale, interpret) -> list[jax.Array]:
    """The Mosaic form: the table and counts scalar-prefetched, one grid step per table slot."""
    n = args[0].shape[0]
    in_specs, out_specs, scratch = _specs(t, subsets)
    shape = lambda width: jax.ShapeDtypeStruct((n, t.kv_heads, t.splits, t.rows, width), jnp.float32)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(n, t.kv_heads, t.splits,
                                                                            t.slots_per_split),
                                               in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
        out_shape=[shape(1), shape(1), shape(t.head_dim)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(t, n, t.slots_per_split),
        interpret=interpret,
        name="paged_packed_attention",
    )(*args, *_views(t, subsets, v_scale))


def _gpu_views(t: Tiling, subsets: tuple[PagedSubset, ...], v_scale) -> list[jax.Array]:
    """The pool flattened to rows (free reshapes of the row-major arrays): codes [pages * kv_heads * n, width],
    slots [pages * kv_heads * n], statistics [pages * kv_heads * (runs or n), columns], CST scale [pages * kv_heads,
    d]."""
    rows = lambda x: x.reshape(-1, x.shape[-1])
    views = []
    for subset in subsets:
        views += [rows(subset.k_codes), rows(subset.v_codes), subset.slots.reshape(-1),
                  *(rows(x) for x in subset[3:])]
    return views + ([rows(v_scale)] if t.cst else [])


def _run_gpu(t: Tiling, args: tuple, subsets: tuple[PagedSubset, ...], v_scale, interpret) -> list[jax.Array]:
    """The Triton form: one program per (sequence, KV head, split), the pool views whole (pointers: only the pages
    the table names are loaded)."""
    n = args[0].shape[0]
    views = _gpu_views(t, subsets, v_scale)
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, s, zeros=(0,) * x.ndim: zeros)
    rb = t.row_blocks  # grid axis 0: sequence * row_blocks + row block
    in_specs = [whole(args[0]), whole(args[1]),
                pl.BlockSpec((None, None, t.rows, t.head_dim), lambda b, h, s: (b // rb, h, b % rb, 0)),
                pl.BlockSpec((None, t.rows, 1), lambda b, h, s: (b // rb, b % rb, 0))] + [whole(x) for x in views]
    state = lambda width: pl.BlockSpec((None, None, None, t.rows, width), lambda b, h, s: (b // rb, h, s, b % rb, 0))
    shape = lambda width: jax.ShapeDtypeStruct((n, t.kv_heads, t.splits, t.rows * rb, width), jnp.float32)
    return pl.pallas_call(
        functools.partial(_gpu_kernel, t=t),
        grid=(n * rb, t.kv_heads, t.splits),
        in_specs=in_specs,
        out_specs=[state(1), state(1), state(t.head_dim)],
        out_shape=[shape(1), shape(1), shape(t.head_dim)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=_cost(t, n, t.slots_per_split),
        interpret=interpret,
        name="paged_packed_attention",
    )(*args, *views)


def _output(m: jax.Array, total: jax.Array, acc: jax.Array, queries: int) -> tuple[jax.Array, jax.Array]:
    """(out [n, queries, heads, d], lse [n, queries, heads]) from the splits' states m, total [n, kv_heads, splits,
    rows], acc [..., rows, d] (rows q * G + g)."""
    top = m.max(axis=2)
    weight = jnp.exp(m - top[:, :, None])
    denom = (total * weight).sum(axis=2)
    out = (acc * weight[..., None]).sum(axis=2) / jnp.maximum(denom, TINY)[..., None]  # [n, kv_heads, rows, d]
    lse = jnp.where(denom > TINY, top + jnp.log(jnp.maximum(denom, TINY)), MASK_VALUE)
    n, kv_heads, rows, _ = out.shape
    to_heads = lambda x: ungroup(x.reshape(n, kv_heads, queries, rows // queries, -1).transpose(0, 1, 3, 2, 4))
    return to_heads(out), to_heads(lse[..., None])[..., 0]


def paged_packed_attention(q: jax.Array, subsets: tuple[PagedSubset, ...], v_scale: jax.Array | None,
                           table: jax.Array, count: jax.Array, positions: jax.Array, *, bits: tuple[int, ...],
                           page_size: int, key_mode: str, key_block: int | None = None, group: int | None = None,
                           sliding_window: int | None = None, backend: str | None = None, interpret=None,
                           blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of n sequences' decode queries over their packed pages, read through the page table.

    q [n, queries, heads, head_dim] at positions int32 [n, queries] (-1: padding); subsets: one `PagedSubset` per
    precision (`bits` per subset, the subsets' sizes summing to `page_size`); v_scale float16 [pages, kv_heads, 1,
    head_dim] (CST values) or None; table int32 [n, P]: the packed page of logical pages 0 .. count - 1 (count int32
    [n]); key_mode "channel" (statistics per page and subset, or per run of `key_block` tokens) or "token" (per token
    and group of `group` channels, as the values always are). backend / interpret / blocks: the kernels' wrapper
    convention. Returns (out float32 [n, queries, heads, head_dim], lse float32 [n, queries, heads])."""
    with jax.named_scope("paged_packed_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a paged_packed_attention.Blocks or None, got {blocks!r}")
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        subsets = tuple(subsets)
        check_inputs(q, subsets, v_scale, table, count, positions, bits=bits, page_size=page_size,
                     key_mode=key_mode, key_block=key_block, group=group, backend=backend)
        return _paged_packed_attention(q, subsets, v_scale, table, count, positions, bits=tuple(bits),
                                       page_size=page_size, key_mode=key_mode, key_block=key_block, group=group,
                                       sliding_window=sliding_window, backend=backend, interpret=interpret,
                                       blocks=blocks or Blocks())

