"""Parallel-decoding attention for ZipAR: several queries per sequence against a cache written out of order.

ZipAR feeds one query per active image row (plus refreshes), each at its own raster slot (slots and the written
bitmap are per sequence: adaptive schedules differ between samples). A query may see key slot k iff the slot is
written, k <= the query's slot, and k >= the sequence's first prompt slot. This is that attention
as a Pallas kernel, flash-attention style: one program per (sequence, KV head) holds all the queries of the KV
head's group ([queries * group, head_dim], padded) and walks the cache in blocks of `block_k` slots with an online
softmax, so the [queries, max_len] score matrix never exists in memory and GQA never repeats K/V.

`reference` below is the same computation in plain jax.numpy (the shared grouped attention of
zipjax.kernels.common); the kernel is tested against it in interpret mode (and with the TPU interpreter).
`zipar_attention(..., use_kernel=False)` is the explicit jnp path for backends where the kernel is not used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from zipjax.kernels.common import MASK_VALUE, grouped_attention


def reference(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, written: jax.Array,
              starts: jax.Array) -> jax.Array:
    """q [batch, q_len, heads, head_dim]; k, v [batch, kv_heads, max_len, head_dim]; q_slots int32 [batch, q_len];
    written bool [batch, max_len]; starts int32 [batch]. Returns [batch, q_len, heads, head_dim] in q's dtype."""
    slots = jnp.arange(k.shape[2], dtype=jnp.int32)
    mask = written[:, None, :] & (slots[None, None, :] <= q_slots[:, :, None])
    mask &= slots[None, None, :] >= starts[:, None, None]  # [batch, q_len, max_len]
    return grouped_attention(q, k, v, mask[:, None, None])


def _kernel(q_slots_ref, k_valid_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, scale: float):
    """One (sequence, KV head): q_ref [rows, head_dim], k_ref / v_ref [max_len, head_dim], k_valid_ref [max_len]."""
    rows, head_dim = q_ref.shape
    max_len = k_ref.shape[0]
    q = q_ref[...]
    q_slots = q_slots_ref[...]  # [rows]

    def body(block, carry):
        acc, m_prev, l_prev = carry
        window = pl.ds(block * block_k, block_k)
        k = k_ref[window, :]
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [rows, block_k]
        k_slots = block * block_k + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        visible = (k_valid_ref[window][None, :] != 0) & (k_slots <= q_slots[:, None])
        scores = jnp.where(visible, scores, MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(scores - m_next[:, None])
        v = v_ref[window, :]
        acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_next, l_prev * correction + p.sum(axis=-1)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, denom = jax.lax.fori_loop(0, max_len // block_k, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret", "backend"))
def zipar_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, written: jax.Array,
                           starts: jax.Array, *, block_k: int = 128, interpret=False,
                           backend: str | None = None) -> jax.Array:
    """The Pallas kernel; same arguments and result as `reference`. `interpret` is False, True, or a TPU
    `InterpretParams`; `backend` ("gpu" / "tpu") picks compiler parameters when compiling for real."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = pl.cdiv(q_len * group, 16) * 16  # a whole number of MMA tiles on GPU, of sublanes on TPU
    length = pl.cdiv(max_len, block_k) * block_k

    out_dtype = q.dtype
    if interpret is not False and q.dtype != jnp.float32:  # XLA:CPU has no bf16 x bf16 -> f32 dot to interpret
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    grouped = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, kv_heads, q_len * group, head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - q_len * group), (0, 0)))
    row_slots = jnp.pad(jnp.repeat(q_slots.astype(jnp.int32), group, axis=1), ((0, 0), (0, rows - q_len * group)))
    slots = jnp.arange(length, dtype=jnp.int32)
    written = jnp.pad(written, ((0, 0), (0, length - max_len)))
    k_valid = (written & (slots[None, :] >= starts[:, None])).astype(jnp.int32)  # [batch, length]
    pad_kv = ((0, 0), (0, 0), (0, length - max_len), (0, 0))
    k, v = jnp.pad(k, pad_kv), jnp.pad(v, pad_kv)

    compiler_params = None
    if backend == "gpu":
        compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    elif backend == "tpu":
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, scale=head_dim**-0.5),
        grid=(batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, rows), lambda b, h: (b, 0)),
            pl.BlockSpec((None, length), lambda b, h: (b, 0)),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, length, head_dim), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, length, head_dim), lambda b, h: (b, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="zipar_attention",
    )(row_slots, k_valid, grouped, k, v)
    out = out[:, :, : q_len * group].reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, heads, head_dim).astype(out_dtype)


def zipar_attention(q, k, v, q_slots, written, starts, *, use_kernel: bool) -> jax.Array:
    """The kernel when `use_kernel` (compiled on GPU/TPU, interpreted on CPU, where Pallas only interprets), else the
    jnp reference. The choice is explicit; nothing falls back on an exception."""
    if not use_kernel:
        return reference(q, k, v, q_slots, written, starts)
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return zipar_attention_kernel(q, k, v, q_slots, written, starts, backend=backend)
    return zipar_attention_kernel(q, k, v, q_slots, written, starts, interpret=True)
