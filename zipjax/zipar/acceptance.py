"""The speculative acceptance rule that adaptive ZipAR (and Speculative Jacobi Decoding) verify drafts with.

A token x was drafted from p_old (a distribution computed with less context). Once p_new is known, keep x with
probability min(1, p_new(x) / p_old(x)); otherwise draw a replacement from the residual max(0, p_new - p_old),
renormalised. Whatever p_old was, the kept-or-replaced token is then distributed exactly as p_new (the
speculative-sampling lemma), which is what makes the acceleration lossless in distribution.

The lemma needs the draft to be distributed as the p_old it is verified against. A replacement drawn after a
rejection is distributed as the residual, not as p_new, so a chain that verifies it again later (adaptive ZipAR)
must verify it against that residual: `accept_or_redraw` returns it alongside the token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accept_or_resample(key: jax.Array, draft: jax.Array, p_old: jax.Array,
                       p_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """draft int32 [batch]; p_old, p_new float32 [batch, vocab] (probabilities). Returns (token int32 [batch],
    accepted bool [batch])."""
    token, accepted, _ = accept_or_redraw(key, draft, p_old, p_new)
    return token, accepted


def accept_or_redraw(key: jax.Array, draft: jax.Array, p_old: jax.Array,
                     p_new: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`accept_or_resample`, plus the residual distribution float32 [batch, vocab] a rejected row's token was
    drawn from (p_new where the residual is empty): what that token must be verified against if it is verified
    again."""
    accept_key, residual_key = jax.random.split(key)
    q = jnp.take_along_axis(p_old, draft[:, None], axis=-1)[:, 0]
    p = jnp.take_along_axis(p_new, draft[:, None], axis=-1)[:, 0]
    u = jax.random.uniform(accept_key, draft.shape)
    accepted = u * q < p  # u < p / q without dividing; q > 0 because x was drawn from p_old
    residual = jnp.maximum(p_new - p_old, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # a rejection implies p_new(x) < p_old(x), hence positive residual mass; the fallback only guards the
    # accepted rows, whose resample is discarded
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_new)
    resampled = jax.random.categorical(residual_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return jnp.where(accepted, draft, resampled), accepted, residual
