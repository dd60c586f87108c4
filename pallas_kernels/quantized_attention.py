"""Decode attention over packed quantized KV codes, without a dequantized copy of the cache in memory.

A segment holds `blocks` blocks of `block` tokens for one precision (2, 4 or 8 bits): packed key and value codes,
channel-wise key (step, min) per block, token-wise value (step, min) per token (and per group of channels), and an
optional CST channel scale per block. One program per (sequence, KV head, block) takes the decode queries of the
KV head's GQA group and returns the block's partial softmax state (running max m, sum l, unnormalized output acc);
`merge` combines the states of every block of every segment (and of the full-precision window) exactly by
log-sum-exp, which is how mixed precision is merged.

The scales never touch the cache: keys are k = code * step_c + min_c per channel, so
q . k = (q * step) . code + q . min, the per-channel step folded into the query and the min into one bias per
block; values are v = (code * step_t + min_t) * c, so the output is c * ((p * step_t) @ code + p @ min_t), the
token's step applied to its probability. Codes are unpacked in registers: the split-halves packing puts part j of
every byte at a contiguous block of channels, one shift and mask each.

`reference` is the same computation in plain jax.numpy (dequantize, then attend with the shared grouped scores and
softmax of zipjax.kernels.common) and the kernel is tested against it in interpret mode on CPU and with the TPU
interpreter. zipjax.kv's quantized cache stores every subset as uniform-block segments (prompt block, later blocks)
and calls this per segment when its method says `kernel=True`; it has not been compiled on a GPU yet, so the jnp
path stays the default. Imports: jax and the kernels' leaf only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from zipjax.kernels.common import MASK_VALUE, grouped_scores, grouped_values, masked_softmax, unpack, visible_slots


def _unpacked_parts(codes: jax.Array, bits: int) -> list[jax.Array]:
    """uint8 [n, d * bits / 8] -> 8 / bits float32 arrays [n, d * bits / 8], part j = channels [j * w, (j + 1) * w)."""
    if bits == 8:
        return [codes.astype(jnp.float32)]
    mask = (1 << bits) - 1
    wide = codes.astype(jnp.int32)
    return [((wide >> (j * bits)) & mask).astype(jnp.float32) for j in range(8 // bits)]


def _kernel(q_slot_ref, start_ref, q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, sc_ref, slot_ref,
            m_ref, l_ref, acc_ref, *, bits: int, group: int, scale: float, sliding_window: int | None):
    """One (sequence, KV head, block). q_ref [G, d]; kc/vc [n, w]; ks/km/sc [1, d]; vs/vm [n, d / group];
    slot_ref [n]. Writes m, l [G] and acc [G, d]."""
    q = q_ref[...].astype(jnp.float32) * scale  # [G, d]
    k_step = ks_ref[...].astype(jnp.float32)  # [1, d]
    k_min = km_ref[...].astype(jnp.float32)
    width = kc_ref.shape[1]
    folded = q * k_step  # per-channel key step folded into the query
    scores = jnp.sum(q * k_min, axis=-1, keepdims=True)  # [G, 1]: the min's contribution, one bias per block
    for j, part in enumerate(_unpacked_parts(kc_ref[...], bits)):
        scores = scores + jnp.dot(folded[:, j * width:(j + 1) * width], part.T,
                                  preferred_element_type=jnp.float32)  # [G, n]
    visible = visible_slots(slot_ref[...], q_slot_ref[0], start_ref[0], sliding_window)[None, :]
    scores = jnp.where(visible, scores, MASK_VALUE)
    m = scores.max(axis=-1)  # [G]
    p = jnp.where(visible, jnp.exp(scores - m[:, None]), 0.0)  # [G, n]
    v_step = vs_ref[...].astype(jnp.float32)  # [n, groups]
    v_min = vm_ref[...].astype(jnp.float32)
    parts = []
    for j, part in enumerate(_unpacked_parts(vc_ref[...], bits)):
        channels = jnp.arange(j * width, (j + 1) * width) // group  # the value group of each channel of this part
        step = jnp.take(v_step, channels, axis=1)  # [n, w]
        minimum = jnp.take(v_min, channels, axis=1)
        parts.append(jnp.dot(p, part * step + minimum, preferred_element_type=jnp.float32))  # [G, w]
    acc = jnp.concatenate(parts, axis=-1) * sc_ref[...].astype(jnp.float32)  # [G, d], CST scale per channel
    m_ref[...] = m
    l_ref[...] = p.sum(axis=-1)
    acc_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("bits", "block", "group", "sliding_window", "interpret"))
def segment_attention(q: jax.Array, k_codes: jax.Array, k_step: jax.Array, k_min: jax.Array, v_codes: jax.Array,
                      v_step: jax.Array, v_min: jax.Array, v_scale: jax.Array | None, slots: jax.Array,
                      q_slot: jax.Array, starts: jax.Array, *, bits: int, block: int, group: int | None = None,
                      sliding_window: int | None = None, interpret=False
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Partial attention states of one decode query per sequence over a quantized segment.

    q: [batch, kv_heads, G, d] (the G query heads of each KV head); k_codes, v_codes: uint8 [batch, kv_heads,
    blocks * block, d * bits / 8]; k_step, k_min, v_scale: [batch, kv_heads, blocks, d]; v_step, v_min: [batch,
    kv_heads, blocks * block, d / group]; slots: int [batch, kv_heads, blocks * block] (-1: empty); q_slot: int32 [];
    starts: int32 [batch]. Returns m, l float32 [batch, kv_heads, blocks, G] and acc [batch, kv_heads, blocks, G, d].
    """
    batch, kv_heads, rows, d = q.shape
    length, width = k_codes.shape[2], k_codes.shape[3]
    blocks = length // block
    groups = v_step.shape[-1]
    if v_scale is None:
        v_scale = jnp.ones(k_step.shape, jnp.float16)
    kernel = functools.partial(_kernel, bits=bits, group=group or d, scale=d**-0.5, sliding_window=sliding_window)
    per_block = lambda b, h, j: (b, h, j, 0)
    m, total, acc = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, blocks),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, j: (0,)),
            pl.BlockSpec((1,), lambda b, h, j: (b,)),
            pl.BlockSpec((None, None, rows, d), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block, width), per_block),
            pl.BlockSpec((None, None, 1, d), per_block),
            pl.BlockSpec((None, None, 1, d), per_block),
            pl.BlockSpec((None, None, block, width), per_block),
            pl.BlockSpec((None, None, block, groups), per_block),
            pl.BlockSpec((None, None, block, groups), per_block),
            pl.BlockSpec((None, None, 1, d), per_block),
            pl.BlockSpec((None, None, block), lambda b, h, j: (b, h, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows, d), lambda b, h, j: (b, h, j, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, blocks, rows, d), jnp.float32),
        ],
        interpret=interpret,
    )(jnp.reshape(q_slot, (1,)).astype(jnp.int32), starts.astype(jnp.int32), q, k_codes, k_step, k_min, v_codes,
      v_step, v_min, v_scale, slots.astype(jnp.int32))
    return m, total, acc


