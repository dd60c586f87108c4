"""Speculative Jacobi Decoding (Teng et al., ICLR 2025), ZipAR's training-free peer, in the same pipeline.

SJD keeps a window of drafted future tokens in raster order and, in every pass, feeds the newest committed token
plus the drafts. Each pass yields a distribution for every window position. The drafts are verified left to right
with the speculative acceptance rule (kept with probability min(1, p_new / p_old), else replaced by a draw from the
residual, which ends the pass); if every draft is kept, one more token is drawn from the last distribution. The
positions after the committed ones are re-drafted from this pass's distributions (the Jacobi step) and the window
is topped up with uniformly random visual tokens (p_old uniform). End-of-line positions hold EOL and always pass.
Every committed token is an exact draw from the model's distribution given the tokens before it, as in sequential
decoding; only the number of passes changes.

Sequences advance at their own pace: each has its own cursor and writes its window into a `ScatterKVCache` at
cursor-relative slots; stale drafts beyond a cursor are overwritten by the next window before anything attends to
them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from tqdm import tqdm

from zipjax.config import ModelConfig
from zipjax.emu3.image import ImageKnobs, Layout, visual_logprobs
from zipjax.errors import ZipjaxError
from zipjax.generate import CACHE_ROUNDING, _round_up
from zipjax.sampling import SamplingMode
from zipjax.transformer import Params, Transformer, output_head
from zipjax.zipar.acceptance import accept_or_resample
from zipjax.zipar.adaptive import sampling_probs
from zipjax.zipar.cache import ScatterKVCache
from zipjax.zipar.decode import initial_tokens, zipar_prefill


@struct.dataclass
class SJDState:
    passes: jax.Array  # int32 [batch]: forward passes per image (prefill included)
    cursor: jax.Array  # int32 [batch]: image tokens committed (the next one to decide)
    tokens: jax.Array  # int32 [batch, num_tokens + window]: committed tokens, then the drafts after the cursor
    p_old: jax.Array  # float32 [batch, num_tokens + window, codebook]: each draft's distribution
    cache: ScatterKVCache
    key: jax.Array
    step: jax.Array  # int32 []: passes run (keys)


def _is_eol(index: jax.Array, layout: Layout) -> jax.Array:
    return (index % (layout.width + 1)) == layout.width


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode", "bucket", "window"),
                   donate_argnames=("state",))
def sjd_until(params: Params, state: SJDState, stop: jax.Array, knobs: ImageKnobs, *, config: ModelConfig,
              layout: Layout, batch: int, mode: SamplingMode, bucket: int, window: int) -> SJDState:
    total = layout.num_tokens
    codebook = layout.codebook_size
    offsets = jnp.arange(window, dtype=jnp.int32)
    head = output_head(params, config, layout.vocab_range)

    def one_pass(carry):
        s, done = carry
        halves = s.cache.batch // batch
        finished = s.cursor >= total
        # inputs: the newest committed token (index cursor - 1), then the drafts for cursor .. cursor + window - 2
        source = s.cursor[:, None] - 1 + offsets[None, :]  # [batch, window]
        valid = (source < total) & ~finished[:, None]
        fed = jnp.take_along_axis(s.tokens, jnp.clip(source, 0, total - 1), axis=1)
        slots = jnp.tile(bucket + source, (halves, 1))
        positions = jnp.maximum(slots - s.cache.starts[:, None], 0)
        cache = s.cache.at(slots, jnp.tile(valid, (halves, 1)))
        logits, cache = Transformer(config).apply({"params": params}, jnp.tile(fed, (halves, 1)), positions, cache,
                                                  head=head)
        p_new = sampling_probs(visual_logprobs(logits, knobs, batch), knobs, mode)  # [batch, window, K]
        target = s.cursor[:, None] + offsets[None, :]  # the image token each output decides
        eol = _is_eol(target, layout)

        key = jax.random.fold_in(s.key, s.step)
        keys = jax.random.split(key, batch * window).reshape(batch, window)
        draft = jnp.take_along_axis(s.tokens, jnp.clip(target, 0, total + window - 1), axis=1) - layout.visual_offset
        draft = jnp.clip(draft, 0, codebook - 1)
        old = jnp.take_along_axis(s.p_old, jnp.clip(target, 0, total + window - 1)[..., None], axis=1)
        decided, accepted = jax.vmap(jax.vmap(
            lambda k, d, po, pn: jax.tree.map(lambda x: x[0], accept_or_resample(k, d[None], po[None], pn[None]))
        ))(keys, draft, old, p_new)
        last = offsets[None, :] == window - 1  # no draft there: a plain draw
        fresh = jax.vmap(jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)).astype(jnp.int32)))(keys, p_new)
        decided = jnp.where(last, fresh, decided)
        accepted = (accepted | eol) & ~last
        # commit the accepted prefix and the first decided-but-rejected (or the final fresh) token
        run = jnp.cumprod(accepted.astype(jnp.int32), axis=1)  # 1 while every earlier draft was accepted
        n_accepted = run.sum(axis=1)
        commit = (offsets[None, :] <= n_accepted[:, None]) & (target < total) & ~finished[:, None]
        value = jnp.where(eol, layout.eol, decided + layout.visual_offset)
        # re-draft every position after the committed ones from this pass's distributions (Jacobi step)
        redraft = jax.vmap(jax.vmap(lambda k, p: jax.random.categorical(jax.random.fold_in(k, 1), jnp.log(p))))(
            keys, p_new).astype(jnp.int32)
        redraft = jnp.where(eol, layout.eol, redraft + layout.visual_offset)
        b = jnp.arange(batch)[:, None]
        new_tokens = jnp.where(commit, value, jnp.where(target < total, redraft, 0))
        write = jnp.where(target < total, target, total + window)  # out of range: dropped
        tokens = s.tokens.at[b, write].set(new_tokens, mode="drop")
        p_old = s.p_old.at[b, write].set(p_new, mode="drop")
        cursor = jnp.minimum(s.cursor + jnp.where(finished, 0, n_accepted + 1), total)
        # positions past this pass's outputs (the next window reaches up to window - 1 of them): uniform drafts
        fill = s.cursor[:, None] + window + offsets[None, :]
        fill_keys = jax.random.split(jax.random.fold_in(key, 2), batch * window).reshape(batch, window)
        random_codes = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, codebook)))(fill_keys)
        fill_value = jnp.where(_is_eol(fill, layout), layout.eol, random_codes + layout.visual_offset)
        fill_write = jnp.where((fill < total) & ~finished[:, None], fill, total + window)
        tokens = tokens.at[b, fill_write].set(fill_value, mode="drop")
        p_old = p_old.at[b, fill_write].set(jnp.full((codebook,), 1.0 / codebook), mode="drop")
        passes = s.passes + (~finished).astype(jnp.int32)
        new = SJDState(passes=passes, cursor=cursor, tokens=tokens, p_old=p_old, cache=cache, key=s.key,
                       step=s.step + 1)
        return new, done + 1

    def keep_going(carry):
        s, done = carry
        return (done < stop) & ~jnp.all(s.cursor >= total)

    state = state.replace(cache=state.cache.at(jnp.zeros((window,), jnp.int32), jnp.zeros((window,), bool)))
    state, _ = jax.lax.while_loop(keep_going, one_pass, (state, jnp.zeros((), jnp.int32)))
    return state


@functools.lru_cache(maxsize=16)
def _cache_initializer(config: ModelConfig, batch: int, max_len: int):
    return jax.jit(lambda starts: ScatterKVCache.init(config, batch, max_len, starts))


def run_sjd(model, prompt: jax.Array, starts: jax.Array, key: jax.Array, knobs: ImageKnobs, static: dict,
            bucket: int, window: int, progress: bool):
    """Prefill, then SJD passes until every image is complete. Returns (tokens [batch, n], passes [batch])."""
    if window < 2:
        raise ZipjaxError(f"Speculative Jacobi Decoding needs a window of at least 2 tokens, got {window}")
    layout: Layout = static["layout"]
    batch, total, codebook = static["batch"], layout.num_tokens, layout.codebook_size
    cache_len = _round_up(bucket + total + window + 1, CACHE_ROUNDING)
    cache = _cache_initializer(static["config"], prompt.shape[0], cache_len)(starts)
    tokens = jnp.asarray(initial_tokens(batch, layout))
    first = zipar_prefill(model.params, prompt, starts, cache, tokens, key, knobs, **static)
    # drafts for the first window: uniform random visual tokens (EOLs where the layout has them)
    index = jnp.arange(total + window)
    random_codes = jax.random.randint(jax.random.fold_in(key, 0x7FFFFFFF), (batch, total + window), 0, codebook)
    drafts = jnp.where(_is_eol(index, layout), layout.eol, random_codes + layout.visual_offset)
    buffer = jnp.concatenate([first.tokens, jnp.zeros((batch, window), jnp.int32)], axis=1)
    buffer = jnp.where(index[None, :] >= 1, drafts, buffer)
    state = SJDState(passes=jnp.ones((batch,), jnp.int32), cursor=jnp.ones((batch,), jnp.int32), tokens=buffer,
                     p_old=jnp.full((batch, total + window, codebook), 1.0 / codebook, jnp.float32),
                     cache=first.cache, key=key, step=jnp.zeros((), jnp.int32))
    with tqdm(total=total, desc=f"SJD (window {window})", unit="token", disable=not progress) as bar:
        while True:
            state = sjd_until(model.params, state, jnp.int32(64), knobs, bucket=bucket, window=window, **static)
            done = int(jnp.min(state.cursor))
            bar.update(done - bar.n)
            if done >= total:
                break
    return state.tokens[:, :total], jax.device_get(state.passes)
