"""Speculative Jacobi Decoding (Teng et al., ICLR 2025), ZipAR's training-free peer, in the same pipeline.

SJD keeps a Jacobi window (`SJD.jacobi_window`; `window` in this module) of drafted future tokens in raster order and,
in every pass, feeds the newest committed token plus the drafts. Each pass yields a distribution for every window
position. The drafts are verified left to right with the speculative acceptance rule (kept with probability
min(1, p_new / p_old), else replaced by a draw from the residual, which ends the pass); if every draft is kept, one
more token is drawn from the last distribution. The positions after the committed ones are re-drafted from this pass's
distributions (the Jacobi step) and the window is topped up with uniformly random visual tokens (p_old uniform).
End-of-line positions hold EOL and always pass. Every committed token is an exact draw from the model's distribution
given the tokens before it, as in sequential decoding; only the number of passes changes.

Sequences advance at their own pace: each has its own cursor and writes its window into a `ScatterKVCache` at
cursor-relative slots; stale drafts beyond a cursor are overwritten by the next window before anything attends to
them. A pass is three steps: the forward over the window, the verification of its drafts, the commit (accepted
tokens, re-drafts, random drafts for the positions the next window reaches).
"""

from __future__ import annotations

import dataclasses
import functools
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
    sampling_probs,
    visual_logprobs,
)
from zipjax.errors import ZipjaxError
from zipjax.kv.method import Method, as_method
from zipjax.shapes import cache_length
from zipjax.sharding import to_host
from zipjax.transformer import Params, Transformer, output_head
from zipjax.validate import boolean, integer, optional
from zipjax.zipar.acceptance import accept_or_resample
from zipjax.zipar.cache import ScatterKVCache, prefilled
from zipjax.zipar.compressed import BandKVCache, band_margin, check_band, check_method


@struct.dataclass
class SJDState:
    passes: jax.Array  # int32 [batch]: forward passes per image (prefill included)
    cursor: jax.Array  # int32 [batch]: image tokens committed (the next one to decide)
    tokens: jax.Array  # int32 [batch, num_tokens + window]: committed tokens, then the drafts after the cursor
    p_old: jax.Array  # float32 [batch, num_tokens + window, codebook]: each draft's distribution
    cache: ScatterKVCache | BandKVCache
    step: jax.Array  # int32 []: passes run (keys)


class Verdict(NamedTuple):
    """Per window position [batch, window]: the token if committed, the re-draft otherwise."""

    value: jax.Array  # int32: the decided token (EOL at end-of-line positions)
    accepted: jax.Array  # int32 [batch]: drafts accepted before the first rejection
    redraft: jax.Array  # int32: a new draft from this pass's distribution (the Jacobi step)


def _forward(params: Params, s: SJDState, inputs: ImageInputs, setup: ImageDecodeSetup, window: int,
             head: jax.Array) -> tuple[jax.Array, ScatterKVCache | BandKVCache]:
    """Feed the newest committed token and the drafts after it; the sampling distribution of every window
    position, float32 [batch, window, codebook], and the updated cache."""
    total = setup.layout.num_tokens
    source = s.cursor[:, None] - 1 + jnp.arange(window, dtype=jnp.int32)[None, :]  # [batch, window]
    valid = (source < total) & (s.cursor < total)[:, None]
    fed = jnp.take_along_axis(s.tokens, jnp.clip(source, 0, total - 1), axis=1)
    slots = for_guidance(setup.bucket + source, setup.cache_batch)
    positions = jnp.maximum(slots - s.cache.starts[:, None], 0)
    settled = for_guidance(setup.bucket + s.cursor, setup.cache_batch)  # drafts from the cursor on are rewritten
    cache = s.cache.at(slots, for_guidance(valid, setup.cache_batch), settled)
    logits, cache = Transformer(setup.config).apply({"params": params}, for_guidance(fed, setup.cache_batch),
                                                    positions, cache, head=head)
    return sampling_probs(visual_logprobs(logits, inputs.knobs, setup.batch), inputs.knobs, setup.mode), cache


