"""Decode attention over packed quantized KV pages read through a page table: the serving engine's compressed pool
(zipjax.serve.packed), without a dequantized copy of any page in memory. The page format (`PageLayout`) is defined
here, next to the kernel that reads it.

Page format: one page of one layer and KV head is a record of `PageLayout.rows` rows of head_dim int32 words (for a
head_dim of 128 every row fills the 128 lanes of a TPU vector register), held in a few pool arrays int32 [pages,
kv_heads, R, head_dim] (`PageLayout.leaves`: the record's rows split into a multiple of 8, then 4, 2 and 1). Those are
the shapes XLA:TPU lays out row-major by default ({3,2,1,0}, tiles (8|4|2|1, 128)), i.e. exactly as Mosaic reads a
block, so the kernel reads the pool in place; with narrow minor dimensions (the former per-field format, uint8
[pages, kv_heads, 39, 64]) XLA prefers page-minor layouts and every kernel call relayouted the pool it read. Record
rows, in order (subsets: one per precision; ZipCache: its salient tokens at 4 bits and the rest at 2 bits; KIVI and
uniform: one):

  codes        lane c of every word holds channel c. Each code stream (subset s, K then V; widest codes first)
               fills bit columns [o, o + b) of the first rows down, token after token of the subset (its storage
               index), then the next column: no padding between subsets, so the codes take ceil(total bits / 32)
               rows (ZipCache's 39 + 25 tokens at 4 / 2 bits: 13 rows). Ranked pages add one bit column: bit j of
               lane j is set iff slot j of the page is salient (subset 0); a subset's tokens are its slots in
               increasing order, so no slot is stored.
  key stats    channel-wise keys: per subset and run of `key_block` tokens (or the whole subset) one row, word c =
               float16 step of channel c | float16 min << 16
  tables       float16 entries on half-rows (the low, then the high 16 bits of a row's words): the CST channel
               scale (lane = channel), then per kind (token-wise keys "k", values "v"), step then min, group and
               subset, the subset's tokens on consecutive lanes (a segment that fits stays on one half-row)

ZipCache 4/2 at LLaMA-3-8B's shapes (64-token pages, head_dim 128) takes 13 + 2 + 1 rows = 8 KiB per page and KV
head, as many bytes as its information; KIVI-2 12 rows (6 KiB), uniform-4 17 rows (8.5 KiB).

A sequence's packed pages are the logical pages 0 .. count - 1 of its table; a key's position is logical page *
page_size + slot (the ranking orders tokens differently per KV head), and a query at position p sees it iff position
<= p (and p - position < sliding_window); a query at -1 is padding and sees nothing.

One program per (sequence, KV head, split) walks the sequence's pages; the rows of a program are the queries of the
sequence times the G query heads of the KV head (row q * G + g), so every page's codes are read once for all of them.
A piece of a subset's tokens (`PageLayout.pieces`: consecutive tokens in one bit column and one table chunk) unpacks
with one shift and mask into keys (or values) [tokens, head_dim], channels on lanes: scores are q . k^T per piece,
values p . v per piece. The scales never touch the pool: channel-wise keys fold the page's step into the query and
its min into a bias, token-wise keys scale the piece's scores by each token's step and add its min times the query's
sum over the group, values apply the token's step to its probability and the page's CST scale to the output
columns; float16 entries are decoded from their bits. Ranked pages: a row sees the subset's tokens between the
counts of its salient (or other) slots up to the row's window start and up to its position.

TPU (Mosaic): the page table and the packed-page counts are scalar-prefetched; the grid is (sequence, KV head,
split, table slot) with the slot axis sequential, and each block's index map reads the page id from the table (a
slot past the count repeats the last page, so nothing is copied for it, and its program does nothing); a block is
one (page, KV head) record [R, head_dim] of each pool array. GPU (Triton): no scalar prefetch; one program per
(sequence, KV head, split) walks its table slots up to the count in a loop, loading each record's rows by pointer
from flat views of the pool (free reshapes), every block of code rows and table lanes rounded up to a power of two
of at least 16 (Triton's smallest dot) and masked. Only the pages a table names are read, on both.

Entry point `paged_packed_attention(q, pages, table, count, positions, *, layout, sliding_window=None,
backend=None, interpret=None, blocks=None)` returns (out float32 [n, qn, heads, d], lse float32 [n, qn, heads]): a row
that sees nothing has out 0 and lse MASK_VALUE, and merges with the dense tail by log-sum-exp. Its jnp reference is
zipjax.serve.packed's `packed_state` (tests/test_pallas_paged.py: both forms interpreted, and compiled ahead of time
for a v5e and an H100). Imports: jax and the kernels' package only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
GPU_ROW_BLOCK = 32  # query rows per Triton program at most (a prefill block's 64 queries x G would overflow SRAM)
GPU_MIN_DOT = 16  # Triton's smallest dot dimension: blocks of code rows and table lanes are loaded at least this big
WORD_BITS = 32


class _Codes(NamedTuple):
    """A run of one code stream (subset, K or V) in one bit column: tokens first .. first + count - 1 of the subset
    in record rows row .. row + count - 1, bits [offset, offset + bits) of each word."""

    row: int
    offset: int
    first: int
    count: int


class _Chunk(NamedTuple):
    """A run of a statistics table's float16 entries on one half-row: tokens first .. first + count - 1 of the
    subset (or channels, for the CST scale) on lanes lane .. of record row `row`, low or `high` halves."""

    row: int
    high: bool
    lane: int
    first: int
    count: int


class _Piece(NamedTuple):
    """Tokens first .. first + count - 1 of subset s, contiguous in every part of the record: their key and value
    codes at (row, bit offset) and their table entries in one chunk each."""

    s: int
    first: int
    count: int
    k: tuple[int, int]
    v: tuple[int, int]


class _Plan(NamedTuple):
    """Where each part of a page record lives (see the module docstring): the code runs of each (subset, 0 = K /
    1 = V), the (row, bit offset) of each head_dim slots' salient bits (ranked pages), the row of each (subset, run) of
    channel-wise key statistics, the chunks of each table (kind, 0 = step / 1 = min, group, subset) and of the CST
    scale, the record's rows and their split into pool arrays."""

    codes: dict
    member: tuple[tuple[int, int], ...]
    key_stats: dict
    table: dict
    scale: _Chunk | None
    rows: int
    leaves: tuple[int, ...]


