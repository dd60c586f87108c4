"""Attention over the dense page pool on a GPU: zipjax.kernels.paged_dense_attention (a Triton kernel) run on the
engine's flat step batch, and which dense-pool attention a step runs (`dense_route`).

The step (zipjax.serve.paged.StepLayout: D decode rows of one query, then N prefill blocks of Q queries) is two
kernel calls, as the jnp path's segments are: the decode rows as n = D rows of 1 query, the prefill blocks as n = N
rows of Q queries, each through its page table and positions (-1: padding, output 0). The pool is read in place,
only up to each row's furthest visible page. jax's own Triton paged_attention does not fit the engine (decode-only,
head-major K and V pools, no sliding window), hence zipjax's kernel.

A Triton call is not partitioned by XLA: on a mesh it runs once per KV-head shard (shard_map over "model", as the
TPU kernel of zipjax.serve.ragged does), where the "model" axis divides the KV heads and the query heads and no
"data" axis splits the pages (a page id is global); otherwise the jnp path (`misfit` says why). Dense pools only:
beside packed pages and for a ranked method's page-local mass the jnp path runs (the kernel's lse could merge with
the packed pages' state; that is not wired).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zipjax.errors import ZipjaxError
from zipjax.kernels.paged_dense_attention import paged_dense_attention
from zipjax.platform import platform
from zipjax.serve.ragged import per_kv_shard, shard_misfit, use_ragged

MAX_HEAD_DIM = 256  # a program's float32 accumulator [rows, head_dim] stays in registers up to here


def dense_route(kernel: bool | None, heads: int, kv_pages: jax.Array) -> str | None:
    """Which kernel reads a dense pool kv_pages [pages, page_size, 2 * kv_heads, head_dim] for `heads` query heads:
    "tpu" (jax's ragged paged attention, zipjax.serve.ragged), "gpu" (`gpu_dense_attention`) or None (the jnp path),
    by the kernel policy of PagedCache.kernel: None, the platform's kernel where it fits (jnp on a CPU); True, the
    platform's kernel or a ZipjaxError naming why it cannot (on a CPU the GPU kernel, interpreted: for tests);
    False, never."""
    if kernel is False:
        return None
    if platform() == "tpu":
        return "tpu" if use_ragged(kernel, heads, kv_pages) else None
    if kernel is None and platform() != "gpu":
        return None
    why = misfit(heads, kv_pages)
    if why is not None and kernel:
        raise ZipjaxError(f"zipjax's paged dense attention kernel cannot serve this pool: {why}")
    return "gpu" if why is None else None


def misfit(heads: int, kv_pages: jax.Array) -> str | None:
    """Why the GPU kernel cannot run on this pool on the context mesh (`jax.set_mesh`), or None."""
    if platform() not in ("gpu", "cpu"):
        return f"it is a GPU (Triton) kernel and the platform is {platform()}"
    head_dim = kv_pages.shape[3]
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is over {MAX_HEAD_DIM}"
    return shard_misfit(heads, kv_pages.shape[2] // 2)


def gpu_dense_attention(q: jax.Array, kv_pages: jax.Array, decode_pages: jax.Array, decode_positions: jax.Array,
                        prefill_pages: jax.Array, prefill_positions: jax.Array,
                        sliding_window: int | None) -> jax.Array:
    """Attention of the step's T = D + N Q queries q [T, heads, head_dim] over the pool kv_pages [pages, page_size,
    2 * kv_heads, head_dim], the step's own K/V already written into it; -> [T, heads, head_dim] in q's dtype,
    padding tokens zero. decode_pages int32 [D, P], decode_positions int32 [D], prefill_pages int32 [N, P],
    prefill_positions int32 [N, Q] (-1: padding)."""
    call = functools.partial(_segments, sliding_window=sliding_window)
    inputs = (decode_pages, decode_positions, prefill_pages, prefill_positions)
    return per_kv_shard(call, q, kv_pages, inputs).astype(q.dtype)


def _segments(q: jax.Array, kv_pages: jax.Array, decode_pages: jax.Array, decode_positions: jax.Array,
              prefill_pages: jax.Array, prefill_positions: jax.Array, *, sliding_window: int | None) -> jax.Array:
    """The decode rows, then the prefill blocks, one kernel call each (on one KV-head shard)."""
    d, (n, block) = decode_positions.shape[0], prefill_positions.shape
    heads, head_dim = q.shape[1:]
    parts = []
    if d:
        out, _ = paged_dense_attention(q[:d].reshape(d, 1, heads, head_dim), kv_pages, decode_pages,
                                       decode_positions[:, None], sliding_window=sliding_window)
        parts.append(out.reshape(d, heads, head_dim))
    if n:
        out, _ = paged_dense_attention(q[d:].reshape(n, block, heads, head_dim), kv_pages, prefill_pages,
                                       prefill_positions, sliding_window=sliding_window)
        parts.append(out.reshape(n * block, heads, head_dim))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
