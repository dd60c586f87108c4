"""Packed KV pages for serving a compressed cache (ZipCache, KIVI, uniform): the page format, the compression of a
full dense page into it, and attention over packed pages read through a page table.

A sequence's pages are split in two: its oldest logical pages are packed (`PackedPool`), the newest stay dense in
the ordinary pool (zipjax.serve.paged.Pool), where every new token is written. A dense page is packed once it is
full and, for KIVI, once `residual` newer tokens follow it (KIVI's full-precision window); ZipCache and uniform pack
a page as soon as it is full (the page is their streaming window, `buffer_len` in the offline cache). The prompt is
attended at full precision, as in the papers: no page of a sequence is packed before its prompt is computed.

Page format, per layer and subset s (ZipCache: s = 0 salient at high bits, s = 1 the rest at low bits; KIVI and
uniform: one subset), the codec's `Store` with the page as its batch axis:

    K, V codes       uint8   [pages, kv_heads, n_s, head_dim * bits_s / 8]   packed, n_s = method.split(page_size)[s]
    slots            uint8   [pages, kv_heads, n_s]                          offset of each token within its page
    K (step, min)    float16 [pages, kv_heads, runs, head_dim]               channel-wise keys (per page and subset,
                                                                              KIVI: per run of `group` tokens)
                     or      [pages, kv_heads, n_s, groups]                  token-wise keys (uniform)
    V (step, min)    float16 [pages, kv_heads, n_s, groups]                  token-wise values
  and per layer, CST values only: V channel scale float16 [pages, kv_heads, 1, head_dim].

Page-local ranking (ZipCache): the paper ranks the prompt's tokens with probe queries from its end, so a compressed
prompt page would depend on tokens after it and could not be shared by the prefix cache. Serving ranks each page by
the queries inside it instead: every query adds the attention probability it gives the keys of its own page (the
dense pool's `mass`), and a full page is ranked by mass / (number of its queries that saw the token), the
normalized score the offline cache uses for its streaming buffer. A packed page is then a function of the tokens up
to its end only. Its quality cost against the whole-prompt ranking: benchmarks/kvcache.py --served.

Attention over packed pages (`packed_state`) follows the method's `kernel`: the Pallas kernel
zipjax.kernels.paged_packed_attention reads the codes through the page table (per KV-head shard of the context
mesh) with kernel=True, and by default (None) on a GPU; otherwise jax.numpy dequantizes a few pages at a time (on a
TPU by default too, see `PageCodec.uses_kernel`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kernels.common import MASK_VALUE, SoftmaxState, grouped_scores, grouped_values, online_softmax_step, ungroup
from zipjax.kernels.paged_packed_attention import PagedSubset, paged_packed_attention
from zipjax.kv.codec import Codec, Store, channel_scale
from zipjax.kv.quantizing import buffer_score
from zipjax.platform import platform, use_kernel


@dataclasses.dataclass(frozen=True)
class PageCodec:
    """How one KV method packs a page of `page_size` tokens (static: it selects compilations)."""

    name: str  # the method's repr: the prefix cache's salt
    codec: Codec
    bits: tuple[int, ...]  # per subset
    sizes: tuple[int, ...]  # tokens per subset per page (sum: page_size)
    ranked: bool  # subsets chosen by the page-local normalized score (else: in slot order)
    lag: int  # tokens that must follow a full page before it is packed
    kernel: bool | None = None  # attention over packed pages: the paged Pallas kernel or jnp (`uses_kernel`)

    @property
    def page_size(self) -> int:
        return sum(self.sizes)

    @property
    def cst(self) -> bool:
        return self.codec.value_mode == "cst"

    @property
    def uses_kernel(self) -> bool:
        """Whether `packed_state` runs zipjax.kernels.paged_packed_attention, for the platform being traced: True
        runs it everywhere (interpreted on a CPU), False never; None by the library's kernel policy
        (zipjax.platform.use_kernel), except on a TPU: XLA lays the pool's narrow uint8 arrays out page-minor there
        and the kernel's row-major tiles would relayout every layer's pool each step (measured in the kernel's
        tests), so None keeps jax.numpy on a TPU until the page format is lane-dense."""
        if self.kernel is None and platform() == "tpu":
            return False
        return use_kernel(self.kernel)


def page_codec(method, config: ModelConfig, page_size: int) -> PageCodec:
    """The page format of a KV method, or a ZipjaxError naming why the method is not served."""
    from zipjax.kv.kivi import KIVI
    from zipjax.kv.method import check_packing
    from zipjax.kv.uniform import Uniform
    from zipjax.kv.zipcache import ZipCache

    if isinstance(method, ZipCache):
        sizes, bits, ranked, lag = method.split(page_size), method.subset_bits, True, 0
    elif isinstance(method, Uniform):
        sizes, bits, ranked, lag = (page_size, 0), (method.bits, method.bits), False, 0
    elif isinstance(method, KIVI):
        sizes, bits, ranked, lag = (page_size, 0), (method.bits, method.bits), False, method.residual
    else:
        name = getattr(method, "name", type(method).__name__)
        why = {"zipvl": "its important-token ratio is chosen per layer from the whole prompt's attention, and its "
                        "sparse prefill needs the whole prompt at once (chunked prefill does not have it)",
               "minicache": "it merges the K/V of adjacent layers, which the per-layer page pools do not share"}
        raise ZipjaxError(f"--kv {name} is not served: {why.get(name, 'no packed page format for it')}; serve "
                          "dense, zipcache, kivi or uniform")
    kept = tuple((n, b) for n, b in zip(sizes, bits, strict=True) if n)
    check_packing(config, tuple(b for _, b in kept), method.codec.group)
    return PageCodec(repr(method), method.codec, tuple(b for _, b in kept), tuple(n for n, _ in kept), ranked, lag,
                     getattr(method, "kernel", None))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedPool:
    """Every layer's packed pages: per layer one `Store` per subset, and the CST value scales (or None)."""

    stores: tuple[tuple[Store, ...], ...]
    v_scale: tuple[jax.Array, ...] | None

    @classmethod
    def init(cls, config: ModelConfig, spec: PageCodec, num_pages: int) -> PackedPool:
        h, d = config.num_kv_heads, config.head_dim
        slot_dtype = jnp.uint8 if spec.page_size <= 256 else jnp.int16

        def layer() -> tuple[Store, ...]:
            stores = []
            for n, bits in zip(spec.sizes, spec.bits, strict=True):
                runs = _key_runs(spec.codec, n)
                store = spec.codec.empty_store(num_pages, h, d, bits, n, runs, slot_dtype)
                stores.append(store)
            return tuple(stores)

        scale = tuple(jnp.ones((num_pages, h, 1, d), jnp.float16) for _ in range(config.num_layers))
        return cls(tuple(layer() for _ in range(config.num_layers)), scale if spec.cst else None)

    @staticmethod
    def page_bytes(config: ModelConfig, spec: PageCodec) -> int:
        """Bytes one packed page takes over all layers."""
        shapes = jax.eval_shape(lambda: PackedPool.init(config, spec, 1))
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))

    def logical_axes(self) -> PackedPool:
        """Pages split by KV head (axis 1 of every leaf), like the dense pool."""
        by_head = lambda x: PartitionSpec(None, "kv_heads", *([None] * (x.ndim - 2)))
        return jax.tree.map(by_head, self)