def _fill_codes(streams: list, rows: int) -> dict | None:
    """Stack streams (key, bits, entries) down bit columns of `rows` words, widest first (a narrower stream may
    finish a wider column): their runs, or None if 32 bits are not enough."""
    codes, top, column = {}, 0, None  # column: [offset, bits, next free row]
    for key, bits, n in streams:
        runs, t = [], 0
        while t < n:
            if column is None or column[1] < bits or column[2] == rows:
                if top + bits > WORD_BITS:
                    return None
                column, top = [top, bits, 0], top + bits
            take = min(n - t, rows - column[2])
            runs.append(_Codes(column[2], column[0], t, take))
            column[2], t = column[2] + take, t + take
        codes[key] = tuple(runs)
    return codes


def _fill_tables(segments: list, width: int, row: int) -> tuple[dict, int]:
    """Place table segments (key, entries) on half-rows of `width` lanes from `row` on (each on one half-row when it
    fits): their chunks and the first row after them."""
    placed, half, lane = {}, 0, 0
    for key, n in segments:
        if lane + min(n, width) > width:
            half, lane = half + 1, 0
        chunks, t = [], 0
        while t < n:
            if lane == width:
                half, lane = half + 1, 0
            take = min(n - t, width - lane)
            chunks.append(_Chunk(row + half // 2, half % 2 == 1, lane, t, take))
            lane, t = lane + take, t + take
        placed[key] = tuple(chunks)
    return placed, row + (half + (1 if lane else 0) + 1) // 2


def _split_rows(rows: int) -> tuple[int, ...]:
    """A record's rows as pool arrays XLA:TPU lays out row-major: a multiple of 8, then 4, 2, 1."""
    return tuple(x for x in (rows // 8 * 8, rows % 8 & 4, rows % 8 & 2, rows % 8 & 1) if x)


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """The packed page format of one KV method (see the module docstring): `bits` and `sizes` (tokens) per subset
    (sizes summing to the page size), keys channel-wise ("channel": statistics per subset, or per run of `key_block`
    tokens) or token-wise ("token", per group of `group` channels, as values always are; None: the whole head),
    CST value scales (`cst`), and `ranked` pages (ZipCache: two subsets chosen by saliency, the salient slots kept
    as one bit per slot; otherwise a subset's tokens are consecutive slots)."""

    head_dim: int
    bits: tuple[int, ...]
    sizes: tuple[int, ...]
    key_mode: str = "channel"
    key_block: int | None = None
    group: int | None = None
    cst: bool = False
    ranked: bool = False

    def __post_init__(self):
        if self.key_mode not in ("channel", "token"):
            raise ValueError(f"key_mode must be 'channel' or 'token', got {self.key_mode!r}")
        if not self.bits or len(self.bits) != len(self.sizes) or any(b not in BITS for b in self.bits):
            raise ValueError(f"bits must be one of {BITS} per subset, got bits {self.bits} for sizes {self.sizes}")
        if any(n < 1 for n in self.sizes) or self.head_dim % self.channels:
            raise ValueError(f"sizes {self.sizes} must be positive and group {self.group} divide head_dim "
                             f"{self.head_dim}")
        if self.ranked and len(self.sizes) > 2:
            raise ValueError(f"ranked pages have at most 2 subsets, got sizes {self.sizes}")

    @property
    def page_size(self) -> int:
        return sum(self.sizes)

    @property
    def channels(self) -> int:
        """Channels per token-wise group."""
        return self.group or self.head_dim

    @property
    def groups(self) -> int:
        return self.head_dim // self.channels

    @property
    def member_bits(self) -> bool:
        """Whether slots are stored (as the salient subset's bit per slot): ranked pages of two subsets."""
        return self.ranked and len(self.sizes) == 2

    def runs(self, s: int) -> int:
        """Rows of channel-wise key statistics of subset s (0 for token-wise keys)."""
        if self.key_mode != "channel":
            return 0
        return -(-self.sizes[s] // self.key_block) if self.key_block else 1

    def run_of(self, token: int) -> int:
        return token // self.key_block if self.key_block else 0

    def first_slot(self, s: int) -> int:
        return sum(self.sizes[:s])

    @property
    def kinds(self) -> tuple[str, ...]:
        """The tables' kinds: token-wise key statistics (if any), then value statistics."""
        return ("k", "v") if self.key_mode == "token" else ("v",)

    @functools.cached_property
    def plan(self) -> _Plan:
        subsets = range(len(self.sizes))
        streams = [((s, kv), self.bits[s], self.sizes[s]) for s in sorted(subsets, key=lambda s: -self.bits[s])
                   for kv in (0, 1)]
        chunks = -(-self.page_size // self.head_dim) if self.member_bits else 0  # 1-bit columns of salient slots
        streams.append((("member",), 1, chunks))
        rows = -(-(sum(2 * n * b for n, b in zip(self.sizes, self.bits, strict=True)) + chunks) // WORD_BITS)
        while (codes := _fill_codes(streams, rows)) is None:
            rows += 1
        member = tuple((r.row + k - r.first, r.offset) for r in codes.pop(("member",))
                       for k in range(r.first, r.first + r.count))
        key_stats = {}
        for s in subsets:
            for run in range(self.runs(s)):
                key_stats[s, run], rows = rows, rows + 1
        segments = [(("scale",), self.head_dim)] if self.cst else []
        segments += [((kind, part, g, s), self.sizes[s]) for kind in self.kinds for part in (0, 1)
                     for g in range(self.groups) for s in subsets]
        table, rows = _fill_tables(segments, self.head_dim, rows)
        scale = table.pop(("scale",))[0] if self.cst else None
        return _Plan(codes, member, key_stats, table, scale, rows, _split_rows(rows))

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def leaves(self) -> tuple[int, ...]:
        """Rows of each pool array of a layer."""
        return self.plan.leaves

    def locate(self, row: int) -> tuple[int, int]:
        """(pool array, row within its record) of record row `row`."""
        for leaf, size in enumerate(self.leaves):
            if row < size:
                return leaf, row
            row -= size
        raise ValueError(f"row {row} past the record")

    @functools.cached_property
    def pieces(self) -> tuple[_Piece, ...]:
        """Every subset's tokens cut where a code run, a pool array or a table chunk ends."""
        starts = [sum(self.leaves[:i]) for i in range(1, len(self.leaves))]
        plan, out = self.plan, []
        for s in range(len(self.sizes)):
            cuts = {0, self.sizes[s]}
            for run in plan.codes[s, 0] + plan.codes[s, 1]:
                cuts |= {run.first} | {run.first + x - run.row for x in starts if run.row < x < run.row + run.count}
            cuts |= {chunk.first for key, chunks in plan.table.items() if key[3] == s for chunk in chunks}
            for first, last in itertools.pairwise(sorted(cuts)):
                at = [next((r.row + first - r.first, r.offset) for r in plan.codes[s, kv]
                           if r.first <= first < r.first + r.count) for kv in (0, 1)]
                out.append(_Piece(s, first, last - first, *at))
        return tuple(out)

    def chunk(self, key: tuple, first: int) -> tuple[int, bool, int]:
        """(row, high, lane) of token `first` of table `key` (kind, part, group, subset)."""
        chunk = next(c for c in self.plan.table[key] if c.first <= first < c.first + c.count)
        return chunk.row, chunk.high, chunk.lane + first - chunk.first


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
    layout: PageLayout
    kv_heads: int
    rows: int  # query rows per program: queries x G (GPU: padded to a power of two)
    sliding_window: int | None
    splits: int
    slots_per_split: int  # table slots each split walks
    row_blocks: int = 1  # programs sharing a sequence's query rows (GPU), t.rows each

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    def width(self, n: int) -> int:
        """Tokens (code rows or table lanes) a program holds for n: n (TPU), a power of two >= 16 (Triton)."""
        return n if self.backend == "tpu" else max(GPU_MIN_DOT, 1 << (n - 1).bit_length())


def check_inputs(q, pages, table, count, positions, *, layout: PageLayout, backend: str) -> None:
    """ValueError naming the argument and its shape unless the pool, table and queries fit together."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(layout, PageLayout):
        raise ValueError(f"layout must be a PageLayout, got {type(layout).__name__}")
    if jnp.ndim(q) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(f"q must be float [n, queries, heads, head_dim], got {jnp.result_type(q)} {jnp.shape(q)}")
    n, queries, heads, d = q.shape
    if len(pages) != len(layout.leaves) or not pages:
        raise ValueError(f"pages: expected {len(layout.leaves)} pool arrays (rows {layout.leaves}), got {len(pages)}")
    num_pages, kv_heads = pages[0].shape[:2]
    if heads % kv_heads or d != layout.head_dim:
        raise ValueError(f"q's {heads} heads / head_dim {d} must be a multiple of the pool's {kv_heads} KV heads / "
                         f"the layout's head_dim {layout.head_dim}")
    for index, (array, rows) in enumerate(zip(pages, layout.leaves, strict=True)):
        if tuple(array.shape) != (num_pages, kv_heads, rows, d) or jnp.result_type(array) != jnp.int32:
            raise ValueError(f"pages[{index}] must be int32 {(num_pages, kv_heads, rows, d)}, got "
                             f"{jnp.result_type(array)} {tuple(array.shape)}")
    for name, array, shape in (("table", table, (n, None)), ("count", count, (n,)),
                               ("positions", positions, (n, queries))):
        dtype = jnp.result_type(array)
        if dtype.kind not in "iu" or jnp.ndim(array) != len(shape) or any(
                want is not None and got != want for got, want in zip(jnp.shape(array), shape, strict=True)):
            raise ValueError(f"{name} must be int of shape {shape} (None: any), got {dtype} {tuple(jnp.shape(array))}")


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """a [m, k] against b ([k, n] with contract_b 0, [n, k] with 1), float32-exact."""
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _half(words: jax.Array, high: bool) -> jax.Array:
    """The float16 in the low (or high) half of int32 words, as float32."""
    return decode_float16_bits((words >> 16) & 0xFFFF if high else words & 0xFFFF)


def _field(words: jax.Array, offset: int, bits: int) -> jax.Array:
    """The codes in bits [offset, offset + bits) of words [w, d], float32."""
    return ((words >> offset) & ((1 << bits) - 1)).astype(jnp.float32)


class _TpuPage:
    """A page record as the Mosaic program holds it: one [R, d] block per pool array."""

    def __init__(self, refs, t: Tiling):
        self.refs, self.t = refs, t

    def words(self, row: int, n: int) -> jax.Array:
        """int32 [n, d]: record rows row .. row + n - 1 (within one pool array)."""
        leaf, local = self.t.layout.locate(row)
        return self.refs[leaf][pl.ds(local, n), :]

    def lanes(self, row: int, lane: int, n: int) -> jax.Array:
        """int32 [1, n]: lanes lane .. lane + n - 1 of record row `row`."""
        leaf, local = self.t.layout.locate(row)
        return self.refs[leaf][pl.ds(local, 1), pl.ds(lane, n)]


class _GpuPage(_TpuPage):
    """A page record read by pointer from flat views of the pool (Triton): [pages * kv_heads * R, d] for blocks of
    rows and [pages * kv_heads * R * d] for lanes, rounded up to `Tiling.width` and masked."""

    def __init__(self, refs, flat, t: Tiling, page, head):
        super().__init__(refs, t)
        self.flat, self.page, self.head = flat, page, head

    def _base(self, row: int) -> tuple[int, jax.Array]:
        leaf, local = self.t.layout.locate(row)
        return leaf, (self.page * self.t.kv_heads + self.head) * self.t.layout.leaves[leaf] + local

    def words(self, row: int, n: int) -> jax.Array:
        leaf, base = self._base(row)
        width = self.t.width(n)
        mask = jnp.broadcast_to(lax.broadcasted_iota(jnp.int32, (width, 1), 0) < n, (width, self.t.head_dim))
        return plt.load(self.refs[leaf].at[pl.ds(base, width), :], mask=mask, other=0)

    def lanes(self, row: int, lane: int, n: int) -> jax.Array:
        leaf, base = self._base(row)
        width = self.t.width(n)
        mask = lax.broadcasted_iota(jnp.int32, (width,), 0) < n
        return plt.load(self.flat[leaf].at[pl.ds(base * self.t.head_dim + lane, width)], mask=mask,
                        other=0).reshape(1, width)


def _table(page: _TpuPage, t: Tiling, piece: _Piece, kind: str, part: int, g: int) -> jax.Array:
    """float32 [1, width]: a table's entries (kind, 0 step / 1 min, group) of a piece's tokens."""
    row, high, lane = t.layout.chunk((kind, part, g, piece.s), piece.first)
    return _half(page.lanes(row, lane, piece.count), high)


def _ranked_bounds(page: _TpuPage, start: jax.Array, t: Tiling) -> list[tuple[jax.Array, jax.Array]]:
    """Ranked pages: per subset the storage indices [lo, hi) int32 [rows, 1] each query row sees. A subset's tokens
    are its slots in increasing order, so a row that sees slots (start - window, start] sees the subset's tokens
    from the number of its slots <= start - window up to the number <= start."""
    layout, d = t.layout, t.head_dim
    counts = [[0, 0], [0, 0]]  # per subset: slots <= start - window, slots <= start
    for k, (row, offset) in enumerate(layout.plan.member):  # slots k * d .. k * d + d - 1
        lanes = min(d, layout.page_size - k * d)
        lane = lax.broadcasted_iota(jnp.int32, (1, t.width(lanes)), 1)
        salient = (page.lanes(row, 0, lanes) >> offset) & 1  # [1, width]: slot k * d + lane is in subset 0
        for s, member in enumerate((salient, 1 - salient)):
            member = jnp.where(lane < lanes, member, 0)
            for i, last in enumerate((None if t.sliding_window is None else start - t.sliding_window, start)):
                if last is not None:
                    counts[s][i] += jnp.sum(jnp.where(k * d + lane <= last, member, 0), axis=1, keepdims=True)
    return [tuple(pair) for pair in counts]


def _key_scores(q: jax.Array, keys: jax.Array, page: _TpuPage, piece: _Piece, index: jax.Array, t: Tiling):
    """float32 [rows, width]: q . k of a piece's tokens (queries already scaled by d^-0.5)."""
    layout = t.layout
    if layout.key_mode == "token":
        column = lax.broadcasted_iota(jnp.int32, (1, t.head_dim), 1) // layout.channels
        scores = 0.0
        for g in range(layout.groups):
            q_g = jnp.where(column == g, q, 0.0) if layout.groups > 1 else q
            step, minimum = _table(page, t, piece, "k", 0, g), _table(page, t, piece, "k", 1, g)
            scores = scores + _dot(q_g, keys, 1) * step + jnp.sum(q_g, axis=1, keepdims=True) * minimum
        return scores
    scores = None
    for run in range(layout.run_of(piece.first), layout.run_of(piece.first + piece.count - 1) + 1):
        words = page.lanes(layout.plan.key_stats[piece.s, run], 0, t.head_dim)
        step, minimum = _half(words, False), _half(words, True)
        run_scores = _dot(q * step, keys, 1) + jnp.sum(q * minimum, axis=1, keepdims=True)
        scores = run_scores if scores is None else jnp.where(index // layout.key_block == run, run_scores, scores)
    return scores


def _piece_values(p: jax.Array, page: _TpuPage, piece: _Piece, t: Tiling) -> jax.Array:
    """float32 [rows, d]: sum over a piece's tokens of p * v (before the CST scale)."""
    layout = t.layout
    row, offset = piece.v
    values = _field(page.words(row, piece.count), offset, layout.bits[piece.s])
    column = lax.broadcasted_iota(jnp.int32, (1, t.head_dim), 1) // layout.channels
    out = 0.0
    for g in range(layout.groups):
        step, minimum = _table(page, t, piece, "v", 0, g), _table(page, t, piece, "v", 1, g)
        part = _dot(p * step, values, 0) + jnp.sum(p * minimum, axis=1, keepdims=True)
        out = out + (jnp.where(column == g, part, 0.0) if layout.groups > 1 else part)
    return out


def _fold_page(q: jax.Array, row_pos: jax.Array, logical, page: _TpuPage, m_ref, l_ref, acc_ref, t: Tiling) -> None:
    """Fold one page into the state refs m, l [rows, 1] and acc [rows, d]: the online-softmax step of
    zipjax.kernels.common written out over the page's pieces of tokens."""
    layout, scored = t.layout, []
    start = row_pos - logical * layout.page_size  # [rows, 1]: the last slot of the page a row sees
    bounds = _ranked_bounds(page, start, t) if layout.member_bits else None
    for piece in layout.pieces:
        index = piece.first + lax.broadcasted_iota(jnp.int32, (1, t.width(piece.count)), 1)
        if bounds is None:
            delta = start - (layout.first_slot(piece.s) + index)  # [rows, width]
            seen = delta >= 0 if t.sliding_window is None else (delta >= 0) & (delta < t.sliding_window)
        else:
            seen = (index >= bounds[piece.s][0]) & (index < bounds[piece.s][1])
        seen &= index < piece.first + piece.count  # past it: Triton's padding
        keys = _field(page.words(piece.k[0], piece.count), piece.k[1], layout.bits[piece.s])
        scored.append((piece, seen, jnp.where(seen, _key_scores(q, keys, page, piece, index, t), MASK_VALUE)))
    m_old = m_ref[...]
    m = functools.reduce(jnp.maximum, [x.max(axis=1, keepdims=True) for _, _, x in scored], m_old)
    rescale = jnp.exp(m_old - m)
    total, values = rescale * l_ref[...], 0.0
    for piece, seen, x in scored:
        p = jnp.where(seen, jnp.exp(x - m), 0.0)
        total = total + p.sum(axis=1, keepdims=True)
        values = values + _piece_values(p, page, piece, t)
    if layout.cst:
        scale = layout.plan.scale
        values = values * _half(page.lanes(scale.row, 0, t.head_dim), scale.high)
    acc_ref[...] = rescale * acc_ref[...] + values
    l_ref[...] = total
    m_ref[...] = m


def _start_state(m_ref, l_ref, acc_ref, t: Tiling) -> None:
    m_ref[...] = jnp.full((t.rows, 1), MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros((t.rows, 1), jnp.float32)
    acc_ref[...] = jnp.zeros((t.rows, t.head_dim), jnp.float32)


def _tpu_kernel(table_ref, count_ref, q_ref, pos_ref, *refs, t: Tiling):
    """One (sequence, KV head, split, table slot). q_ref [rows, d] float32 (scaled); pos_ref [rows, 1] int32; the
    page's record, one [R, d] block per pool array; then the state m, l [rows, 1] and acc [rows, d] (resident over
    the sequential slot axis)."""
    del table_ref
    leaves = len(t.layout.leaves)
    m_ref, l_ref, acc_ref = refs[leaves:leaves + 3]
    b, split, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    logical = split * t.slots_per_split + slot

    @pl.when(slot == 0)
    def _start():
        _start_state(m_ref, l_ref, acc_ref, t)

    @pl.when(logical < count_ref[b])
    def _page():
        _fold_page(q_ref[...], pos_ref[...], logical, _TpuPage(refs[:leaves], t), m_ref, l_ref, acc_ref, t)


def _gpu_kernel(table_ref, count_ref, q_ref, pos_ref, *refs, t: Tiling):
    """One (sequence, KV head, split): its table slots walked in a loop, each page's record read from the flat pool
    views (2-d, then 1-d, per pool array) by `_GpuPage`; the state is accumulated in the output refs m, l [rows, 1],
    acc [rows, d]."""
    leaves = len(t.layout.leaves)
    m_ref, l_ref, acc_ref = refs[2 * leaves:2 * leaves + 3]
    b, h, split = pl.program_id(0) // t.row_blocks, pl.program_id(1), pl.program_id(2)
    _start_state(m_ref, l_ref, acc_ref, t)
    first = split * t.slots_per_split
    last = jnp.minimum(count_ref[b], first + t.slots_per_split)

    def body(logical, carry):
        page = _GpuPage(refs[:leaves], refs[leaves:2 * leaves], t, table_ref[b, logical], h)
        _fold_page(q_ref[...], pos_ref[...], logical, page, m_ref, l_ref, acc_ref, t)
        return carry

    lax.fori_loop(first, last, body, 0)


def _cost(t: Tiling, n: int, slots: int) -> pl.CostEstimate:
    """The contractions and reads of every page the table can name (an upper bound: slots past a count do nothing)."""
    programs = n * t.row_blocks * t.kv_heads * t.splits * slots
    layout = t.layout
    passes = layout.groups * (2 if layout.key_mode == "token" else 1)
    flops = 2 * t.rows * layout.page_size * t.head_dim * (1 + passes) * programs
    return pl.CostEstimate(flops=flops, transcendentals=programs * t.rows * layout.page_size,
                           bytes_accessed=programs * layout.rows * t.head_dim * 4
                           + n * t.kv_heads * t.rows * (t.head_dim + 2) * 8)


@functools.partial(jax.jit, static_argnames=("layout", "sliding_window", "backend", "interpret", "blocks"))
def _paged_packed_attention(q, pages, table, count, positions, *, layout, sliding_window, backend, interpret,
                            blocks: Blocks):
    """`paged_packed_attention`, its backend and interpret resolved and its inputs checked."""
    n, queries, heads, d = q.shape
    kv_heads = pages[0].shape[1]
    used = queries * heads // kv_heads
    splits = min(blocks.splits or 1, table.shape[1])
    per_split = -(-table.shape[1] // splits)
    rows, row_blocks = used, 1
    if backend == "gpu":  # Triton: a power of two, at most GPU_ROW_BLOCK per program
        rows = min(1 << (used - 1).bit_length(), GPU_ROW_BLOCK)
        row_blocks = -(-used // rows)
    t = Tiling(backend, layout, kv_heads, rows, sliding_window, splits, per_split, row_blocks)
    rows = rows * row_blocks
    qg = group_queries(q.astype(jnp.float32) * d**-0.5, kv_heads)  # [n, kv_heads, G, queries, d]
    rows_q = qg.transpose(0, 1, 3, 2, 4).reshape(n, kv_heads, used, d)  # row q * G + g
    rows_q = jnp.pad(rows_q, ((0, 0), (0, 0), (0, rows - used), (0, 0)))
    row_pos = jnp.repeat(positions.astype(jnp.int32), heads // kv_heads, axis=1)  # [n, used]
    row_pos = jnp.pad(row_pos, ((0, 0), (0, rows - used)), constant_values=-1)[..., None]  # [n, rows, 1]
    table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, splits * per_split - table.shape[1])))
    args = (table, count.astype(jnp.int32), rows_q, row_pos)
    run = _run_tpu if backend == "tpu" else _run_gpu
    m, total, acc = run(t, args, pages, interpret)
    return _output(m[..., :used, 0], total[..., :used, 0], acc[..., :used, :], queries)


def _run_tpu(t: Tiling, args: tuple, pages: tuple[jax.Array, ...], interpret) -> list[jax.Array]:
    """The Mosaic form: the table and counts scalar-prefetched, one grid step per table slot, each pool array read
    one (page, KV head) record at a time, in place."""
    n = args[0].shape[0]

    def page(b, split, slot, table, count):
        logical = split * t.slots_per_split + slot
        return table[b, jnp.clip(logical, 0, jnp.maximum(count[b] - 1, 0))]

    record = lambda rows: pl.BlockSpec((None, None, rows, t.head_dim),
                                       lambda b, h, s, j, table, count: (page(b, s, j, table, count), h, 0, 0))
    in_specs = [pl.BlockSpec((None, None, t.rows, t.head_dim), lambda b, h, s, j, *_: (b, h, 0, 0)),
                pl.BlockSpec((None, t.rows, 1), lambda b, h, s, j, *_: (b, 0, 0))]
    in_specs += [record(rows) for rows in t.layout.leaves]
    state = lambda width: pl.BlockSpec((None, None, None, t.rows, width), lambda b, h, s, j, *_: (b, h, s, 0, 0))
    shape = lambda width: jax.ShapeDtypeStruct((n, t.kv_heads, t.splits, t.rows, width), jnp.float32)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(n, t.kv_heads, t.splits,
                                                                            t.slots_per_split),
                                               in_specs=in_specs, out_specs=[state(1), state(1), state(t.head_dim)]),
        out_shape=[shape(1), shape(1), shape(t.head_dim)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(t, n, t.slots_per_split),
        interpret=interpret,
        name="paged_packed_attention",
    )(*args, *pages)


def _run_gpu(t: Tiling, args: tuple, pages: tuple[jax.Array, ...], interpret) -> list[jax.Array]:
    """The Triton form: one program per (sequence, KV head, split), the pool as flat views [pages * kv_heads * R,
    d] and [pages * kv_heads * R * d] (free reshapes; pointers: only the pages the table names are loaded)."""
    n = args[0].shape[0]
    views = [x.reshape(-1, t.head_dim) for x in pages] + [x.reshape(-1) for x in pages]
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


def paged_packed_attention(q: jax.Array, pages: tuple[jax.Array, ...], table: jax.Array, count: jax.Array,
                           positions: jax.Array, *, layout: PageLayout, sliding_window: int | None = None,
                           backend: str | None = None, interpret=None,
                           blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of n sequences' decode queries over their packed pages, read through the page table.

    q [n, queries, heads, head_dim] at positions int32 [n, queries] (-1: padding); pages: one layer's pool arrays
    int32 [pages, kv_heads, R, head_dim], R per `layout.leaves` (the page format, see the module docstring); table
    int32 [n, P]: the packed page of logical pages 0 .. count - 1 (count int32 [n]). backend / interpret / blocks:
    the kernels' wrapper convention. Returns (out float32 [n, queries, heads, head_dim], lse float32 [n, queries,
    heads])."""
    with jax.named_scope("paged_packed_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a paged_packed_attention.Blocks or None, got {blocks!r}")
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        pages = tuple(pages)
        check_inputs(q, pages, table, count, positions, layout=layout, backend=backend)
        return _paged_packed_attention(q, pages, table, count, positions, layout=layout,
                                       sliding_window=sliding_window, backend=backend, interpret=interpret,
                                       blocks=blocks or Blocks())