def _verify(s: SJDState, p_new: jax.Array, keys: jax.Array, setup: ImageDecodeSetup, window: int) -> Verdict:
    """Verify the drafts left to right; the last position, which had no draft, is a plain draw."""
    layout = setup.layout
    total, codebook = layout.num_tokens, layout.codebook_size
    offsets = jnp.arange(window, dtype=jnp.int32)
    target = s.cursor[:, None] + offsets[None, :]  # the image token each output decides
    eol = layout.is_eol(target)
    index = jnp.clip(target, 0, total + window - 1)
    draft = jnp.clip(jnp.take_along_axis(s.tokens, index, axis=1) - layout.visual_offset, 0, codebook - 1)
    old = jnp.take_along_axis(s.p_old, index[..., None], axis=1)
    decided, accepted = jax.vmap(jax.vmap(
        lambda k, d, po, pn: jax.tree.map(lambda x: x[0], accept_or_resample(k, d[None], po[None], pn[None]))
    ))(keys, draft, old, p_new)
    last = offsets[None, :] == window - 1
    fresh = jax.vmap(jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)).astype(jnp.int32)))(keys, p_new)
    decided = jnp.where(last, fresh, decided)
    accepted = (accepted | eol) & ~last
    n_accepted = jnp.cumprod(accepted.astype(jnp.int32), axis=1).sum(axis=1)
    redraft = jax.vmap(jax.vmap(lambda k, p: jax.random.categorical(jax.random.fold_in(k, 1), jnp.log(p))))(
        keys, p_new).astype(jnp.int32)
    return Verdict(value=jnp.where(eol, layout.eol, decided + layout.visual_offset), accepted=n_accepted,
                   redraft=jnp.where(eol, layout.eol, redraft + layout.visual_offset))


def _commit(s: SJDState, p_new: jax.Array, verdict: Verdict, cache: ScatterKVCache | BandKVCache, key: jax.Array,
            setup: ImageDecodeSetup, window: int) -> SJDState:
    """Commit the accepted prefix and the first decided-but-rejected (or the final fresh) token; re-draft every
    later position; give positions past this pass's outputs (the next window reaches window - 1 of them) uniformly
    random drafts."""
    layout = setup.layout
    total, codebook = layout.num_tokens, layout.codebook_size
    batch = setup.batch
    offsets = jnp.arange(window, dtype=jnp.int32)[None, :]
    finished = s.cursor >= total
    target = s.cursor[:, None] + offsets
    commit = (offsets <= verdict.accepted[:, None]) & (target < total) & ~finished[:, None]
    b = jnp.arange(batch)[:, None]
    new_tokens = jnp.where(commit, verdict.value, jnp.where(target < total, verdict.redraft, 0))
    write = jnp.where(target < total, target, total + window)  # out of range: dropped
    tokens = s.tokens.at[b, write].set(new_tokens, mode="drop")
    p_old = s.p_old.at[b, write].set(p_new, mode="drop")
    fill = s.cursor[:, None] + window + offsets
    fill_keys = jax.random.split(jax.random.fold_in(key, 2), batch * window).reshape(batch, window)
    random_codes = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, codebook)))(fill_keys)
    fill_value = jnp.where(layout.is_eol(fill), layout.eol, random_codes + layout.visual_offset)
    fill_write = jnp.where((fill < total) & ~finished[:, None], fill, total + window)
    return SJDState(passes=s.passes + (~finished).astype(jnp.int32),
                    cursor=jnp.minimum(s.cursor + jnp.where(finished, 0, verdict.accepted + 1), total),
                    tokens=tokens.at[b, fill_write].set(fill_value, mode="drop"),
                    p_old=p_old.at[b, fill_write].set(jnp.full((codebook,), 1.0 / codebook), mode="drop"),
                    cache=cache, step=s.step + 1)