def _key_runs(codec: Codec, n: int) -> int:
    """Channel-wise key statistics per page and subset: one, or one per run of `key_block` tokens."""
    if codec.key_mode != "channel":
        return 1  # unused: token-wise keys keep per-token statistics
    return -(-n // codec.key_block) if codec.key_block else 1


def compress_layer(spec: PageCodec, k_pages: jax.Array, v_pages: jax.Array, mass: jax.Array | None,
                   stores: tuple[Store, ...], v_scale: jax.Array | None, dense_ids: jax.Array,
                   packed_ids: jax.Array) -> tuple[tuple[Store, ...], jax.Array | None]:
    """Pack dense pages `dense_ids` [C] into packed pages `packed_ids` [C] of one layer (a pair (0, 0) is padding:
    it writes the null packed page, which no table reads). k_pages, v_pages [num_pages, page_size, kv_heads,
    head_dim]; mass float32 [num_pages, page_size, kv_heads] or None."""
    k = k_pages[dense_ids].transpose(0, 2, 1, 3).astype(jnp.float32)  # [C, kv_heads, page_size, head_dim]
    v = v_pages[dense_ids].transpose(0, 2, 1, 3).astype(jnp.float32)
    c, h, n = k.shape[:3]
    if spec.ranked:
        score = buffer_score(mass[dense_ids].transpose(0, 2, 1))  # [C, kv_heads, page_size]
        order = jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)
    else:
        order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (c, h, n))
    scale = None
    if spec.cst:
        scale = channel_scale(v, axis=2)  # [C, kv_heads, 1, head_dim]
        v = v / scale.astype(jnp.float32)
        v_scale = v_scale.at[packed_ids].set(scale)
    out, first = [], 0
    for store, size, bits in zip(stores, spec.sizes, spec.bits, strict=True):
        idx = jnp.sort(order[..., first:first + size], axis=-1)  # [C, kv_heads, size], slot order within a subset
        first += size
        take = functools.partial(jnp.take_along_axis, indices=idx[..., None], axis=2)
        new = spec.codec.encode(bits, take(k), take(v), jnp.ones(idx.shape, bool))
        new = dataclasses.replace(new, slots=idx.astype(store.slots.dtype))
        out.append(jax.tree.map(lambda pool, x: pool.at[packed_ids].set(x.astype(pool.dtype)), store, new))
    return tuple(out), v_scale


