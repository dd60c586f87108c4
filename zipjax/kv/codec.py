"""The KV codec: uniform asymmetric quantization of K and V, bit packing, and the packed stores the caches hold.

A group of values x is stored as integer codes q = round((x - min) / step), step = (max - min) / (2^bits - 1), plus
the group's (step, min). Which values form a group is the granularity:

  token-wise     one group per token (optionally split into groups of `group` channels: group-wise)
  channel-wise   one group per channel, over a block of tokens (ZipCache's keys), or over each run of
                 `key_block` tokens of it (KIVI's keys: per channel, in groups of 32 tokens)
  channel-separable token-wise (CST, ZipCache's values): divide each channel by c = sqrt(max |x|) over the block,
                 quantize token-wise, multiply back; c is one more [channels] leaf

Differences from ZipCache's code, on purpose: a constant group (max == min) gets step 1 instead of a division by
zero; (step, min) are stored in float16 (what the paper's compression ratios count) and rounded so that the stored
pair still covers [min, max], which keeps every error within half the stored step; codes are clipped.

Packing follows the split-halves layout of `zipjax.kernels.common.pack` (the format the decode kernel reads).
A `Codec` is one method's granularity (key and value modes, group width); `Store` is what it encodes a set of
tokens into. Imports: jax, flax, the kernels' leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zipjax.kernels.common import pack, unpack

__all__ = ["SCALE_DTYPE", "SUPPORTED_BITS", "Codec", "Store", "channel_scale", "dequantize", "fake_quantize",
           "grouped", "pack", "quantize", "quantize_key_blocks", "unpack"]

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = jnp.float16


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


def quantize_key_blocks(k: jax.Array, bits: int, block: int, valid: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KIVI's keys: per channel, over each run of `block` tokens (the last run padded with left-out tokens).

    k: float [batch, kv_heads, n, head_dim]; valid: bool [batch, kv_heads, n] or None. Returns codes uint8 [batch,
    kv_heads, n, head_dim] and (step, min) float16 [batch, kv_heads, ceil(n / block), head_dim]."""
    b, h, n, d = k.shape
    runs = -(-n // block)
    ok = jnp.ones((b, h, n), bool) if valid is None else jnp.broadcast_to(valid, (b, h, n))
    pad = ((0, 0), (0, 0), (0, runs * block - n))
    k_runs = jnp.pad(k.astype(jnp.float32), (*pad, (0, 0))).reshape(b, h, runs, block, d)
    ok_runs = jnp.pad(ok, pad).reshape(b, h, runs, block, 1)
    codes, step, minimum = quantize(k_runs, bits, axis=3, valid=ok_runs)  # stats [b, h, runs, 1, d]
    return codes.reshape(b, h, runs * block, d)[:, :, :n], step[:, :, :, 0], minimum[:, :, :, 0]


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


@struct.dataclass
class Store:
    """Packed K/V of a set of tokens, [batch, kv_heads, n, ...]: codes uint8 [..., n, head_dim * bits / 8]; key
    (step, min) float16 [..., blocks, head_dim] (channel-wise keys) or [..., n, groups] (token-wise keys); value
    (step, min) float16 [..., n, groups]; slots [..., n] the cache slot of each token (-1: empty), or None where the
    owner tracks positions itself (MiniCache)."""

    k_codes: jax.Array
    v_codes: jax.Array
    slots: jax.Array | None
    k_step: jax.Array
    k_min: jax.Array
    v_step: jax.Array
    v_min: jax.Array

    def arrays(self) -> dict[str, jax.Array]:
        """The non-None fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a method quantizes K and V: keys channel-wise (per block, or per `key_block` tokens of it) or token-wise,
    values token-wise or CST, each token-wise group `group` channels wide (None: the whole head)."""

    key_mode: Literal["channel", "token"]
    value_mode: Literal["token", "cst"]
    group: int | None = None
    key_block: int | None = None  # channel-wise keys: tokens per statistic (None: the whole block)

    def groups(self, head_dim: int) -> int:
        return head_dim // (self.group or head_dim)

    def empty_store(self, batch: int, kv_heads: int, head_dim: int, bits: int, capacity: int, blocks: int,
                    slot_dtype) -> Store:
        """A store of `capacity` empty token slots in `blocks` blocks (codes zero, slots -1)."""
        b, h, d, groups = batch, kv_heads, head_dim, self.groups(head_dim)
        k_stats = (b, h, blocks, d) if self.key_mode == "channel" else (b, h, capacity, groups)
        return Store(k_codes=jnp.zeros((b, h, capacity, d * bits // 8), jnp.uint8),
                     v_codes=jnp.zeros((b, h, capacity, d * bits // 8), jnp.uint8),
                     slots=jnp.full((b, h, capacity), -1, slot_dtype),
                     k_step=jnp.ones(k_stats, SCALE_DTYPE), k_min=jnp.zeros(k_stats, SCALE_DTYPE),
                     v_step=jnp.ones((b, h, capacity, groups), SCALE_DTYPE),
                     v_min=jnp.zeros((b, h, capacity, groups), SCALE_DTYPE))

    def encode(self, bits: int, k: jax.Array, v: jax.Array, valid: jax.Array) -> Store:
        """Codes and parameters of one block's subset: k, v float32 [batch, kv_heads, n, head_dim] (v already divided
        by the CST channel scale), valid bool [batch, kv_heads, n] (invalid tokens are left out of the channel-wise
        key statistics). The result's slots are None."""
        g = self.group or k.shape[-1]
        if self.key_mode == "channel" and self.key_block is not None:
            k_codes, k_step, k_min = quantize_key_blocks(k, bits, self.key_block, valid)  # [b, h, n/kb, d]
        elif self.key_mode == "channel":
            k_codes, k_step, k_min = quantize(k, bits, axis=2, valid=valid[..., None])  # stats [b, h, 1, d]
        else:
            k_codes, k_step, k_min = quantize(grouped(k, g), bits, axis=-1)
            k_codes, k_step, k_min = k_codes.reshape(k.shape), k_step[..., 0], k_min[..., 0]
        v_codes, v_step, v_min = quantize(grouped(v, g), bits, axis=-1)
        return Store(k_codes=pack(k_codes.reshape(k.shape), bits), v_codes=pack(v_codes.reshape(v.shape), bits),
                     slots=None, k_step=k_step, k_min=k_min, v_step=v_step[..., 0], v_min=v_min[..., 0])

    def decode(self, store: Store, bits: int, block_ids: np.ndarray, v_scale: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
        """Keys and values float32 [batch, kv_heads, n, head_dim] of a store; block_ids [n]: the block of each token
        (which channel-wise key statistics apply); v_scale [batch, kv_heads, n, head_dim] per token, or None."""
        k_codes, v_codes = unpack(store.k_codes, bits), unpack(store.v_codes, bits)
        g = self.group or k_codes.shape[-1]
        if self.key_mode == "channel":
            if self.key_block is not None:  # statistics per run of key_block tokens of the store
                block_ids = np.arange(k_codes.shape[2]) // self.key_block
            k = dequantize(k_codes, store.k_step[:, :, block_ids], store.k_min[:, :, block_ids])
        else:
            k = dequantize(grouped(k_codes, g), store.k_step[..., None], store.k_min[..., None]).reshape(k_codes.shape)
        v = dequantize(grouped(v_codes, g), store.v_step[..., None], store.v_min[..., None]).reshape(v_codes.shape)
        if v_scale is not None:
            v = v * v_scale.astype(jnp.float32)
        return k, v
