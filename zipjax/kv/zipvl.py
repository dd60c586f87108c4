"""ZipVL (He et al., arXiv 2410.08584): the method, its layer-adaptive important tokens and sparse prefill attention.

    zipjax.generate(model, ids, n, kv=ZipVL(tau=0.975, high_bits=4, low_bits=2))

Per layer, probe queries (ZipCache's: the most recent tokens and as many random earlier ones) give an attention
matrix A' (zipjax.kv.saliency.prompt_statistics). Two statistics of its columns are used, as the paper does:

  count    p = the fewest tokens holding a fraction tau of the probe attention mass (Eq. 6): column masses summed
           over every probe row and query head of the layer, sorted, cumulated; p(1) = the tokens with any mass.
  ranking  which p tokens: the top p by ZipCache's normalized score (Eq. 7), per (sequence, KV head).

Sparse prefill attends only among the important tokens (Algorithm 1: O = Attention(Q[T], K[T], V[T])). T is sorted
by slot so that causality in the compacted index space is the original one. Shapes are static: the important
tokens of each (sequence, KV head) are gathered into a block of P rows, P the smallest of `buckets` fixed sizes
(multiples of length / buckets) that holds the batch's largest p, chosen with `lax.switch`, so only that branch
runs and the attention FLOPs are (P / length)^2 of dense: 1 - rho^2 saved. Rows past a sequence's own p are masked.

Decoding (Algorithm 1): when `buffer_len` (100) new tokens have accumulated, the block is re-selected from the
attention of the current query, a = Softmax(q K^T)[-100:], the newest token's row over the whole cache restricted to
the window: p from Eq. 6 over a, T the top p of a (with one query row, Eq. 8's normalized score is a itself).
`decode_rank="window"` instead ranks by every query of the window (mass over the rows that saw each token).

Choices where the paper is silent: a query that is not important gets a zero attention output (only its residual
stream carries it on; a reviewer's "padded out"); the prompt's last token is always important (`keep_last`), since
its query predicts the first new token and would otherwise get a zero attention output; heads are summed for p (one
p per sequence and layer); the random probes are drawn without replacement (ZipCache's code draws with replacement,
which repeats some: an audit counted 54-59 distinct of 64 on the shipped model).

The method `ZipVL` says which cache runs it: QuantizedKVCache (important tokens at high bits, the rest at low bits or
dropped), or, with `compress=False`, SparsePrefillKVCache (sparse prefill over a dense cache).
Imports: attention, errors, config, method, quantizing, quantized, sparse, saliency.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from zipjax.attention import grouped_attention, grouped_scores, grouped_values, masked_softmax
from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.deprecation import renamed_fields
from zipjax.errors import ZipjaxError
from zipjax.kv.method import check_block_sizes, check_positive
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.kv.quantizing import MixedPrecision, Ranking, buffer_score
from zipjax.kv.saliency import prompt_statistics
from zipjax.kv.sparse import SparsePrefillKVCache

DECODE_RANKS = ("query", "window")


def check_ratio_range(ratio_range: tuple[float, float] | None) -> None:
    if ratio_range is None:
        return
    if (not isinstance(ratio_range, tuple | list) or len(ratio_range) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in ratio_range)):
        raise ZipjaxError(f"ratio_range must be None (no clip, the paper) or (low, high) fractions, got "
                          f"{ratio_range!r}")
    low, high = ratio_range
    if not 0 <= low <= high <= 1 or high == 0:
        raise ZipjaxError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, high > 0; got {ratio_range}")


def important_count(mass: jax.Array, tau: float) -> jax.Array:
    """int32 [batch]: p(tau), the fewest tokens whose summed mass reaches tau of the total (Eq. 6).

    mass: float32 [batch, kv_heads, n] (zero for padding). Monotone in tau; p(1) = the tokens with non-zero mass."""
    column = mass.sum(axis=1)  # [batch, n]: one p per layer, heads summed
    nonzero = (column > 0).sum(axis=-1).astype(jnp.int32)
    cumulative = jnp.cumsum(-jnp.sort(-column, axis=-1), axis=-1)
    needed = (cumulative < tau * cumulative[:, -1:]).sum(axis=-1).astype(jnp.int32) + 1
    p = nonzero if tau >= 1 else jnp.minimum(needed, nonzero)
    return jnp.maximum(p, 1)


def important_order(score: jax.Array, keep_last: bool = True) -> jax.Array:
    """int32 [batch, kv_heads, n]: token indices by decreasing normalized score (the last token first when
    `keep_last`, since its query predicts the next token)."""
    if keep_last:
        score = score.at[..., -1].set(jnp.inf)
    return jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)


def bucket_sizes(length: int, buckets: int) -> tuple[int, ...]:
    """The static block sizes sparse prefill may use: multiples of ceil(length / buckets), up to length."""
    step = -(-length // buckets)
    return tuple(sorted({min(step * i, length) for i in range(1, buckets + 1)}))


def _compact_attention(q: jax.Array, k: jax.Array, v: jax.Array, order: jax.Array, count: jax.Array,
                       starts: jax.Array, size: int, sliding_window: int | None) -> jax.Array:
    """Attention among the top-`count` tokens of `order`, gathered into `size` rows; zero output elsewhere."""
    batch, length, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    rank = jnp.arange(size, dtype=jnp.int32)
    top = order[..., :size]  # [batch, kv_heads, size]
    chosen = rank[None, None, :] < count[:, None, None]
    chosen &= top >= starts[:, None, None]
    slots = jnp.sort(jnp.where(chosen, top, length + top), axis=-1)  # chosen first, in slot order
    valid = slots < length
    slots = jnp.where(valid, slots, slots - length)
    qh = q.reshape(batch, length, kv_heads, group, d).transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, G, length, d]
    qi = jnp.take_along_axis(qh, slots[:, :, None, :, None], axis=3)  # [batch, kv_heads, G, size, d]
    ki = jnp.take_along_axis(k.transpose(0, 2, 1, 3), slots[..., None], axis=2)  # [batch, kv_heads, size, d]
    vi = jnp.take_along_axis(v.transpose(0, 2, 1, 3), slots[..., None], axis=2)
    delta = slots[..., :, None] - slots[..., None, :]  # [batch, kv_heads, size(q), size(k)]
    mask = (delta >= 0) & valid[..., None, :]
    if sliding_window is not None:
        mask &= delta < sliding_window
    probs = masked_softmax(grouped_scores(qi, ki), mask[:, :, None])
    out = grouped_values(probs, vi).transpose(0, 1, 3, 2, 4)  # [batch, kv_heads, size, G, d]
    out = jnp.where(valid[..., None, None], out, 0.0)
    target = jnp.where(valid, slots, length)  # rows past p are dropped by the scatter
    full = jnp.zeros((batch, kv_heads, length, group, d), jnp.float32)
    b_idx = jnp.arange(batch)[:, None, None]
    h_idx = jnp.arange(kv_heads)[None, :, None]
    full = full.at[b_idx, h_idx, target].set(out, mode="drop")
    return full.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


def sparse_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, order: jax.Array, count: jax.Array,
                             starts: jax.Array, *, buckets: int = 8, sliding_window: int | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """Attention among each (sequence, KV head)'s important tokens, in the smallest bucket that holds them.

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim]; order int32 [batch, kv_heads,
    length] (from `important_order`); count int32 [batch] (p); starts int32 [batch]. Returns the output [batch,
    length, heads, head_dim] (zero rows for unimportant queries) and the bucket used, int32 [] (index into
    `bucket_sizes(length, buckets)`)."""
    sizes = bucket_sizes(q.shape[1], buckets)
    index = jnp.searchsorted(jnp.asarray(sizes), count.max(), side="left").astype(jnp.int32)
    index = jnp.minimum(index, len(sizes) - 1)
    branches = [functools.partial(_compact_attention, size=s, sliding_window=sliding_window) for s in sizes]
    return jax.lax.switch(index, branches, q, k, v, order, count, starts), index


def restricted_attention(q: jax.Array, k: jax.Array, v: jax.Array, important: jax.Array,
                         starts: jax.Array) -> jax.Array:
    """Dense causal attention in which only important keys are visible and unimportant queries output zero; the
    definition sparse prefill must equal (tests). important: bool [batch, kv_heads, length]."""
    batch, length, heads, d = q.shape
    kv_heads = k.shape[2]
    slots = jnp.arange(length)
    causal = (slots[:, None] >= slots[None, :]) & (slots[None, :] >= starts[:, None, None])  # [batch, q, k]
    mask = causal[:, None] & important[:, :, None, :]  # [batch, kv_heads, q, k]
    to_heads = lambda x: x.transpose(0, 2, 1, 3).astype(jnp.float32)  # [batch, kv_heads, length, d]
    out = grouped_attention(q.astype(jnp.float32), to_heads(k), to_heads(v), mask[:, :, None])
    out = out.reshape(batch, length, kv_heads, heads // kv_heads, d)
    query_ok = important.transpose(0, 2, 1)[..., None, None]  # [batch, length, kv_heads, 1, 1]
    return jnp.where(query_ok, out, 0.0).reshape(q.shape)


def attention_flops(length: int, size: int, heads: int, head_dim: int) -> tuple[int, int]:
    """(dense, sparse) attention FLOPs per sequence of QK^T and PV: 4 * heads * head_dim * rows^2."""
    return 4 * heads * head_dim * length**2, 4 * heads * head_dim * size**2


@renamed_fields(window="buffer_len")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ZipVL(MixedPrecision):
    """ZipVL: per layer (and per compressed block of `buffer_len` decode tokens) the important tokens are the fewest
    holding `tau` of the probe attention mass, ranked by normalized score; prompt attention runs only among them
    (sparse prefill); the cache keeps them at `high_bits` and the rest at `low_bits` (v1), or drops the rest (v2,
    `evict=True`). The shared fields (bits, saliency, probe_ratio, buffer_len, seed, kernel) are `MixedPrecision`'s.

    As the paper: one important set T per layer, shared by its heads (Algorithm 1; `per_head=True` ranks each KV
    head by its own score, with the same count p), and the probes are the 64 most recent and 64 random queries
    (`probes`; None: `probe_ratio` of the prompt, 5% + 5% as ZipCache). `compress=False` keeps a dense cache and
    only sparsifies the prefill (the paper's Video-MME setting); `sparse_prefill=False` only compresses (its GSM8k
    setting).

    Storage follows the paper: p tokens at `high_bits`, the other n - p at `low_bits` (or dropped), whatever p is
    (`ratio_range=None`). Static shapes: the stores have room for the whole block in each subset, and
    `QuantizedKVCache.stored_nbytes()` counts the tokens actually stored, not the room. `ratio_range=(low, high)`
    is an option the paper does not have: it clips p into [ceil(low n), ceil(high n)] for storage only (sparse
    prefill uses p itself), so the stores are allocated for at most ceil(high n) important and n - ceil(low n) other
    tokens (a smaller allocation when memory is reserved up front, at the cost of moving important tokens to low
    bits, or dropping them, whenever p exceeds the room). Earlier releases clipped into (0.2, 0.6) by default.

    `decode_rank`: "query" (the paper) re-selects each decode block by the current query's attention; "window" by
    the attention of every query of the block. `keep_last=False` lets the prompt's last token fall outside T."""

    name: ClassVar[str] = "zipvl"
    tau: float = 0.975
    evict: bool = False
    ratio_range: tuple[float, float] | None = None
    decode_rank: str = "query"
    keep_last: bool = True
    sparse_prefill: bool = True
    compress: bool = True
    per_head: bool = False
    buckets: int = 8
    probes: tuple[int, int] | None = (64, 64)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.tau <= 1:
            raise ZipjaxError(f"tau must lie in (0, 1], got {self.tau}")
        check_ratio_range(self.ratio_range)
        if self.decode_rank not in DECODE_RANKS:
            raise ZipjaxError(f"decode_rank must be one of {DECODE_RANKS}, got {self.decode_rank!r}")
        check_positive("buckets", self.buckets)
        if self.probes is not None and (len(self.probes) != 2 or min(self.probes) < 0 or self.probes[0] < 1):
            raise ZipjaxError(f"probes must be (recent >= 1, random >= 0) query counts or None, got {self.probes!r}")
        if not (self.compress or self.sparse_prefill):
            raise ZipjaxError("ZipVL with compress=False and sparse_prefill=False is the dense cache: use kv=None")

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        if self.compress:
            super().check(config, batch, max_len, prefill_len)
        else:  # a dense cache: nothing is packed, no buffer
            check_block_sizes(batch, max_len, prefill_len)

    @property
    def decode_slots(self) -> int:
        return self.buffer_len if self.compress else 0

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype=None) -> Cache:
        cache = QuantizedKVCache if self.compress else SparsePrefillKVCache
        return cache.init(config, self, batch, max_len, prefill_len, starts, dtype)

    @property
    def subset_bits(self) -> tuple[int, int]:
        return self.high_bits, self.high_bits if self.evict else self.low_bits

    def clip_count(self, n: int) -> tuple[int, int]:
        """The static (lowest, highest) salient count of a block of n tokens: (1, n) without a clip (p >= 1)."""
        if self.ratio_range is None:
            return min(n, 1), n
        low, high = self.ratio_range
        return min(n, math.ceil(low * n - 1e-9)), max(1, min(n, math.ceil(high * n - 1e-9)))

    def split(self, n: int) -> tuple[int, int]:
        """Room for up to the highest salient count and for the rest of the block once at least the lowest count is
        salient (none when evicting); see `clip_count`."""
        lowest, highest = self.clip_count(n)
        return highest, 0 if self.evict else n - lowest

    def _ranking(self, order: jax.Array, mass: jax.Array) -> Ranking:
        count = important_count(mass, self.tau)
        return Ranking(order, count, jnp.clip(count, *self.clip_count(mass.shape[-1])).astype(jnp.int32))

    def _shared(self, score: jax.Array) -> jax.Array:
        """The score T is chosen by: per KV head, or (the paper) the layer's heads summed, broadcast back."""
        if self.per_head:
            return score
        return jnp.broadcast_to(score.sum(axis=1, keepdims=True), score.shape)

    def rank_prompt(self, q, k, starts, layer):
        key = jax.random.fold_in(jax.random.key(self.seed), layer)
        mass, score = prompt_statistics(q, k, starts, method=self.saliency, probe_ratio=self.probe_ratio,
                                        normalize="probe", key=key, probes=self.probes, replace=False)
        return self._ranking(important_order(self._shared(score), self.keep_last), mass)

    def buffer_mass(self, mass, probs):
        """"query": the buffer's mass is the latest query's attention alone (Algorithm 1's a = Softmax(q K^T)[-100:]
        at the step that fills the window); "window": summed over every query of the window."""
        return probs if self.decode_rank == "query" else mass + probs

    def rank_buffer(self, mass):
        score = mass if self.decode_rank == "query" else buffer_score(mass)  # one row: Eq. 8's nnz is 1
        return self._ranking(jnp.argsort(-self._shared(score), axis=-1, stable=True), mass)

    def prefill_attention(self, q, k, v, ranking, starts, sliding_window):
        if not self.sparse_prefill:
            return super().prefill_attention(q, k, v, ranking, starts, sliding_window)
        out, _ = sparse_prefill_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ranking.order,
                                          ranking.count, starts, buckets=self.buckets, sliding_window=sliding_window)
        return out
