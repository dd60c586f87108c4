"""The paged KV cache of the serving engine: one pool of fixed-size pages per layer, shared by every sequence in
flight, and the `Cache` that one engine step runs the model with.

A step's batch is flat: T tokens from many requests, each its own row of the model's batch axis ([T, 1] tokens),
in two segments (the vLLM v1 order):

    decodes   D rows, one token each (the newest token of a running sequence)
    prefill   N blocks of Q tokens, each block a run of one sequence's prompt (chunked prefill; the last block of a
              prompt may be partly padding)

Every token's K/V is first written to its slot in the pool (`slots`: page * page_size + offset; padding tokens
write the null page 0, which no sequence owns), then the step attends over each sequence's pages, read through its
page table. A query sees the keys of its own sequence at positions up to its own (and within the sliding window):
prefix-cached pages, earlier chunks and the tokens of the same step alike. Positions are RoPE positions (0 = first
prompt token). On a TPU a dense pool is read by jax's ragged paged attention kernel (zipjax.serve.ragged), on a
GPU by zipjax's Triton paged dense attention kernel (zipjax.serve.gpu_paged), by the library's kernel policy
(`dense_route`); on a CPU, and beside packed pages, each segment's pages are read block by block with the
online softmax every zipjax attention shares (zipjax.kernels.common).

Pool layout per layer: one array [num_pages, page_size, 2 * kv_heads, head_dim], K and V interleaved on the
combined head axis (K of KV head h at 2h, its V at 2h + 1), the layout the TPU kernel reads; one scatter per layer
writes a step's K/V. The jnp path reads the K and the V of a block of pages with one gather each (`page_half`).

On a ("data", "model") mesh (`pool_shardings`) the pool is split, never replicated: KV heads over "model" as the
cache of `zipjax.generate` is (whole K/V pairs of the combined axis, so each KV head's K and V share a chip); where
the "model" axis does not divide the KV heads (LLaMA-3-70B's 8 on 16 chips) it is read as gcd(kv_heads, model) x
the rest, the KV heads split over the first factor and head_dim over the rest (packed pages, whose bytes are not
per channel: their pages); pages split over "data". Every chip then holds 1 / (data x model) of the pool, and
XLA's SPMD partitioner distributes the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zipjax.cache import replace_at
from zipjax.config import ModelConfig
from zipjax.kernels.common import (
    SoftmaxState,
    empty_state,
    group_queries,
    grouped_scores,
    grouped_values,
    normalise,
    online_softmax_step,
    ungroup,
)
from zipjax.serve.gpu_paged import dense_route, gpu_dense_attention
from zipjax.serve.packed import PackedPool, PageCodec, packed_state
from zipjax.serve.ragged import ragged_attention

NULL_PAGE = 0  # written by padding tokens, never allocated, never visible
POOL_AXES = ("data", "model", "model_minor")  # the mesh a pool is placed on (pool_mesh)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """Every layer's pages: kv per layer [num_pages, page_size, 2 * kv_heads, head_dim] (K and V interleaved, see the
    module docstring). Serving a compressed cache adds the packed pages (zipjax.serve.packed) and, for a ranked
    method, the attention mass each dense-page token received from the queries of its page, float32 per layer
    [num_pages, page_size, kv_heads]."""

    kv: tuple[jax.Array, ...]
    packed: PackedPool | None = None
    mass: tuple[jax.Array, ...] | None = None

    @classmethod
    def init(cls, config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype | None = None,
             spec: PageCodec | None = None, num_packed: int = 0) -> Pool:
        shape = (num_pages, page_size, 2 * config.num_kv_heads, config.head_dim)
        dtype = dtype or config.jnp_dtype
        packed = mass = None
        if spec is not None:
            packed = PackedPool.init(config, spec, num_packed)
            if spec.ranked:
                mass = tuple(jnp.zeros((num_pages, page_size, config.num_kv_heads), jnp.float32)
                             for _ in range(config.num_layers))
        return cls(kv=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)), packed=packed, mass=mass)

    @property
    def k(self) -> Sequence[jax.Array]:
        """Each layer's keys [num_pages, page_size, kv_heads, head_dim], a view of `kv` made when a layer is read
        (for readers of whole pages, such as the pack step's zipjax.serve.packed.compress_layer)."""
        return _Halves(self.kv, 0)

    @property
    def v(self) -> Sequence[jax.Array]:
        """Each layer's values, like `k`."""
        return _Halves(self.kv, 1)

    @staticmethod
    def page_bytes(config: ModelConfig, page_size: int, dtype: jnp.dtype | None = None, ranked: bool = False) -> int:
        """Bytes one dense page takes over all layers, K and V (and the attention mass of a ranked method)."""
        itemsize = jnp.dtype(dtype or config.jnp_dtype).itemsize
        per_token = 2 * config.num_kv_heads * config.head_dim * itemsize + (4 * config.num_kv_heads if ranked else 0)
        return config.num_layers * page_size * per_token

    def logical_axes(self) -> Pool:
        """The combined axis is named "kv_heads"; `pool_shardings` places a pool (it splits that axis only into
        whole K/V pairs)."""
        spec = PartitionSpec(None, None, "kv_heads", "head_dim")
        mass = None if self.mass is None else (PartitionSpec(None, None, "kv_heads"),) * len(self.mass)
        packed = None if self.packed is None else self.packed.logical_axes()
        return Pool(kv=(spec,) * len(self.kv), packed=packed, mass=mass)


class _Halves(Sequence):
    """The K (half 0) or V (half 1) of every layer of a pool, each split from its layer's `kv` when indexed."""

    def __init__(self, kv: tuple[jax.Array, ...], half: int):
        self._kv, self._half = kv, half

    def __len__(self) -> int:
        return len(self._kv)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return tuple(split_kv(kv)[self._half] for kv in self._kv[layer])
        return split_kv(self._kv[layer])[self._half]


def combine_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [..., kv_heads, head_dim] -> [..., 2 * kv_heads, head_dim], interleaved (k0, v0, k1, v1, ...)."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def split_kv(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., 2 * kv_heads, head_dim] (interleaved) -> k, v [..., kv_heads, head_dim]."""
    pairs = kv.reshape(*kv.shape[:-2], kv.shape[-2] // 2, 2, kv.shape[-1])
    return pairs[..., 0, :], pairs[..., 1, :]


def page_half(kv_pages: jax.Array, pages: jax.Array, half: int) -> jax.Array:
    """The keys (half 0) or values (half 1) of pages int32 [...] of kv_pages [num_pages, page_size, 2 * kv_heads,
    head_dim] -> [..., page_size, kv_heads, head_dim]: one gather that reads only that half. (Gathering whole pages
    and splitting them after costs XLA:CPU a copy of every block read: the gather, having two users, is no longer
    fused into each one's transpose.)"""
    pairs = kv_pages.reshape(*kv_pages.shape[:2], kv_pages.shape[2] // 2, 2, kv_pages.shape[3])
    return pairs[pages, :, :, half]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where a step's flat tokens go and what each may see (host-built, see the module docstring)."""

    slots: jax.Array  # int32 [T]: flat pool slot of each token's K/V (padding: in the null page)
    decode_pages: jax.Array  # int32 [D, P]: page table of each decode row (null-page padded)
    decode_positions: jax.Array  # int32 [D]: position of the row's token; -1 for a padding row
    prefill_pages: jax.Array  # int32 [N, P]: page table of each prefill block's sequence
    prefill_positions: jax.Array  # int32 [N, Q]: position of each block token; -1 for padding
    # a compressed cache only: the packed pages of logical pages 0 .. first - 1; the dense tables above then hold
    # logical pages first, first + 1, ...
    decode_packed: jax.Array | None = None  # int32 [D, P]
    decode_first: jax.Array | None = None  # int32 [D]
    prefill_packed: jax.Array | None = None  # int32 [N, P]
    prefill_first: jax.Array | None = None  # int32 [N]

    @property
    def num_decode(self) -> int:
        return self.decode_positions.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The `zipjax.cache.Cache` of one engine step: the pool and the step's layout. `block_pages` pages are read per
    iteration of the jnp attention loop; `spec` is the packed page format of a compressed cache (None: dense);
    `kernel` whether a dense pool is read by the platform's paged attention kernel (zipjax.serve.gpu_paged.dense_route:
    jax's ragged paged attention on a TPU, zipjax's Triton kernel on a GPU; None, the default, where it fits; True
    forces it, on a CPU the GPU kernel interpreted; False never)."""

    pool: Pool
    layout: StepLayout
    block_pages: int = dataclasses.field(metadata={"static": True}, default=8)
    spec: PageCodec | None = dataclasses.field(metadata={"static": True}, default=None)
    kernel: bool | None = dataclasses.field(metadata={"static": True}, default=None)
    accepts_chunks: ClassVar[bool] = True

    @property
    def batch(self) -> int:
        return self.layout.slots.shape[0]

    @property
    def max_len(self) -> int:
        return self.layout.decode_pages.shape[1] * self.pool.kv[0].shape[1]

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        """The host scheduler built the layout for exactly these tokens; only the flat shape is checked."""
        if tokens_shape != (self.batch, 1):
            raise ValueError(f"a paged step takes [{self.batch}, 1] tokens, got {tokens_shape}")

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.pool))

    def logical_axes(self) -> PagedCache:
        layout = jax.tree.map(lambda _: PartitionSpec(), self.layout)
        return PagedCache(self.pool.logical_axes(), layout, self.block_pages, self.spec, self.kernel)

    def advance(self, num_tokens: int) -> PagedCache:
        return self

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, PagedCache]:
        """q [T, 1, heads, head_dim]; k_new, v_new [T, 1, kv_heads, head_dim] -> out [T, 1, heads, head_dim]. The
        step's K/V are written into the pool first: every reader below reads only the pool."""
        pool, layout = self.pool, self.layout
        kv_pool = _write(pool.kv[layer], combine_kv(k_new[:, 0], v_new[:, 0]), layout.slots)
        mass = None
        route = dense_route(self.kernel, q.shape[2], kv_pool) if self.spec is None else None
        if route is not None:
            attend = ragged_attention if route == "tpu" else gpu_dense_attention
            out = attend(q[:, 0], kv_pool, layout.decode_pages, layout.decode_positions, layout.prefill_pages,
                         layout.prefill_positions, sliding_window)[:, None]
        else:
            if pool.mass is not None:
                mass = _write(pool.mass[layer], jnp.zeros(k_new.shape[:1] + k_new.shape[2:3]), layout.slots)
            out, mass = self._segments(layer, q, kv_pool, mass, sliding_window)
        pool = dataclasses.replace(pool, kv=replace_at(pool.kv, layer, kv_pool),
                                   mass=None if mass is None else replace_at(pool.mass, layer, mass))
        return out, dataclasses.replace(self, pool=pool)

    def _segments(self, layer: int, q: jax.Array, kv_pool: jax.Array, mass: jax.Array | None,
                  sliding_window: int | None) -> tuple[jax.Array, jax.Array | None]:
        """The jnp path: the decode rows, then the prefill blocks, each over its packed pages (a compressed cache)
        and its dense pages; the page-local attention mass added for a ranked method."""
        pool, layout = self.pool, self.layout
        d = layout.num_decode
        heads, head_dim = q.shape[2], q.shape[3]
        n, block = layout.prefill_positions.shape
        segments = []
        if d:
            segments.append((q[:d].reshape(d, 1, heads, head_dim), layout.decode_pages,
                             layout.decode_positions[:, None], layout.decode_packed, layout.decode_first))
        if n:
            segments.append((q[d:].reshape(n, block, heads, head_dim), layout.prefill_pages, layout.prefill_positions,
                             layout.prefill_packed, layout.prefill_first))
        parts = []
        for qs, table, positions, packed_table, first in segments:
            qg = group_queries(qs, kv_pool.shape[2] // 2)  # [rows, kv_heads, group, qn, head_dim]
            state = empty_state(qg.shape[:4], head_dim)
            if self.spec is not None:
                stores = pool.packed.stores[layer]
                v_scale = None if pool.packed.v_scale is None else pool.packed.v_scale[layer]
                state = packed_state(qg, stores, v_scale, self.spec, packed_table, first, positions, sliding_window,
                                     self.block_pages, state)
            state = paged_state(qg, kv_pool, table, positions, first, sliding_window, self.block_pages, state)
            if mass is not None:
                mass = add_page_mass(mass, qg, kv_pool, table, positions, first, sliding_window, state)
            parts.append(ungroup(normalise(state)).astype(q.dtype).reshape(-1, 1, heads, head_dim))
        return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)), mass


def _write(pages: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """pages [num_pages, page_size, ...] with new [T, ...] written at flat slots [T]."""
    num_pages, page_size = pages.shape[:2]
    flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
    return flat.at[slots].set(new.astype(pages.dtype)).reshape(pages.shape)


def paged_attention(q: jax.Array, kv_pages: jax.Array, page_table: jax.Array, positions: jax.Array,
                    sliding_window: int | None, block_pages: int) -> jax.Array:
    """Causal attention of n query rows over their sequences' dense pages, in plain jax.numpy (the CPU path).

    q [n, qn, heads, head_dim]: row r's queries at positions[r] (int32 [n, qn], -1: padding, sees nothing);
    kv_pages [num_pages, page_size, 2 * kv_heads, head_dim] (interleaved); page_table int32 [n, P], P a multiple of
    block_pages. Returns [n, qn, heads, head_dim] in q's dtype."""
    qg = group_queries(q, kv_pages.shape[2] // 2)  # [n, kv_heads, group, qn, head_dim]
    state = paged_state(qg, kv_pages, page_table, positions, None, sliding_window, block_pages,
                        empty_state(qg.shape[:4], q.shape[-1]))
    return ungroup(normalise(state)).astype(q.dtype)


def paged_state(qg: jax.Array, kv_pages: jax.Array, page_table: jax.Array, positions: jax.Array,
                first: jax.Array | None, sliding_window: int | None, block_pages: int,
                state: SoftmaxState) -> SoftmaxState:
    """Fold n query rows' dense pages (kv_pages [num_pages, page_size, 2 * kv_heads, head_dim], interleaved) into
    their online-softmax state: qg [n, kv_heads, group, qn, head_dim] at positions int32 [n, qn]; page_table int32
    [n, P] holds logical pages first[r], first[r] + 1, ... (first int32 [n], None: 0). Keys are read `block_pages`
    pages at a time up to the furthest position any row needs, so a step reads the filled extent of its sequences,
    never the whole table."""
    n = positions.shape[0]
    page_size, kv_heads, head_dim = kv_pages.shape[1], kv_pages.shape[2] // 2, kv_pages.shape[3]
    block_keys = block_pages * page_size
    offset = jnp.zeros((n,), jnp.int32) if first is None else first * page_size  # [n]: position of table slot 0
    num_blocks = (jnp.max(positions - offset[:, None]) + block_keys) // block_keys  # blocks holding a visible key

    def step(j, state):
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * block_pages, block_pages, axis=1)  # [n, bp]
        k, v = (page_half(kv_pages, pages, half).reshape(n, block_keys, kv_heads, head_dim).transpose(0, 2, 1, 3)
                .astype(qg.dtype) for half in (0, 1))  # [n, kv_heads, block_keys, head_dim]
        key_pos = offset[:, None] + j * block_keys + jnp.arange(block_keys, dtype=jnp.int32)  # [n, block_keys]
        delta = positions[:, :, None] - key_pos[:, None, :]  # [n, qn, block_keys]
        visible = delta >= 0
        if sliding_window is not None:
            visible &= delta < sliding_window
        return online_softmax_step(state, grouped_scores(qg, k), visible[:, None, None], v, values=grouped_values)

    return jax.lax.fori_loop(0, num_blocks, step, state)


def add_page_mass(mass: jax.Array, qg: jax.Array, kv_pages: jax.Array, page_table: jax.Array, positions: jax.Array,
                  first: jax.Array, sliding_window: int | None, state: SoftmaxState) -> jax.Array:
    """Add to each dense-page token the attention probability the queries of its own page give it (summed over
    the query heads of its KV head): the page-local saliency of zipjax.serve.packed. mass float32 [num_pages,
    page_size, kv_heads]; kv_pages [num_pages, page_size, 2 * kv_heads, head_dim]; state: the queries' final
    softmax state over everything they see."""
    page_size, kv_heads = mass.shape[1:]
    logical = jnp.maximum(positions, 0) // page_size  # [n, qn]: each query's own page
    index = jnp.clip(logical - first[:, None], 0, page_table.shape[1] - 1)
    pages = jnp.where(positions >= 0, jnp.take_along_axis(page_table, index, axis=1), NULL_PAGE)  # [n, qn]
    keys = page_half(kv_pages, pages, 0).astype(qg.dtype)  # [n, qn, page_size, kv_heads, head_dim]
    scores = jnp.einsum("nkgqd,nqskd->nkgqs", qg, keys, preferred_element_type=jnp.float32) * qg.shape[-1] ** -0.5
    key_pos = logical[:, :, None] * page_size + jnp.arange(page_size)  # [n, qn, page_size]
    delta = positions[:, :, None] - key_pos
    visible = (delta >= 0) & (positions[:, :, None] >= 0)
    if sliding_window is not None:
        visible &= delta < sliding_window
    lse = state.max + jnp.log(jnp.maximum(state.denom, 1e-30))  # [n, kv_heads, group, qn, 1]
    probs = jnp.where(visible[:, None, None], jnp.exp(scores - lse), 0.0).sum(axis=2)  # [n, kv_heads, qn, page_size]
    flat = mass.reshape(-1, kv_heads)
    slots = (pages[:, :, None] * page_size + jnp.arange(page_size)).reshape(-1)  # [n * qn * page_size]
    return flat.at[slots].add(probs.transpose(0, 2, 3, 1).reshape(-1, kv_heads)).reshape(mass.shape)


def pool_mesh(mesh: Mesh, kv_heads: int) -> Mesh:
    """`mesh`'s devices, in the same order, as ("data", "model", "model_minor"): "model" of size gcd(kv_heads,
    model) takes the KV heads, "model_minor" the rest of the model axis (size 1 where it divides the KV heads). Chip
    i of the model axis then holds KV head i // model_minor, the one its query heads (split over "model" by the
    parameters' rules) read."""
    data, model = mesh.shape["data"], mesh.shape["model"]
    heads = math.gcd(kv_heads, model)
    return Mesh(mesh.devices.reshape(data, heads, model // heads), POOL_AXES, axis_types=(AxisType.Auto,) * 3)


def page_shards(mesh: Mesh | None, kv_heads: int) -> int:
    """Shards of a pool's page axis on `mesh` (pool_shardings): a page count must be a multiple of it."""
    if mesh is None:
        return 1
    refined = pool_mesh(mesh, kv_heads)
    return refined.shape["data"] * refined.shape["model_minor"]


def pool_shardings(pool: Pool, mesh: Mesh) -> Pool:
    """NamedShardings of every array of `pool` on a ("data", "model") mesh (see the module docstring): dense K/V
    [pages over data, -, KV heads over model (whole K/V pairs of the combined axis), head_dim over model_minor]; the
    attention mass and packed pages [pages over (data, model_minor), (-,) KV heads over model, ...]. An axis a
    dimension does not divide is left out (that dimension is then not split by it)."""
    kv_heads, head_dim = pool.kv[0].shape[2] // 2, pool.kv[0].shape[3]
    refined = pool_mesh(mesh, kv_heads)
    sizes = dict(refined.shape)

    def fitted(size: int, *axes: str) -> str | tuple[str, ...] | None:
        kept = tuple(a for a in axes if sizes[a] > 1)
        kept = kept if kept and size % math.prod(sizes[a] for a in kept) == 0 else ()
        return kept[0] if len(kept) == 1 else (kept or None)

    def named(*spec) -> NamedSharding:
        return NamedSharding(refined, PartitionSpec(*spec))

    minor_on_dim = head_dim % sizes["model_minor"] == 0
    # the combined axis takes "model" only where it divides the KV heads: its shards are then whole K/V pairs
    dense = lambda x: named(fitted(x.shape[0], "data", *(() if minor_on_dim else ("model_minor",))), None,
                            fitted(kv_heads, "model"), fitted(head_dim, "model_minor") if minor_on_dim else None)
    by_page = lambda x, head_axis: named(fitted(x.shape[0], "data", "model_minor"), *(None,) * (head_axis - 1),
                                         fitted(kv_heads, "model"), *(None,) * (x.ndim - head_axis - 1))
    packed = None if pool.packed is None else jax.tree.map(lambda x: by_page(x, 1), pool.packed)
    mass = None if pool.mass is None else tuple(by_page(x, 2) for x in pool.mass)
    return Pool(kv=tuple(map(dense, pool.kv)), packed=packed, mass=mass)
