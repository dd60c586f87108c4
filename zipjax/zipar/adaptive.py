"""Adaptive-window ZipAR (the paper's v3): start a row early on a drafted first token, verify it as context grows.

Fixed-window ZipAR starts row i once row i-1 is s tokens ahead, for every image alike. The adaptive variant drafts
the first token of row i as soon as row i-1 has `min_lag` tokens, x ~ p_old, then re-verifies it in every later
pass with the extra context row i-1 gained meanwhile: the query at the EOL closing row i-1 is fed again and gives
p_new; the draft is kept with probability min(1, p_new(x) / p_old(x)), else replaced by a draw from the residual
max(0, p_new - p_old), which becomes the new draft, verified in later passes against that residual (the distribution
it was drawn from, as the speculative-sampling lemma requires), until one is kept or row i-1 is complete (the last
check then sees the full context: its outcome is an exact draw from it). Once kept, row i advances one token per
pass like the rows above it, at the lag reached. The schedule therefore differs between samples; everything is still
one jitted loop of static shape: one query slot per row that can be active, padded, scattered per sequence into a
`ScatterKVCache`.

Per pass, a row contributes at most one query:
  active     started, not complete: feed its newest token, sample the next
  draft      not started, row above has >= min_lag tokens: feed the EOL above, draw a draft for (i, 0)
  verify     draft pending: feed the EOL above again, accept or resample
  refresh    complete, last token not yet in the cache: feed it (logits unused)
With min_lag >= W every row starts only once the row above is complete, which is sequential decoding (tested;
a min_lag past W counts as W, since a row never has more than W tokens).
A pass is four steps: plan the queries (which rows act, and how), the forward pass, decide each query's token
(sample, or verify a draft), commit what was decided.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from tqdm import tqdm

from zipjax.deprecation import renamed_fields
from zipjax.emu3.decoding import (
    DecodeResult,
    ImageDecodeSetup,
    ImageInputs,
    for_guidance,
    sample_code,
    sampling_probs,
    visual_logprobs,
)
from zipjax.errors import ZipjaxError
from zipjax.kv.method import Method, as_method
from zipjax.shapes import cache_length
from zipjax.sharding import to_host
from zipjax.transformer import Params, Transformer, output_head
from zipjax.validate import boolean, integer, optional
from zipjax.zipar.acceptance import accept_or_redraw
from zipjax.zipar.cache import ScatterKVCache, prefilled
from zipjax.zipar.compressed import BandKVCache, band_margin, check_band, check_method

ACTIVE, DRAFT, VERIFY, REFRESH = 1, 2, 3, 4


@struct.dataclass
class AdaptiveState:
    passes: jax.Array  # int32 [batch]: forward passes of each image so far (prefill included)
    tokens: jax.Array  # int32 [batch, num_tokens]
    count: jax.Array  # int32 [batch, rows]: committed tokens per row
    pending: jax.Array  # bool [batch, rows]: the row's first token is a draft awaiting verification
    draft: jax.Array  # int32 [batch, rows]: that draft (a code)
    p_old: jax.Array  # float32 [batch, rows, codebook]: the distribution it was drawn from
    attempts: jax.Array  # int32 [batch, rows]: verifications so far (keys each draw apart)
    refreshed: jax.Array  # bool [batch, rows]: a complete row's last token is in the cache
    overflow: jax.Array  # bool []: more rows wanted a query than the static slots allow (a bug if ever set)
    cache: ScatterKVCache | BandKVCache


class Queries(NamedTuple):
    """The queries of one pass, [batch, queries] each: rows with a query first, in row order, then padding."""

    rows: jax.Array  # int32: the image row each query serves
    action: jax.Array  # int32: ACTIVE, DRAFT, VERIFY, REFRESH, or 0 for padding
    source: jax.Array  # int32: the image token fed
    final: jax.Array  # bool: the row above is complete, so the distribution sees all its context


class Decision(NamedTuple):
    """Per query [batch, queries]: the token decided and whether it is committed, plus what a pending draft keeps."""

    target: jax.Array  # int32: the image token the query decides
    code: jax.Array  # int32: the code drawn (fresh) or verified
    commit: jax.Array  # bool
    drawn_from: jax.Array  # float32 [batch, queries, codebook]: the distribution `code` was drawn from (this
    #                        pass's for a fresh draw, the residual for a replacement)
    old: jax.Array  # float32 [batch, queries, codebook]: the pending draft's distribution


def query_slots(cols: int, min_lag: int, rows: int) -> int:
    """Static bound on rows with a query in one pass: the rows in flight are at least min_lag + 1 apart."""
    return min(rows, math.ceil(cols / (min_lag + 1)) + 3)


def _plan_queries(s: AdaptiveState, setup: ImageDecodeSetup, min_lag: int, queries: int
                  ) -> tuple[Queries, jax.Array]:
    """Which rows act in this pass and how; returns the queries and whether more rows wanted one than fit."""
    cols, width = setup.layout.width, setup.layout.width + 1
    row_ids = jnp.arange(setup.layout.height, dtype=jnp.int32)
    count, started = s.count, s.count > 0
    above = jnp.concatenate([jnp.full((setup.batch, 1), cols, jnp.int32), count[:, :-1]], axis=1)  # row 0: none
    action = jnp.zeros_like(count)
    action = jnp.where(started & (count < cols), ACTIVE, action)
    action = jnp.where(~started & ~s.pending & (row_ids > 0) & (above >= min_lag), DRAFT, action)
    action = jnp.where(s.pending, VERIFY, action)
    action = jnp.where((count == cols) & ~s.refreshed, REFRESH, action)
    # feed: the newest token of the row (active), the EOL above (draft/verify), the last token (refresh)
    source = jnp.where(action == ACTIVE, row_ids * width + count - 1,
                       jnp.where(action == REFRESH, row_ids * width + cols - 1, row_ids * width - 1))
    wanted = action > 0
    rows = jnp.argsort(~wanted, axis=1, stable=True)[:, :queries]  # rows with a query first, in row order
    q_action = jnp.take_along_axis(action, rows, axis=1)
    q_source = jnp.where(q_action > 0, jnp.take_along_axis(source, rows, axis=1), 0)
    final = jnp.take_along_axis(above == cols, rows, axis=1)
    overflow = jnp.any(wanted.sum(axis=1) > queries)
    return Queries(rows, q_action, q_source, final), overflow


def _forward(params: Params, s: AdaptiveState, q: Queries, inputs: ImageInputs, setup: ImageDecodeSetup,
             head: jax.Array) -> tuple[jax.Array, ScatterKVCache | BandKVCache]:
    """The pass's forward: guided visual log-probabilities [batch, queries, codebook] and the updated cache."""
    fed = for_guidance(jnp.take_along_axis(s.tokens, q.source, axis=1), setup.cache_batch)
    slots = for_guidance(setup.bucket + q.source, setup.cache_batch)
    positions = jnp.maximum(slots - s.cache.starts[:, None], 0)
    cache = s.cache.at(slots, for_guidance(q.action > 0, setup.cache_batch))
    logits, cache = Transformer(setup.config).apply({"params": params}, fed, positions, cache, head=head)
    return visual_logprobs(logits, inputs.knobs, setup.batch), cache