def packed_state(qg: jax.Array, stores: tuple[Store, ...], v_scale: jax.Array | None, spec: PageCodec,
                 table: jax.Array, count: jax.Array, positions: jax.Array, sliding_window: int | None,
                 block_pages: int, state: SoftmaxState) -> SoftmaxState:
    """Fold a row's packed pages into its online-softmax state.

    qg [n, kv_heads, group, qn, head_dim] (grouped queries); table int32 [n, P]: packed page ids of logical pages
    0 .. count - 1 (count int32 [n]); positions int32 [n, qn] (-1: padding). With `spec.uses_kernel` the Pallas
    kernel reads the codes through the table (`kernel_state`); otherwise pages are read `block_pages` at a time up to
    the longest row's count, each dequantized (zipjax.kv.codec) and attended like a dense block."""
    if spec.uses_kernel and _kernel_shards(stores[0].k_codes.shape[1]) is not False:
        return kernel_state(qg, stores, v_scale, spec, table, count, positions, sliding_window, state)
    num_blocks = (jnp.max(count) + block_pages - 1) // block_pages

    def step(j, state):
        pages = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)  # [n, bp]
        k, v, pos, logical = _dequantize(spec, stores, v_scale, pages, j * block_pages)
        delta = positions[:, None, :, None] - pos[:, :, None, :]  # [n, kv_heads, qn, keys]
        visible = (delta >= 0) & (logical[None, :] < count[:, None])[:, None, None, :]
        if sliding_window is not None:
            visible &= delta < sliding_window
        return online_softmax_step(state, grouped_scores(qg, k.astype(qg.dtype)), visible[:, :, None],
                                   v.astype(qg.dtype), values=grouped_values)

    return jax.lax.fori_loop(0, num_blocks, step, state)