def combine(states: list[tuple[jax.Array, jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact softmax attention from partial states (m, l [..., blocks, G], acc [..., blocks, G, d]) of any number
    of segments. Returns (out [..., G, d], max [..., G], sum [..., G]): the probability of a key with score s is
    exp(s - max) / sum."""
    m = jnp.concatenate([s[0] for s in states], axis=-2)
    l = jnp.concatenate([s[1] for s in states], axis=-2)  # noqa: E741
    acc = jnp.concatenate([s[2] for s in states], axis=-3)
    top = m.max(axis=-2)
    weight = jnp.exp(m - top[..., None, :])  # [..., blocks, G]
    total = jnp.maximum((l * weight).sum(axis=-2), 1e-30)
    return (acc * weight[..., None]).sum(axis=-3) / total[..., None], top, total


def merge(states: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """The attention output [..., G, d] of `combine`."""
    return combine(states)[0]


def segment_attention_on_backend(*args, **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`segment_attention` compiled on GPU/TPU and interpreted on CPU, where Pallas only interprets."""
    return segment_attention(*args, **kwargs, interpret=jax.default_backend() not in ("gpu", "tpu"))


def dequantize_segment(k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, *, bits: int, block: int,
                       group: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The segment's keys and values, float32 [batch, kv_heads, blocks * block, d] (reference only; it unpacks with
    the codec's `unpack`, independently of the kernel's in-register unpacking)."""
    k = unpack(k_codes, bits).astype(jnp.float32)
    d = k.shape[-1]
    per_token = lambda x: jnp.repeat(x.astype(jnp.float32), block, axis=2)  # [.., blocks, d] -> per token
    k = k * per_token(k_step) + per_token(k_min)
    v = unpack(v_codes, bits).astype(jnp.float32)
    channel_group = jnp.arange(d) // (group or d)
    v = v * v_step.astype(jnp.float32)[..., channel_group] + v_min.astype(jnp.float32)[..., channel_group]
    if v_scale is not None:
        v = v * per_token(v_scale)
    return k, v


def reference(q, k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, slots, q_slot, starts, *, bits: int,
              block: int, group: int | None = None, sliding_window: int | None = None) -> jax.Array:
    """Dequantize, then softmax attention: [batch, kv_heads, G, d] for a segment alone."""
    k, v = dequantize_segment(k_codes, k_step, k_min, v_codes, v_step, v_min, v_scale, bits=bits, block=block,
                              group=group)
    visible = visible_slots(slots, q_slot, starts[:, None, None], sliding_window)[:, :, None, None, :]
    probs = masked_softmax(grouped_scores(q[:, :, :, None].astype(jnp.float32), k), visible) * visible
    return grouped_values(probs, v)[:, :, :, 0]
