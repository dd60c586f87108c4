"""Attention over the dense page pool on a TPU: jax's ragged paged attention kernel
(jax.experimental.pallas.ops.tpu.ragged_paged_attention) run on the engine's flat step batch.

The kernel takes the step's queries as one ragged batch of kernel sequences (q [tokens, heads, head_dim], sequence
i the run cu_q_lens[i] .. cu_q_lens[i + 1]), reads K/V through a page table from a pool whose K and V are
interleaved on one combined head axis ([pages, page_size, 2 * kv_heads, head_dim], zipjax.serve.paged.Pool), and
puts a sequence's q_len queries at the last q_len positions of its kv_len keys: a query sees the keys at its own
position and before, and with a sliding window only those fewer than `sliding_window` positions back (zipjax's rule,
the same test). The step (zipjax.serve.paged.StepLayout: D decode rows, then N blocks of Q prefill tokens) maps
onto it with shapes fixed per compiled bucket:

    decode row              a sequence of 1 query, kv_len = position + 1
    prefill block           a sequence of Q queries, kv_len = first + Q (first: the block's first position): its
                            real tokens sit at first .. first + count - 1, exactly as in the step
    padding                 a padding decode row: kv_len 1; a padding block: first 0; in a partial block the
                            padding tail takes the positions after the real tokens

so cu_q_lens is the constant (0, 1, .., D, D + Q, .., D + N Q) and num_seqs = D + N: every token belongs to a
sequence (none is left uncomputed) and none is empty (an empty sequence would misalign the kernel's prefetch of
the next one's pages). Padding queries see the null page, or in a partial block keys of its own pages at positions
no real query of the block sees: finite values, and their outputs are zeroed, as the jnp path's padding rows are
(they see nothing), so nothing of them reaches a real row. A partial block's kv_len may run past its last page:
table entries there are the null page, and the kernel reads no page past the table's end. The scale is zipjax's
head_dim ** -0.5.

The kernel returns no log-sum-exp, so it serves dense pools only: beside packed pages (zipjax.serve.packed), whose
softmax states must be merged with the dense tail's, and for a ranked method's page-local mass, the jnp path runs.
It is a Mosaic call, which XLA's partitioner does not split: on a mesh it runs once per KV-head shard (shard_map
over "model"), where the "model" axis divides the KV heads and no "data" axis splits the pages (else the jnp path:
a page id is global). jax 0.10.2 and jax's main branch (0.11.1.dev, 2026-08) ship the same kernel and signature
(tests/test_serve_ragged.py checks the parameters used here); jax 0.10.2's TPU interpret mode cannot run it (it
does not model the kernel's reshaped VMEM refs), so on a CPU tests feed the same mapping to jax's
`ref_ragged_paged_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tuned
from jax.sharding import PartitionSpec

from zipjax.errors import ZipjaxError
from zipjax.platform import platform

LANES = 128  # the kernel keeps its softmax statistics in 128-lane rows: head_dim must be a multiple


def use_ragged(kernel: bool | None, heads: int, kv_pages: jax.Array) -> bool:
    """Whether attention over a dense pool kv_pages [pages, page_size, 2 * kv_heads, head_dim] with `heads` query
    heads runs the kernel, by the library's kernel policy for it: None, on a TPU where it fits (`misfit`), and the
    jnp path elsewhere (a GPU runs zipjax's own kernel instead, zipjax.serve.gpu_paged: jax's Triton paged_attention
    is decode-only and reads head-major K and V pools, without a sliding window); True, it must (a ZipjaxError
    names why it cannot); False, never."""
    if kernel is False or (kernel is None and platform() != "tpu"):
        return False
    why = misfit(heads, kv_pages)
    if why is not None and kernel:
        raise ZipjaxError(f"jax's ragged paged attention cannot serve this pool: {why}")
    return why is None


def misfit(heads: int, kv_pages: jax.Array) -> str | None:
    """Why the kernel cannot run on this pool on the context mesh (`jax.set_mesh`), or None."""
    if platform() != "tpu":
        return f"it is a TPU (Mosaic) kernel and the platform is {platform()}"
    head_dim, combined = kv_pages.shape[3], kv_pages.shape[2]
    if head_dim % LANES:
        return f"head_dim {head_dim} is not a multiple of {LANES}"
    why = shard_misfit(heads, combined // 2)
    if why is not None:
        return why
    model = _axis("model")
    per_shard, packing = combined // model, 4 // jnp.dtype(kv_pages.dtype).itemsize
    if per_shard % packing or not (per_shard // packing in (1, 2, 4, 8) or per_shard // packing % 8 == 0):
        return f"{per_shard} combined K/V heads per chip do not tile {kv_pages.dtype} vregs"
    return None


def shard_misfit(heads: int, kv_heads: int) -> str | None:
    """Why a Pallas call over a dense pool cannot run once per KV-head shard (`per_kv_shard`) on the context mesh, or
    None: a page id is global, so no "data" axis may split the pages, and "model" must divide the KV heads and the
    query heads."""
    data, model = _axis("data"), _axis("model")
    if data > 1:
        return f"the pages are split over a {data}-way data axis (the page table holds global page ids)"
    if kv_heads % model or heads % model:
        return f"the {kv_heads} KV heads do not split over the {model}-way model axis"
    return None


def _axis(name: str) -> int:
    """The size of the context mesh's axis `name` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get(name, 1)