@functools.partial(jax.jit, static_argnames=("setup", "window"))
def _initial_state(first: jax.Array, cache: ScatterKVCache | BandKVCache, key: jax.Array, *, setup: ImageDecodeSetup,
                   window: int) -> SJDState:
    """Token 0 from the prefill, then uniform random drafts (EOLs where the layout has them) for the first window
    and beyond; every draft's distribution uniform."""
    layout, batch = setup.layout, setup.batch
    total, codebook = layout.num_tokens, layout.codebook_size
    index = jnp.arange(total + window)
    random_codes = jax.random.randint(jax.random.fold_in(key, 0x7FFFFFFF), (batch, total + window), 0, codebook)
    drafts = jnp.where(layout.is_eol(index), layout.eol, random_codes + layout.visual_offset)
    buffer = jnp.concatenate([first, jnp.zeros((batch, window), jnp.int32)], axis=1)
    return SJDState(passes=jnp.ones((batch,), jnp.int32), cursor=jnp.ones((batch,), jnp.int32),
                    tokens=jnp.where(index[None, :] >= 1, drafts, buffer),
                    p_old=jnp.full((batch, total + window, codebook), 1.0 / codebook, jnp.float32),
                    cache=cache, step=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("setup", "window"), donate_argnames=("state",))
def sjd_until(params: Params, state: SJDState, stop: jax.Array, inputs: ImageInputs, *, setup: ImageDecodeSetup,
              window: int) -> SJDState:
    """Run passes until every image is complete or `stop` passes have run in this call."""
    head = output_head(params, setup.config, setup.layout.vocab_range)

    def one_pass(carry):
        s, done = carry
        p_new, cache = _forward(params, s, inputs, setup, window, head)
        key = jax.random.fold_in(inputs.key, s.step)
        keys = jax.random.split(key, setup.batch * window).reshape(setup.batch, window)
        verdict = _verify(s, p_new, keys, setup, window)
        return _commit(s, p_new, verdict, cache, key, setup, window), done + 1

    def keep_going(carry):
        s, done = carry
        return (done < stop) & ~jnp.all(s.cursor >= setup.layout.num_tokens)

    state = state.replace(cache=state.cache.at(jnp.zeros((window,), jnp.int32), jnp.zeros((window,), bool)))
    state, _ = jax.lax.while_loop(keep_going, one_pass, (state, jnp.zeros((), jnp.int32)))
    return state


@renamed_fields(window="jacobi_window")
@dataclasses.dataclass(frozen=True)
class SJD:
    """Speculative Jacobi Decoding over a Jacobi window of `jacobi_window` (>= 2) tokens: the positions each pass
    feeds, predicts and verifies; `kernel` and `kv` as in FixedWindow (over a compressed cache, drafted slots stay
    in full precision until committed). `window=` is the deprecated name (one release)."""

    jacobi_window: int
    kernel: bool | None = None
    kv: Method | None = None

    def __post_init__(self):
        object.__setattr__(self, "jacobi_window", integer(self.jacobi_window, "SJD jacobi_window", lo=2))
        optional(boolean, self.kernel, "SJD kernel")
        check_method(as_method(self.kv), "SJD", self.kernel)

    def band(self, setup: ImageDecodeSetup) -> int:
        """Full-precision entries of the compressed cache (0 without `kv`): two windows and a block (KIVI: its
        residual window)."""
        return 0 if self.kv is None else 2 * self.jacobi_window + sum(band_margin(self.kv)) + 2

    def run(self, model, setup: ImageDecodeSetup, inputs: ImageInputs, progress: bool) -> DecodeResult:
        """Prefill, then SJD passes until every image is complete."""
        window, total = self.jacobi_window, setup.layout.num_tokens
        if window > total:
            raise ZipjaxError(f"SJD jacobi_window {window} is longer than the image's {total} tokens")
        first, cache = prefilled(model, setup, inputs, cache_length(setup.bucket + total + window + 1), self.kernel,
                                 self.kv, self.band(setup), rewrites=True)
        state = _initial_state(first, cache, inputs.key, setup=setup, window=window)
        done = 0
        with tqdm(total=total, desc=f"SJD (window {window})", unit="token", disable=not progress) as bar:
            while done < total:
                state = sjd_until(model.params, state, jnp.int32(64), inputs, setup=setup, window=window)
                done = int(to_host(jnp.min(state.cursor)))
                bar.update(done - bar.n)
        check_band(state.cache)
        return DecodeResult(tokens=to_host(state.tokens)[:, :total], passes=to_host(state.passes))