def kernel_state(qg: jax.Array, stores: tuple[Store, ...], v_scale: jax.Array | None, spec: PageCodec,
                 table: jax.Array, count: jax.Array, positions: jax.Array, sliding_window: int | None,
                 state: SoftmaxState) -> SoftmaxState:
    """`packed_state` by zipjax.kernels.paged_packed_attention: its (out, lse) folded into the state by log-sum-exp
    (a row that saw nothing has lse MASK_VALUE and weighs nothing)."""
    subsets = tuple(PagedSubset(s.k_codes, s.v_codes, s.slots, s.k_step, s.k_min, s.v_step, s.v_min) for s in stores)
    call = functools.partial(paged_packed_attention, bits=spec.bits, page_size=spec.page_size,
                             key_mode=spec.codec.key_mode, key_block=spec.codec.key_block, group=spec.codec.group,
                             sliding_window=sliding_window)
    args = (ungroup(qg), subsets, v_scale, table, count, positions)
    if _kernel_shards(qg.shape[1]):  # a Mosaic call is never partitioned automatically: one call per KV-head shard
        pool, heads = PartitionSpec(None, "model"), PartitionSpec(None, None, "model")
        replicated = PartitionSpec()
        specs = (heads, jax.tree.map(lambda _: pool, subsets), None if v_scale is None else pool, replicated,
                 replicated, replicated)
        call = jax.shard_map(call, in_specs=specs, out_specs=(heads, heads), check_vma=False)
    out, lse = call(*args)  # [n, qn, heads, d], [n, qn, heads]
    n, kv_heads, group, qn, _ = qg.shape
    grouped = lambda x: x.reshape(n, qn, kv_heads, group, -1).transpose(0, 2, 3, 1, 4)  # -> [n, kv, G, qn, -1]
    top, seen = grouped(lse[..., None]), grouped((lse > MASK_VALUE / 2)[..., None].astype(jnp.float32))
    new_max = jnp.maximum(state.max, top)
    mine, theirs = jnp.exp(top - new_max) * seen, jnp.exp(state.max - new_max)
    return SoftmaxState(new_max, theirs * state.denom + mine, theirs * state.acc + mine * grouped(out))


def _kernel_shards(kv_heads: int) -> bool | None:
    """How the kernel runs on the context mesh (`jax.set_mesh`): None without one or with a "model" axis of 1 (as
    is), True when "model" divides the KV heads (per shard of the pool, split by KV head as `logical_axes` places
    it), False otherwise (the pool is not split by head: `packed_state` takes the jnp path)."""
    mesh = jax.sharding.get_abstract_mesh()
    model = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get("model", 1)
    if model == 1:
        return None
    return kv_heads % model == 0


def _dequantize(spec: PageCodec, stores: tuple[Store, ...], v_scale: jax.Array | None, pages: jax.Array,
                first: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The keys of packed pages int32 [n, bp] (logical pages first .. first + bp - 1), subset after subset:
    k, v float32 [n, kv_heads, keys, head_dim], their positions int32 [n, kv_heads, keys] (logical page * page_size
    + slot: the ranking, hence the order, differs per KV head) and their logical pages int32 [keys]."""
    n, bp = pages.shape
    ks, vs, poss, logicals = [], [], [], []
    for store, bits in zip(stores, spec.bits, strict=True):
        got = jax.tree.map(lambda x: x[pages].reshape(n * bp, *x.shape[1:]), store)  # [n * bp, kv_heads, ...]
        heads, size = got.k_codes.shape[1:3]
        scale = None
        if v_scale is not None:
            scale = v_scale[pages].reshape(n * bp, heads, 1, -1)
        k, v = spec.codec.decode(got, bits, np.zeros((size,), np.int32), scale)  # [n * bp, kv_heads, size, d]
        logical = first + jnp.repeat(jnp.arange(bp, dtype=jnp.int32), size)  # [bp * size]
        ks.append(_by_head(k, n))
        vs.append(_by_head(v, n))
        slots = _by_head(got.slots.astype(jnp.int32)[..., None], n)[..., 0]  # [n, kv_heads, bp * size]
        poss.append(logical * spec.page_size + slots)
        logicals.append(logical)
    return (jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2), jnp.concatenate(poss, axis=2),
            jnp.concatenate(logicals))


def _by_head(x: jax.Array, n: int) -> jax.Array:
    """[n * bp, kv_heads, size, d] -> [n, kv_heads, bp * size, d]."""
    rows, heads, size, d = x.shape
    return x.reshape(n, rows // n, heads, size, d).transpose(0, 2, 1, 3, 4).reshape(n, heads, -1, d)