def kernel_inputs(decode_pages: jax.Array, decode_positions: jax.Array, prefill_pages: jax.Array,
                  prefill_positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The step's layout as the kernel's kv_lens int32 [D + N], page_indices int32 [D + N, P], cu_q_lens int32
    [D + N + 1] and num_seqs int32 [1] (see the module docstring). decode_pages int32 [D, P], decode_positions int32
    [D] (-1: padding), prefill_pages int32 [N, P], prefill_positions int32 [N, Q] (-1: padding, at a block's end)."""
    d, (n, block) = decode_positions.shape[0], prefill_positions.shape
    kv_lens = jnp.concatenate([jnp.maximum(decode_positions, 0) + 1, jnp.maximum(prefill_positions[:, 0], 0) + block])
    page_indices = jnp.concatenate([decode_pages, prefill_pages]).astype(jnp.int32)
    cu_q_lens = np.concatenate([[0], np.cumsum([1] * d + [block] * n)]).astype(np.int32)
    return kv_lens.astype(jnp.int32), page_indices, jnp.asarray(cu_q_lens), jnp.array([d + n], jnp.int32)


def ragged_attention(q: jax.Array, kv_pages: jax.Array, decode_pages: jax.Array, decode_positions: jax.Array,
                     prefill_pages: jax.Array, prefill_positions: jax.Array, sliding_window: int | None, *,
                     reference: bool = False) -> jax.Array:
    """Attention of the step's T = D + N Q queries q [T, heads, head_dim] over the pool kv_pages [pages,
    page_size, 2 * kv_heads, head_dim], the step's own K/V already written into it; -> [T, heads, head_dim] in q's
    dtype, padding tokens zero. `reference`: jax's ref_ragged_paged_attention instead of the kernel, fed the same
    inputs (eager only: it loops over the sequences in Python)."""
    inputs = kernel_inputs(decode_pages, decode_positions, prefill_pages, prefill_positions)
    scale = q.shape[-1] ** -0.5
    if reference:
        out = rpa.ref_ragged_paged_attention(q, kv_pages, *inputs, sm_scale=scale, sliding_window=sliding_window)
    else:
        out = per_kv_shard(functools.partial(_kernel, sm_scale=scale, sliding_window=sliding_window), q, kv_pages,
                            inputs)
    valid = jnp.concatenate([decode_positions, prefill_positions.reshape(-1)]) >= 0  # [T]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def per_kv_shard(call, q: jax.Array, kv_pages: jax.Array, inputs: tuple[jax.Array, ...]) -> jax.Array:
    """`call(q, kv_pages, *inputs)` once per shard of the context mesh's "model" axis (query heads and combined K/V
    heads split alike, so a shard holds whole KV heads with their query heads); as is without one. A Pallas call
    (Mosaic, or Triton: zipjax.serve.gpu_paged) is never partitioned by XLA."""
    model = _axis("model")
    if model == 1:
        return call(q, kv_pages, *inputs)
    heads, pool = PartitionSpec(None, "model", None), PartitionSpec(None, None, "model", None)
    return jax.shard_map(call, in_specs=(heads, pool, *(PartitionSpec(),) * len(inputs)), out_specs=heads,
                         check_vma=False)(q, kv_pages, *inputs)


def _kernel(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array,
            num_seqs: jax.Array, *, sm_scale: float, sliding_window: int | None) -> jax.Array:
    """jax's kernel on one shard, with its block sizes chosen here (`block_sizes`)."""
    pages_per_block, queries_per_block = block_sizes(q, kv_pages, page_indices.shape[1])
    return rpa.ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                                      sliding_window=sliding_window, num_kv_pages_per_block=pages_per_block,
                                      num_queries_per_block=queries_per_block)


def block_sizes(q: jax.Array, kv_pages: jax.Array, pages_per_seq: int) -> tuple[int, int]:
    """(KV pages, queries) per kernel block: jax's tuned table for the chip traced for, else jax's defaults. jax's
    own lookup asks jax.devices()[0], the host's CPU while compiling ahead of time (zipjax.aot), and raises there;
    this asks the default device, which zipjax.aot sets to the target's."""
    device = jax.config.jax_default_device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    tokens, heads, head_dim = q.shape
    page_size, combined = kv_pages.shape[1:3]
    heads_per_block, combined_per_block = rpa.get_min_heads_per_blk(heads, combined, q.dtype, kv_pages.dtype)
    key = tuned.simplify_key((q.dtype, kv_pages.dtype, heads_per_block, combined_per_block // 2, head_dim, page_size,
                              tokens, pages_per_seq))
    name = " ".join(kind.split()[:2])
    default = (32, 32) if name == "TPU v4" else (128, 32)
    pages, queries = tuned.TUNED_BLOCK_SIZES.get(name, {}).get(key, default)
    return min(pages_per_seq, pages), min(tokens, queries)
