"""Uniform asymmetric quantization of KV tensors, and bit packing.

A group of values x is stored as integer codes q = round((x - min) / step), step = (max - min) / (2^bits - 1), plus
the group's (step, min). Which values form a group is the granularity:

  token-wise     one group per token (optionally split into groups of `group` channels: group-wise)
  channel-wise   one group per channel, over a block of tokens (KIVI's and ZipCache's keys)
  channel-separable token-wise (CST, ZipCache's values): divide each channel by c = sqrt(max |x|) over the block,
                 quantize token-wise, multiply back; c is one more [channels] leaf

Differences from ZipCache's code, on purpose: a constant group (max == min) gets step 1 instead of a division by
zero; (step, min) are stored in float16 (what the paper's compression ratios count) and rounded so that the stored
pair still covers [min, max], which keeps every error within half the stored step; codes are clipped.

Packing follows the split-halves layout: with f = 8 / bits codes per byte, the last axis is cut into f equal parts
and part j goes to bits [j * bits, (j + 1) * bits) of each byte. Unpacking part j is one shift and mask over a
contiguous block of channels, which a kernel can contract against the matching block of the query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = jnp.float16


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., n] (each < 2^bits) -> uint8 [..., n * bits / 8]."""
    per_byte = 8 // bits
    if bits == 8:
        return codes.astype(jnp.uint8)
    parts = jnp.split(codes.astype(jnp.uint8), per_byte, axis=-1)
    packed = parts[0]
    for j, part in enumerate(parts[1:], start=1):
        packed = packed | (part << (j * bits))
    return packed


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of `pack`: uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    if bits == 8:
        return packed
    mask = jnp.uint8((1 << bits) - 1)
    return jnp.concatenate([(packed >> (j * bits)) & mask for j in range(8 // bits)], axis=-1)


def _round_params(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """float16 (step, min) with min16 <= lo and min16 + levels * step16 >= hi, so that clipping never bites."""
    levels = (1 << bits) - 1
    lo16 = lo.astype(SCALE_DTYPE)
    lo16 = jnp.where(lo16.astype(jnp.float32) > lo, jnp.nextafter(lo16, SCALE_DTYPE(-jnp.inf)), lo16)
    step = (hi - lo16.astype(jnp.float32)) / levels
    step = jnp.where(step > 0, step, 1.0)
    step16 = step.astype(SCALE_DTYPE)
    short = lo16.astype(jnp.float32) + levels * step16.astype(jnp.float32) < hi
    step16 = jnp.where(short, jnp.nextafter(step16, SCALE_DTYPE(jnp.inf)), step16)
    return step16, lo16


def quantize(x: jax.Array, bits: int, axis: int | tuple[int, ...], valid: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize with one (step, min) per slice reduced over `axis`.

    x: float [...]; valid: bool broadcastable to x, entries left out of the statistics (padding tokens).
    Returns (codes uint8 shaped like x, step float16, min float16), the parameters with `axis` kept as size 1.
    """
    x = x.astype(jnp.float32)
    lo_src = x if valid is None else jnp.where(valid, x, jnp.inf)
    hi_src = x if valid is None else jnp.where(valid, x, -jnp.inf)
    lo = jnp.min(lo_src, axis=axis, keepdims=True)
    hi = jnp.max(hi_src, axis=axis, keepdims=True)
    empty = ~jnp.isfinite(lo)  # a slice with no valid entry
    lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    step, minimum = _round_params(lo, hi, bits)
    codes = jnp.round((x - minimum.astype(jnp.float32)) / step.astype(jnp.float32))
    codes = jnp.clip(codes, 0, (1 << bits) - 1).astype(jnp.uint8)
    return codes, step, minimum


def dequantize(codes: jax.Array, step: jax.Array, minimum: jax.Array) -> jax.Array:
    """float32 codes * step + min (parameters broadcast against the codes)."""
    return codes.astype(jnp.float32) * step.astype(jnp.float32) + minimum.astype(jnp.float32)


def grouped(x: jax.Array, group: int) -> jax.Array:
    """[..., d] -> [..., d / group, group]: token-wise quantization over groups of channels."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def channel_scale(x: jax.Array, axis: int, valid: jax.Array | None = None) -> jax.Array:
    """CST's per-channel divisor sqrt(max |x|) over `axis` (kept as size 1), float16; 1 for an all-zero channel."""
    mag = jnp.abs(x.astype(jnp.float32))
    if valid is not None:
        mag = jnp.where(valid, mag, 0.0)
    c = jnp.sqrt(jnp.max(mag, axis=axis, keepdims=True))
    return jnp.where(c > 0, c, 1.0).astype(SCALE_DTYPE)


def fake_quantize(x: jax.Array, bits: int, mode: str, group: int | None = None, token_axis: int = -2) -> jax.Array:
    """quantize-then-dequantize x [..., tokens, channels] in one granularity, for analysis and tests.

    mode: "token" (per token; `group` channels per group if given), "channel" (per channel over all tokens), or
    "cst" (channel-separable token-wise).
    """
    x = x.astype(jnp.float32)
    if mode == "channel":
        return dequantize(*quantize(x, bits, axis=token_axis))
    scale = channel_scale(x, axis=token_axis) if mode == "cst" else None
    y = x / scale.astype(jnp.float32) if scale is not None else x
    g = grouped(y, group or y.shape[-1])
    out = dequantize(*quantize(g, bits, axis=-1)).reshape(y.shape)
    return out * scale.astype(jnp.float32) if scale is not None else out
