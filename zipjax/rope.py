"""Rotary position embeddings (rotate-half layout, as Hugging Face checkpoints expect).

The inverse frequencies are computed on the host following transformers' float32 formulas, including the Llama-3.1
frequency-dependent scaling, so converted models need no weight permutation and match the reference to float32
rounding. Angles are always formed in float32 (bfloat16 cannot even represent position 257); cos/sin are cast to the
activation dtype only when applied, as in the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies, float32 [head_dim // 2]."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # theta ** exponent rounded once to float32 (float32 pow implementations differ by an ulp; an ulp of inv_freq
    # is a visible angle error at position 100k), then the float32 reciprocal as in the reference.
    powers = np.power(np.float64(rope.theta), exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers
    if rope.type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin for each position, float32 [batch, seq, head_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by cos/sin [batch, seq, head_dim // 2] (rotate-half pairing)."""
    cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