def verify_draft(key: jax.Array, draft: jax.Array, p_old: jax.Array, p_new: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pending draft (int32 []) drawn from p_old [codebook], verified against p_new [codebook]: (the token, kept,
    the distribution the token was drawn from if it was replaced: the residual, the next check's p_old)."""
    token, accepted, residual = accept_or_redraw(key, draft[None], p_old[None], p_new[None])
    return token[0], accepted[0], residual[0]


def _decide(s: AdaptiveState, q: Queries, visual: jax.Array, inputs: ImageInputs, setup: ImageDecodeSetup
            ) -> Decision:
    """Each query's token: a fresh draw (active rows, new drafts; the sequential sampler's key for that token) or a
    verification of the pending draft (a key per (token, attempt)); committed when the row is active, or when the
    draft is final or accepted."""
    width = setup.layout.width + 1
    knobs, key = inputs.knobs, inputs.key
    probs = sampling_probs(visual, knobs, setup.mode)
    q_count = jnp.take_along_axis(s.count, q.rows, axis=1)
    target = jnp.where(q.action == ACTIVE, q.rows * width + q_count, q.rows * width)
    attempt = jnp.take_along_axis(s.attempts, q.rows, axis=1)
    batch_rows = jnp.broadcast_to(jnp.arange(setup.batch, dtype=jnp.int32)[:, None], target.shape)
    fresh = jax.vmap(jax.vmap(lambda v, n, r: sample_code(v, key, n, r, knobs, setup.mode)))(visual, target,
                                                                                             batch_rows)
    keys = jax.vmap(jax.vmap(lambda n, a: jax.random.fold_in(jax.random.fold_in(key, n), a)))(target, attempt)
    old = jnp.take_along_axis(s.p_old, q.rows[:, :, None], axis=1)
    draft = jnp.take_along_axis(s.draft, q.rows, axis=1)
    verified, accepted, residual = jax.vmap(jax.vmap(verify_draft))(keys, draft, old, probs)
    valid = q.action > 0
    commit = valid & ((q.action == ACTIVE) | ((q.action == DRAFT) & q.final)
                      | ((q.action == VERIFY) & (accepted | q.final)))
    code = jnp.where(q.action == VERIFY, verified, fresh)
    drawn_from = jnp.where((q.action == VERIFY)[..., None] & ~accepted[..., None], residual, probs)
    return Decision(target, code, commit, drawn_from, old)


def _commit(s: AdaptiveState, q: Queries, d: Decision, cache: ScatterKVCache | BandKVCache, overflow: jax.Array,
            setup: ImageDecodeSetup) -> AdaptiveState:
    """Write committed tokens, advance row counts, keep uncommitted drafts pending with their distribution."""
    layout = setup.layout
    b = jnp.arange(setup.batch)[:, None]
    valid = q.action > 0
    write = jnp.where(d.commit, d.target, layout.num_tokens)  # out of range: dropped
    row = jnp.where(valid, q.rows, layout.height)  # padding queries update nothing
    keep_pending = valid & (q.action != ACTIVE) & (q.action != REFRESH) & ~d.commit
    draft = jnp.take_along_axis(s.draft, q.rows, axis=1)
    checked = valid & ((q.action == DRAFT) | (q.action == VERIFY))
    return AdaptiveState(
        passes=s.passes + (~jnp.all(s.count == layout.width, axis=1)).astype(jnp.int32),
        tokens=s.tokens.at[b, write].set(d.code + layout.visual_offset, mode="drop"),
        count=s.count.at[b, row].add(d.commit.astype(jnp.int32), mode="drop"),
        pending=s.pending.at[b, row].set(keep_pending, mode="drop"),
        draft=s.draft.at[b, row].set(jnp.where(keep_pending, d.code, draft), mode="drop"),
        p_old=s.p_old.at[b, row].set(jnp.where(keep_pending[..., None], d.drawn_from, d.old), mode="drop"),
        attempts=s.attempts.at[b, row].add(checked.astype(jnp.int32), mode="drop"),
        refreshed=s.refreshed.at[b, row].max(valid & (q.action == REFRESH), mode="drop"),
        overflow=s.overflow | overflow, cache=cache)


@functools.partial(jax.jit, static_argnames=("setup",))
def _initial_state(tokens: jax.Array, cache: ScatterKVCache | BandKVCache, *, setup: ImageDecodeSetup) -> AdaptiveState:
    """After the prefill: row 0 holds its first token, nothing is drafted yet."""
    batch, rows, codebook = setup.batch, setup.layout.height, setup.layout.codebook_size
    zeros = lambda dtype, *shape: jnp.zeros((batch, *shape), dtype)
    return AdaptiveState(passes=jnp.ones((batch,), jnp.int32), tokens=tokens,
                         count=zeros(jnp.int32, rows).at[:, 0].set(1), pending=zeros(bool, rows),
                         draft=zeros(jnp.int32, rows), p_old=zeros(jnp.float32, rows, codebook),
                         attempts=zeros(jnp.int32, rows), refreshed=zeros(bool, rows),
                         overflow=jnp.zeros((), bool), cache=cache)


@functools.partial(jax.jit, static_argnames=("setup", "min_lag", "queries"), donate_argnames=("state",))
def adaptive_until(params: Params, state: AdaptiveState, stop: jax.Array, inputs: ImageInputs, *,
                   setup: ImageDecodeSetup, min_lag: int, queries: int) -> AdaptiveState:
    """Run passes until every image is complete or `stop` passes have run in this call."""
    head = output_head(params, setup.config, setup.layout.vocab_range)

    def one_pass(carry):
        s, done = carry
        q, overflow = _plan_queries(s, setup, min_lag, queries)
        visual, cache = _forward(params, s, q, inputs, setup, head)
        decision = _decide(s, q, visual, inputs, setup)
        return _commit(s, q, decision, cache, overflow, setup), done + 1

    def keep_going(carry):
        s, done = carry
        return (done < stop) & ~jnp.all(s.count == setup.layout.width)

    state = state.replace(cache=state.cache.at(jnp.zeros((queries,), jnp.int32), jnp.zeros((queries,), bool)))
    state, _ = jax.lax.while_loop(keep_going, one_pass, (state, jnp.zeros((), jnp.int32)))
    return state


@renamed_fields(min_window="min_lag")
@dataclasses.dataclass(frozen=True)
class AdaptiveWindow:
    """Adaptive ZipAR: a row's first token is drafted once the row above has `min_lag` tokens (at most the image's
    width: then row after row), and verified as that row grows; `kernel` and `kv` as in FixedWindow. `min_window=`
    is the deprecated name of `min_lag` (one release)."""

    min_lag: int = 4
    kernel: bool | None = None
    kv: Method | None = None

    def __post_init__(self):
        object.__setattr__(self, "min_lag", integer(self.min_lag, "AdaptiveWindow min_lag", lo=1))
        optional(boolean, self.kernel, "AdaptiveWindow kernel")
        check_method(as_method(self.kv), "AdaptiveWindow", self.kernel)

    def band(self, setup: ImageDecodeSetup) -> int:
        """Full-precision entries of the compressed cache (0 without `kv`): the rows that can be in flight, plus a
        block (KIVI: its residual window; zipjax.zipar.compressed.band_margin)."""
        cols, rows = setup.layout.width, setup.layout.height
        queries = query_slots(cols, min(self.min_lag, cols), rows)
        return 0 if self.kv is None else (queries + 1) * (cols + 1) + sum(band_margin(self.kv))

    def run(self, model, setup: ImageDecodeSetup, inputs: ImageInputs, progress: bool) -> DecodeResult:
        """Prefill, then adaptive passes until every image is complete. Every pass commits a token (the first
        unfinished row is active, or its first token's draft is final), so an image takes at most rows * cols
        passes; past that budget the loop stops with an error instead of spinning."""
        layout = setup.layout
        rows, cols = layout.height, layout.width
        min_lag = min(self.min_lag, cols)
        queries = query_slots(cols, min_lag, rows)
        tokens, cache = prefilled(model, setup, inputs, cache_length(setup.bucket + layout.num_tokens + 1),
                                  self.kernel, self.kv, self.band(setup))
        state = _initial_state(tokens, cache, setup=setup)
        chunk, budget = max(8, cols), rows * cols
        done_rows, passes = 0, 0
        with tqdm(total=rows, desc=f"adaptive ZipAR (min lag {min_lag})", unit="row",
                  disable=not progress) as bar:
            while done_rows < rows:
                if passes >= budget:
                    raise ZipjaxError(f"internal error: adaptive ZipAR ran {passes} passes without finishing a "
                                      f"{rows}x{cols}-code image")
                state = adaptive_until(model.params, state, jnp.int32(chunk), inputs, setup=setup,
                                       min_lag=min_lag, queries=queries)
                passes += chunk
                done_rows = int(to_host(jnp.min(jnp.sum(state.count == cols, axis=1))))
                bar.update(done_rows - bar.n)
        if bool(to_host(state.overflow)):
            raise ZipjaxError("internal error: adaptive ZipAR had more rows in flight than query slots")
        check_band(state.cache)
        return DecodeResult(tokens=to_host(state.tokens), passes=to_host(state.passes))
