"""Adaptive-window ZipAR (the paper's v3): start a row early on a drafted first token, verify it as context grows.

Fixed-window ZipAR starts row i once row i-1 is s tokens ahead, for every image alike. The adaptive variant drafts
the first token of row i as soon as row i-1 has `min_window` tokens, x ~ p_old, then re-verifies it in every later
pass with the extra context row i-1 gained meanwhile: the query at the EOL closing row i-1 is fed again and gives
p_new; the draft is kept with probability min(1, p_new(x) / p_old(x)), else replaced by a draw from the residual
max(0, p_new - p_old), which becomes the new draft (p_old := p_new), until one is kept or row i-1 is complete (the
last check then sees the full context, so its outcome is an exact draw). Once kept, row i advances one token per
pass like the rows above it, at the lag reached. The schedule therefore differs between samples; everything is still
one jitted loop of static shape: one query slot per row that can be active, padded, scattered per sequence into a
`ScatterKVCache`.

Per pass, a row contributes at most one query:
  active     started, not complete: feed its newest token, sample the next
  draft      not started, row above has >= min_window tokens: feed the EOL above, draw a draft for (i, 0)
  verify     draft pending: feed the EOL above again, accept or resample
  refresh    complete, last token not yet in the cache: feed it (logits unused)
With min_window >= W every row starts only once the row above is complete, which is sequential decoding (tested).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from tqdm import tqdm

from zipjax.config import ModelConfig
from zipjax.emu3.image import ImageKnobs, Layout, sample_code, visual_logprobs
from zipjax.errors import ZipjaxError
from zipjax.generate import CACHE_ROUNDING, _round_up
from zipjax.sampling import NEG_INF, SamplingMode, filter_logits
from zipjax.transformer import Params, Transformer, output_head
from zipjax.zipar.acceptance import accept_or_resample
from zipjax.zipar.cache import ScatterKVCache
from zipjax.zipar.decode import initial_tokens, zipar_prefill

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
    cache: ScatterKVCache
    key: jax.Array


def query_slots(cols: int, min_window: int, rows: int) -> int:
    """Static bound on rows with a query in one pass: the rows in flight are at least min_window + 1 apart."""
    return min(rows, math.ceil(cols / (min_window + 1)) + 3)


def sampling_probs(visual: jax.Array, knobs: ImageKnobs, mode: SamplingMode) -> jax.Array:
    """The distribution the sequential sampler draws from, as probabilities [..., codebook] (greedy: one-hot)."""
    if mode.greedy:
        return jax.nn.one_hot(jnp.argmax(visual, axis=-1), visual.shape[-1], dtype=jnp.float32)
    logits = visual / knobs.temperature
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    if mode.static_top_k is not None and mode.static_top_k < shape[-1]:
        kth = jax.lax.top_k(flat, mode.static_top_k)[0][:, -1:]
        flat = jnp.where(flat < kth, NEG_INF, flat)
    flat = filter_logits(flat, None, knobs.top_p if mode.top_p else None)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode", "bucket", "min_window",
                                             "queries"), donate_argnames=("state",))
def adaptive_until(params: Params, state: AdaptiveState, stop: jax.Array, knobs: ImageKnobs, *, config: ModelConfig,
                   layout: Layout, batch: int, mode: SamplingMode, bucket: int, min_window: int,
                   queries: int) -> AdaptiveState:
    """Run passes until every image is complete or `stop` passes have run in this call."""
    rows, cols, width = layout.height, layout.width, layout.width + 1
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    head = output_head(params, config, layout.vocab_range)

    def one_pass(carry):
        s, done = carry
        count, started = s.count, s.count > 0
        above = jnp.concatenate([jnp.full((batch, 1), cols, jnp.int32), count[:, :-1]], axis=1)  # row 0: none
        complete_above = above == cols
        action = jnp.zeros((batch, rows), jnp.int32)
        action = jnp.where(started & (count < cols), ACTIVE, action)
        action = jnp.where(~started & ~s.pending & (row_ids > 0) & (above >= min_window), DRAFT, action)
        action = jnp.where(s.pending, VERIFY, action)
        action = jnp.where((count == cols) & ~s.refreshed, REFRESH, action)
        # feed: the newest token of the row (active), the EOL above (draft/verify), the last token (refresh)
        source = jnp.where(action == ACTIVE, row_ids * width + count - 1,
                           jnp.where(action == REFRESH, row_ids * width + cols - 1, row_ids * width - 1))
        wanted = action > 0
        order = jnp.argsort(~wanted, axis=1, stable=True)[:, :queries]  # rows with a query first, in row order
        q_rows = order  # [batch, queries]
        q_action = jnp.take_along_axis(action, q_rows, axis=1)
        q_valid = q_action > 0
        q_source = jnp.where(q_valid, jnp.take_along_axis(source, q_rows, axis=1), 0)
        overflow = s.overflow | jnp.any(wanted.sum(axis=1) > queries)

        halves = s.cache.batch // batch  # 2 with classifier-free guidance: both halves follow one schedule
        fed = jnp.tile(jnp.take_along_axis(s.tokens, q_source, axis=1), (halves, 1))
        slots = jnp.tile(bucket + q_source, (halves, 1))
        positions = jnp.maximum(slots - s.cache.starts[:, None], 0)
        cache = s.cache.at(slots, jnp.tile(q_valid, (halves, 1)))
        logits, cache = Transformer(config).apply({"params": params}, fed, positions, cache,
                                                  head=head)
        visual = visual_logprobs(logits, knobs, batch)  # [batch, q, codebook]
        probs = sampling_probs(visual, knobs, mode)

        # the image token each query decides; first draws use the sequential sampler's key for that token,
        # verifications a key per (token, attempt)
        q_count = jnp.take_along_axis(count, q_rows, axis=1)
        target = jnp.where(q_action == ACTIVE, q_rows * width + q_count, q_rows * width)
        attempt = jnp.take_along_axis(s.attempts, q_rows, axis=1)
        batch_rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], target.shape)
        fresh = jax.vmap(jax.vmap(lambda v, n, r: sample_code(v, s.key, n, r, knobs, mode)))(visual, target,
                                                                                            batch_rows)
        keys = jax.vmap(jax.vmap(lambda n, a: jax.random.fold_in(jax.random.fold_in(s.key, n), a)))(target,
                                                                                                    attempt)
        old = jnp.take_along_axis(s.p_old, q_rows[:, :, None], axis=1)
        draft = jnp.take_along_axis(s.draft, q_rows, axis=1)
        verified, accepted = jax.vmap(jax.vmap(
            lambda k, d, po, pn: jax.tree.map(lambda x: x[0], accept_or_resample(k, d[None], po[None], pn[None]))
        ))(keys, draft, old, probs)
        final = jnp.take_along_axis(complete_above, q_rows, axis=1)  # p_new saw the whole row above

        commit = q_valid & ((q_action == ACTIVE) | ((q_action == DRAFT) & final)
                            | ((q_action == VERIFY) & (accepted | final)))
        code = jnp.where(q_action == VERIFY, verified, fresh)
        b = jnp.arange(batch)[:, None]
        write = jnp.where(commit, target, layout.num_tokens)  # out of range: dropped
        tokens = s.tokens.at[b, write].set(code + layout.visual_offset, mode="drop")
        row = jnp.where(q_valid, q_rows, rows)  # padding queries update nothing
        new_count = count.at[b, row].add(commit.astype(jnp.int32), mode="drop")
        keep_pending = q_valid & (q_action != ACTIVE) & (q_action != REFRESH) & ~commit
        pending = s.pending.at[b, row].set(keep_pending, mode="drop")
        new_draft = s.draft.at[b, row].set(jnp.where(keep_pending, code, draft), mode="drop")
        p_old = s.p_old.at[b, row].set(jnp.where(keep_pending[..., None], probs, old), mode="drop")
        checked = q_valid & ((q_action == DRAFT) | (q_action == VERIFY))
        attempts = s.attempts.at[b, row].add(checked.astype(jnp.int32), mode="drop")
        refreshed = s.refreshed.at[b, row].max(q_valid & (q_action == REFRESH), mode="drop")
        passes = s.passes + (~jnp.all(count == cols, axis=1)).astype(jnp.int32)
        state = AdaptiveState(passes=passes, tokens=tokens, count=new_count, pending=pending, draft=new_draft,
                              p_old=p_old, attempts=attempts, refreshed=refreshed, overflow=overflow, cache=cache,
                              key=s.key)
        return state, done + 1

    def keep_going(carry):
        s, done = carry
        return (done < stop) & ~jnp.all(s.count == cols)

    state = state.replace(cache=state.cache.at(jnp.zeros((queries,), jnp.int32), jnp.zeros((queries,), bool)))
    state, _ = jax.lax.while_loop(keep_going, one_pass, (state, jnp.zeros((), jnp.int32)))
    return state


@functools.lru_cache(maxsize=16)
def _cache_initializer(config: ModelConfig, batch: int, max_len: int, use_kernel: bool):
    return jax.jit(lambda starts: ScatterKVCache.init(config, batch, max_len, starts, use_kernel))


def run_adaptive(model, prompt: jax.Array, starts: jax.Array, key: jax.Array, knobs: ImageKnobs, static: dict,
                 bucket: int, min_window: int, progress: bool, use_kernel: bool = False):
    """Prefill, then adaptive passes until every image is complete. Returns (tokens [batch, n], passes [batch])."""
    layout: Layout = static["layout"]
    batch = static["batch"]
    rows, cols = layout.height, layout.width
    cache_len = _round_up(bucket + layout.num_tokens + 1, CACHE_ROUNDING)
    cache = _cache_initializer(static["config"], prompt.shape[0], cache_len, use_kernel)(starts)
    tokens = jnp.asarray(initial_tokens(batch, layout))
    first = zipar_prefill(model.params, prompt, starts, cache, tokens, key, knobs, **static)
    state = AdaptiveState(
        passes=jnp.ones((batch,), jnp.int32), tokens=first.tokens,
        count=jnp.zeros((batch, rows), jnp.int32).at[:, 0].set(1), pending=jnp.zeros((batch, rows), bool),
        draft=jnp.zeros((batch, rows), jnp.int32),
        p_old=jnp.zeros((batch, rows, layout.codebook_size), jnp.float32),
        attempts=jnp.zeros((batch, rows), jnp.int32), refreshed=jnp.zeros((batch, rows), bool),
        overflow=jnp.zeros((), bool), cache=first.cache, key=key)
    queries = query_slots(cols, min_window, rows)
    chunk = max(8, cols)
    with tqdm(total=rows, desc=f"adaptive ZipAR (min window {min_window})", unit="row", disable=not progress) as bar:
        while True:
            state = adaptive_until(model.params, state, jnp.int32(chunk), knobs, bucket=bucket,
                                   min_window=min_window, queries=queries, **static)
            done_rows = int(jnp.min(jnp.sum(state.count == cols, axis=1)))
            bar.update(done_rows - bar.n)
            if done_rows == rows:
                break
    if bool(state.overflow):
        raise ZipjaxError("internal error: adaptive ZipAR had more rows in flight than query slots")
    return state.tokens, jax.device_get(state.passes)
