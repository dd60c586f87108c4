"""Attention over the serving engine's dense page pool read in place through a page table, on a GPU (Triton): the
kernel an H100 serves dense pages with (zipjax.serve.gpu_paged maps the engine's step onto it), where jax's own
Triton paged_attention does not fit (it is decode-only, reads head-major K and V pools and has no sliding window).

Pool format (zipjax.serve.paged.Pool): one array per layer [pages, page_size, 2 * kv_heads, head_dim], K of KV head
h at combined index 2h and its V at 2h + 1. Row r of a call is one sequence: its queries q[r] [qn, heads, head_dim]
at positions[r] (int32 [qn], -1: padding, sees nothing), its page table page_table[r] (int32 [P]) holding logical
pages first[r], first[r] + 1, ... (first int32 [n], None: 0). A key at logical page l, slot s has position
l * page_size + s; a query at p sees it iff 0 <= p - position < sliding_window (None: no window), zipjax's rule.
Decode rows (qn = 1) and prefill blocks (qn = Q) are separate calls, as the jnp path's segments are.

Grid (n x row_blocks, kv_heads): one program per (row, block of its query rows, KV head). The rows of a program are
the row's queries times the G query heads of the KV head (row q * G + g; padded to a power of two of at least 16,
Triton's smallest dot, and cut into blocks of `Blocks.rows`), so every page is read once per KV head for all of
them. A program walks its table slots from the first page any of its rows' windows reaches to the furthest page any
of them sees (a slot past the table's end is never read), loading each page's K and V [page_size, head_dim] by
pointer from a flat view of the pool ([pages * page_size, 2 * kv_heads * head_dim], a free reshape; rows and
columns rounded up to powers of two of at least 16 and masked), so only the pages a row needs are read, and pages
no table names never are (NaN there changes nothing). Scores q . k^T (K in q's dtype, as the jnp path) scaled by
head_dim ** -0.5, a float32 online softmax over the pages (zipjax.kernels.common's step written out), values p . v
with p and V in q's dtype; float32 queries contract at full precision.

Entry point `paged_dense_attention(q, kv_pages, page_table, positions, first=None, *, sliding_window=None,
backend=None, interpret=None, blocks=None)` returns (out float32 [n, qn, heads, head_dim], lse float32 [n, qn,
heads]): a row that sees nothing (padding) has out 0 and lse MASK_VALUE, so partial results merge by log-sum-exp.
There is a GPU form only (a TPU serves dense pages by jax's ragged paged attention); on a CPU it runs interpreted.
Its jnp reference is zipjax.serve.paged's `paged_state` (tests/test_pallas_paged_dense.py: interpreted, and the
serving step compiled ahead of time for an H100). Imports: jax and the kernels' package only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from zipjax.kernels.common import MASK_VALUE, TINY, group_queries, platform, resolve_backend, ungroup

BACKENDS = ("gpu",)
GPU_MIN_DOT = 16  # Triton's smallest dot dimension: query rows, keys and head_dim are padded to at least this
ROW_BLOCK = 64  # query rows (queries x group heads) per program by default: a prefill block's 64 x G are cut


def _pow2(n: int) -> int:
    return max(GPU_MIN_DOT, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The kernel's tunable block: `rows`, the query rows (queries x group heads) one program holds at most, a power
    of two >= 16 (None: 64); a row with more is cut into several programs, each reading the row's pages."""

    rows: int | None = None

    def __post_init__(self):
        if self.rows is not None and (not isinstance(self.rows, int) or isinstance(self.rows, bool)
                                      or self.rows < GPU_MIN_DOT or self.rows & (self.rows - 1)):
            raise ValueError(f"blocks.rows: expected a power of two >= {GPU_MIN_DOT} or None, got {self.rows!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static plan of one pallas_call."""

    kv_heads: int
    head_dim: int
    dim: int  # head_dim rounded up to a power of two >= 16 (columns loaded, masked past head_dim)
    page_size: int
    width: int  # page_size rounded up likewise (key rows loaded per page, masked past page_size)
    rows: int  # query rows per program
    row_blocks: int  # programs per row and KV head
    table_width: int
    sliding_window: int | None
    exact: bool  # float32 queries: contract at full precision (Triton's default is TF32)


def check_inputs(q, kv_pages, page_table, positions, first) -> None:
    """ValueError naming the argument and its shape unless the pool, table and queries fit together."""
    if jnp.ndim(q) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(f"q must be float [n, queries, heads, head_dim], got {jnp.result_type(q)} {jnp.shape(q)}")
    n, queries, heads, d = q.shape
    if jnp.ndim(kv_pages) != 4 or not jnp.issubdtype(jnp.result_type(kv_pages), jnp.floating):
        raise ValueError(f"kv_pages must be float [pages, page_size, 2 * kv_heads, head_dim], got "
                         f"{jnp.result_type(kv_pages)} {jnp.shape(kv_pages)}")
    combined, pool_dim = kv_pages.shape[2:]
    if combined % 2 or heads % (combined // 2) or pool_dim != d:
        raise ValueError(f"kv_pages {tuple(kv_pages.shape)}: its combined axis must be 2 * kv_heads with q's {heads} "
                         f"heads a multiple of kv_heads, and its head_dim q's {d}")
    for name, array, shape in (("page_table", page_table, (n, None)), ("positions", positions, (n, queries)),
                               ("first", first, (n,))):
        if array is None and name == "first":
            continue
        dtype = jnp.result_type(array)
        if dtype.kind not in "iu" or jnp.ndim(array) != len(shape) or any(
                want is not None and got != want for got, want in zip(jnp.shape(array), shape, strict=True)):
            raise ValueError(f"{name} must be int of shape {shape} (None: any), got {dtype} {tuple(jnp.shape(array))}")


def _dot(a: jax.Array, b: jax.Array, contract_b: int, exact: bool) -> jax.Array:
    """a [m, k] against b ([k, n] with contract_b 0, [n, k] with 1), accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if exact else None)


def _page_range(pos: jax.Array, first: jax.Array, t: Tiling) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the table slots holding a key some row of pos int32 [rows, 1] sees (empty for padding only)."""
    seen = pos >= 0
    furthest = jnp.max(jnp.where(seen, pos, -1))
    hi = jnp.where(furthest >= 0, furthest // t.page_size - first + 1, 0)
    lo = jnp.int32(0)
    if t.sliding_window is not None:
        earliest = jnp.min(jnp.where(seen, pos, jnp.iinfo(jnp.int32).max)) - t.sliding_window + 1
        lo = jnp.maximum(earliest, 0) // t.page_size - first
    return jnp.clip(lo, 0, t.table_width), jnp.clip(hi, 0, t.table_width)


def _kernel(table_ref, first_ref, q_ref, pos_ref, kv_ref, out_ref, lse_ref, *, t: Tiling):
    """One (row x row block, KV head): q_ref [rows, dim], pos_ref [rows, 1]; kv_ref the flat pool [pages *
    page_size, 2 * kv_heads * head_dim]; out_ref [rows, dim], lse_ref [rows, 1]."""
    b, h = pl.program_id(0) // t.row_blocks, pl.program_id(1)
    q, pos = q_ref[...], pos_ref[...]
    first = first_ref[b]
    slot = lax.broadcasted_iota(jnp.int32, (1, t.width), 1)
    column = lax.broadcasted_iota(jnp.int32, (t.width, t.dim), 1)
    in_page = (lax.broadcasted_iota(jnp.int32, (t.width, t.dim), 0) < t.page_size) & (column < t.head_dim)

    def load(page, half):  # [width, dim] of the page's K (half 0) or V (half 1) of KV head h
        block = kv_ref.at[pl.ds(page * t.page_size, t.width), pl.ds((2 * h + half) * t.head_dim, t.dim)]
        return plt.load(block, mask=in_page, other=0)

    def body(j, state):
        m, denom, acc = state
        page = table_ref[b, j]
        delta = pos - ((first + j) * t.page_size + slot)  # [rows, width]
        seen = (delta >= 0) & (slot < t.page_size)
        if t.sliding_window is not None:
            seen &= delta < t.sliding_window
        k = load(page, 0).astype(q.dtype)
        scores = jnp.where(seen, _dot(q, k, 1, t.exact) * t.head_dim**-0.5, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
        p = jnp.where(seen, jnp.exp(scores - m_new), 0.0)
        rescale = jnp.exp(m - m_new)
        values = _dot(p.astype(q.dtype), load(page, 1).astype(q.dtype), 0, t.exact)
        return m_new, rescale * denom + p.sum(axis=1, keepdims=True), rescale * acc + values

    lo, hi = _page_range(pos, first, t)
    start = (jnp.full((t.rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((t.rows, 1), jnp.float32),
             jnp.zeros((t.rows, t.dim), jnp.float32))
    m, denom, acc = lax.fori_loop(lo, hi, body, start)
    out_ref[...] = acc / jnp.maximum(denom, TINY)
    lse_ref[...] = jnp.where(denom > 0, m + jnp.log(jnp.maximum(denom, TINY)), MASK_VALUE)


def _cost(t: Tiling, n: int, itemsize: int) -> pl.CostEstimate:
    """Every page the tables can name, read once per program (an upper bound: a program reads its rows' extent)."""
    programs = n * t.row_blocks * t.kv_heads
    keys = programs * t.table_width * t.page_size
    return pl.CostEstimate(flops=4 * t.rows * t.head_dim * keys, transcendentals=t.rows * keys,
                           bytes_accessed=2 * keys * t.head_dim * itemsize + programs * t.rows * (t.head_dim + 1) * 8)


@functools.partial(jax.jit, static_argnames=("sliding_window", "interpret", "blocks"))
def _paged_dense_attention(q, kv_pages, page_table, positions, first, *, sliding_window, interpret, blocks: Blocks):
    """`paged_dense_attention`, its backend resolved and its inputs checked."""
    n, queries, heads, d = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    kv_heads = combined // 2
    used = queries * heads // kv_heads
    rows = min(_pow2(used), blocks.rows or ROW_BLOCK)
    row_blocks = -(-used // rows)
    t = Tiling(kv_heads, d, _pow2(d), page_size, _pow2(page_size), rows, row_blocks, page_table.shape[1],
               sliding_window, jnp.dtype(q.dtype) == jnp.float32)
    total = rows * row_blocks
    qg = group_queries(q, kv_heads)  # [n, kv_heads, G, queries, d]
    rows_q = qg.transpose(0, 1, 3, 2, 4).reshape(n, kv_heads, used, d)  # row q * G + g
    rows_q = jnp.pad(rows_q, ((0, 0), (0, 0), (0, total - used), (0, t.dim - d)))
    row_pos = jnp.repeat(positions.astype(jnp.int32), heads // kv_heads, axis=1)  # [n, used]
    row_pos = jnp.pad(row_pos, ((0, 0), (0, total - used)), constant_values=-1)[..., None]  # [n, total, 1]
    first = jnp.zeros((n,), jnp.int32) if first is None else first.astype(jnp.int32)
    flat = kv_pages.reshape(num_pages * page_size, combined * d)
    if interpret and (t.width, t.dim) != (page_size, d):
        # the last page's (head's) block reaches past the view's end, masked: Triton reads nothing there, but the
        # interpreter clamps the block's start, so it gets a padded copy (a test's small pool; never on a GPU)
        flat = jnp.pad(flat, ((0, t.width - page_size), (0, t.dim - d)))
    out, lse = _call(t, (page_table.astype(jnp.int32), first, rows_q, row_pos, flat), interpret)
    out, lse = out[:, :, :used, :d], lse[:, :, :used, 0]  # [n, kv_heads, used, d], [n, kv_heads, used]
    to_heads = lambda x: ungroup(x.reshape(n, kv_heads, queries, used // queries, -1).transpose(0, 1, 3, 2, 4))
    return to_heads(out), to_heads(lse[..., None])[..., 0]


def _call(t: Tiling, args: tuple, interpret) -> list[jax.Array]:
    """The Triton pallas_call: the table, the firsts and the flat pool whole (read by pointer), query rows and their
    positions in blocks of t.rows."""
    n = args[0].shape[0]
    rb = t.row_blocks
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, zeros=(0,) * x.ndim: zeros)
    in_specs = [whole(args[0]), whole(args[1]),
                pl.BlockSpec((None, None, t.rows, t.dim), lambda b, h: (b // rb, h, b % rb, 0)),
                pl.BlockSpec((None, t.rows, 1), lambda b, h: (b // rb, b % rb, 0)), whole(args[4])]
    out = lambda width: pl.BlockSpec((None, None, t.rows, width), lambda b, h: (b // rb, h, b % rb, 0))
    shape = lambda width: jax.ShapeDtypeStruct((n, t.kv_heads, t.rows * rb, width), jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, t=t),
        grid=(n * rb, t.kv_heads),
        in_specs=in_specs,
        out_specs=[out(t.dim), out(1)],
        out_shape=[shape(t.dim), shape(1)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=_cost(t, n, jnp.dtype(args[4].dtype).itemsize),
        interpret=interpret,
        name="paged_dense_attention",
    )(*args)


def paged_dense_attention(q: jax.Array, kv_pages: jax.Array, page_table: jax.Array, positions: jax.Array,
                          first: jax.Array | None = None, *, sliding_window: int | None = None,
                          backend: str | None = None, interpret=None,
                          blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention of n rows of queries over their sequences' dense pages, read through the page table.

    q [n, queries, heads, head_dim] at positions int32 [n, queries] (-1: padding); kv_pages [pages, page_size,
    2 * kv_heads, head_dim] (K and V interleaved, see the module docstring); page_table int32 [n, P]: logical pages
    first, first + 1, ... (first int32 [n], None: 0). backend / interpret / blocks: the kernels' wrapper convention
    (backend None on a CPU: the GPU form, interpreted). Returns (out float32 [n, queries, heads, head_dim], lse
    float32 [n, queries, heads])."""
    with jax.named_scope("paged_dense_attention"):
        if blocks is not None and not isinstance(blocks, Blocks):
            raise ValueError(f"blocks: expected a paged_dense_attention.Blocks or None, got {blocks!r}")
        if backend is None and platform() == "cpu":  # the GPU form is the only one: a CPU interprets it
            if interpret is False:
                raise ValueError("interpret: Pallas only interprets on a CPU; got interpret=False")
            backend, interpret = "gpu", True if interpret is None else interpret
        backend, interpret = resolve_backend(backend, interpret, BACKENDS)
        check_inputs(q, kv_pages, page_table, positions, first)
        return _paged_dense_attention(q, kv_pages, page_table, positions, first, sliding_window=sliding_window,
                                      interpret=interpret, blocks=blocks or Blocks())
