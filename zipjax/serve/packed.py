"""Packed KV pages for serving a compressed cache (ZipCache, KIVI, uniform): the page format, the compression of a
full dense page into it, and attention over packed pages read through a page table.

A sequence's pages are split in two: its oldest logical pages are packed (`PackedPool`), the newest stay dense in
the ordinary pool (zipjax.serve.paged.Pool), where every new token is written. A dense page is packed once it is
full and, for KIVI, once `residual` newer tokens follow it (KIVI's full-precision window); ZipCache and uniform pack
a page as soon as it is full (the page is their streaming window, `buffer_len` in the offline cache). The prompt is
attended at full precision, as in the papers: no page of a sequence is packed before its prompt is computed.

Page format: zipjax.kernels.paged_packed_attention's `PageLayout` (`PageCodec.layout`), read in place by the kernel
and by jax.numpy alike. Per layer a few pool arrays int32 [pages, kv_heads, R, head_dim] (R a multiple of 8, or 1, 2,
4: the shapes XLA:TPU lays out row-major, as the kernel's blocks read them) hold one record per page and KV head: each
subset's K and V codes (32 / bits tokens per int32 word, channels on lanes), the key statistics (channel-wise per
subset or run of tokens, or token-wise), the value statistics per token, each token's slot (ZipCache) and the CST
value scale, float16 pairs in int32 words. `PackedPool.page_bytes` counts them exactly; `layer_stores` decodes a
layer into the codec's `Store`s (zipjax.kv.codec) for inspection.

Page-local ranking (ZipCache): the paper ranks the prompt's tokens with probe queries from its end, so a compressed
prompt page would depend on tokens after it and could not be shared by the prefix cache. Serving ranks each page by
the queries inside it instead: every query adds the attention probability it gives the keys of its own page (the
dense pool's `mass`), and a full page is ranked by mass / (number of its queries that saw the token), the
normalized score the offline cache uses for its streaming buffer. A packed page is then a function of the tokens up
to its end only. Its quality cost against the whole-prompt ranking: benchmarks/kvcache.py --served.

Attention over packed pages (`packed_state`) follows the method's `kernel`: the Pallas kernel
zipjax.kernels.paged_packed_attention reads the records through the page table (per KV-head shard of the context
mesh) with kernel=True, and by default (None) on a TPU or a GPU; otherwise (a CPU by default, or False) jax.numpy
dequantizes a few pages at a time.
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
from zipjax.kernels.paged_packed_attention import PageLayout, paged_packed_attention
from zipjax.kv.codec import Codec, Store, channel_scale, dequantize, grouped, pack, unpack
from zipjax.kv.quantizing import buffer_score
from zipjax.platform import use_kernel


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
        (zipjax.platform.use_kernel: a TPU or a GPU). The lane-dense page format lets the TPU form read the pool in
        place (no relayout: tests/test_pallas_paged.py compiles it for a v5e and checks)."""
        return use_kernel(self.kernel)

    def layout(self, head_dim: int) -> PageLayout:
        """The page format of this method for heads of `head_dim` channels."""
        return PageLayout(head_dim, self.bits, self.sizes, self.codec.key_mode, self.codec.key_block,
                          self.codec.group, self.cst, self.ranked)


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
    """Every layer's packed pages: per layer the pool arrays of `PageCodec.layout` (int32 [pages, kv_heads, R,
    head_dim] each). `v_scale` stays None: the CST value scales are part of the page records (the field is kept for
    the call sites that rebuild a pool from `compress_layer`'s results)."""

    stores: tuple[tuple[jax.Array, ...], ...]
    v_scale: tuple[jax.Array, ...] | None = None

    @classmethod
    def init(cls, config: ModelConfig, spec: PageCodec, num_pages: int) -> PackedPool:
        h, d = config.num_kv_heads, config.head_dim
        leaves = spec.layout(d).leaves
        layer = lambda: tuple(jnp.zeros((num_pages, h, rows, d), jnp.int32) for rows in leaves)
        return cls(tuple(layer() for _ in range(config.num_layers)), None)

    @staticmethod
    def page_bytes(config: ModelConfig, spec: PageCodec) -> int:
        """Bytes one packed page takes over all layers."""
        shapes = jax.eval_shape(lambda: PackedPool.init(config, spec, 1))
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))

    def logical_axes(self) -> PackedPool:
        """Pages split by KV head (axis 1 of every leaf), like the dense pool."""
        by_head = lambda x: PartitionSpec(None, "kv_heads", *([None] * (x.ndim - 2)))
        return jax.tree.map(by_head, self)


def compress_layer(spec: PageCodec, k_pages: jax.Array, v_pages: jax.Array, mass: jax.Array | None,
                   stores: tuple[jax.Array, ...], v_scale: jax.Array | None, dense_ids: jax.Array,
                   packed_ids: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """Pack dense pages `dense_ids` [C] into packed pages `packed_ids` [C] of one layer's pool arrays `stores` (a
    pair (0, 0) is padding: it writes the null packed page, which no table reads). k_pages, v_pages [num_pages,
    page_size, kv_heads, head_dim]; mass float32 [num_pages, page_size, kv_heads] or None; v_scale: the pool's (None:
    the CST scales are written into the records), returned unchanged."""
    k = k_pages[dense_ids].transpose(0, 2, 1, 3).astype(jnp.float32)  # [C, kv_heads, page_size, head_dim]
    v = v_pages[dense_ids].transpose(0, 2, 1, 3).astype(jnp.float32)
    c, h, n, d = k.shape
    if spec.ranked:
        score = buffer_score(mass[dense_ids].transpose(0, 2, 1))  # [C, kv_heads, page_size]
        order = jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)
    else:
        order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (c, h, n))
    scale = None
    if spec.cst:
        scale = channel_scale(v, axis=2)  # [C, kv_heads, 1, head_dim]
        v = v / scale.astype(jnp.float32)
    subsets, first = [], 0
    for size, bits in zip(spec.sizes, spec.bits, strict=True):
        idx = jnp.sort(order[..., first:first + size], axis=-1)  # [C, kv_heads, size], slot order within a subset
        first += size
        take = functools.partial(jnp.take_along_axis, indices=idx[..., None], axis=2)
        subsets.append((spec.codec.encode(bits, take(k), take(v), jnp.ones(idx.shape, bool)), idx))
    layout = spec.layout(d)
    record = _encode(layout, subsets, scale)  # [C, kv_heads, rows, d]
    out, row = [], 0
    for pool, rows in zip(stores, layout.leaves, strict=True):
        out.append(pool.at[packed_ids].set(record[:, :, row:row + rows]))
        row += rows
    return tuple(out), v_scale


def _bits16(x: jax.Array) -> jax.Array:
    """float16 values -> their bits as uint32."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.uint32)


def _halves(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 words -> the float16 in their low and high halves."""
    half = lambda x: jax.lax.bitcast_convert_type((x & 0xFFFF).astype(jnp.uint16), jnp.float16)
    return half(words), half(words >> 16)


def _tables(store: Store, layout: PageLayout) -> dict:
    """A subset's token-wise statistics float16 [C, kv_heads, n, groups] by (kind, 0 step / 1 min)."""
    tables = {("v", 0): store.v_step, ("v", 1): store.v_min}
    if layout.key_mode == "token":
        tables |= {("k", 0): store.k_step, ("k", 1): store.k_min}
    return tables


def _encode(layout: PageLayout, subsets: list[tuple[Store, jax.Array]], scale: jax.Array | None) -> jax.Array:
    """The records int32 [C, kv_heads, rows, d] of C pages: per subset its encoded `Store` (zipjax.kv.codec) and
    slots int32 [C, kv_heads, n_s] (increasing); scale float16 [C, kv_heads, 1, d] (CST) or None. Every part of the
    record has bits of its own: parts are added."""
    plan = layout.plan
    c, h = subsets[0][1].shape[:2]
    record = jnp.zeros((c, h, layout.rows, layout.head_dim), jnp.uint32)
    at = lambda chunk: (slice(None), slice(None), chunk.row, slice(chunk.lane, chunk.lane + chunk.count))
    if scale is not None:
        record = record.at[at(plan.scale)].add(_bits16(scale[:, :, 0]) << (16 * plan.scale.high))
    for s, (store, slots) in enumerate(subsets):
        for kv, packed in enumerate((store.k_codes, store.v_codes)):
            codes = unpack(packed, layout.bits[s]).astype(jnp.uint32)  # [C, kv_heads, n_s, d]
            for run in plan.codes[s, kv]:
                record = record.at[:, :, run.row:run.row + run.count].add(
                    codes[:, :, run.first:run.first + run.count] << run.offset)
        for run in range(layout.runs(s)):
            stats = _bits16(store.k_step[:, :, run]) | (_bits16(store.k_min[:, :, run]) << 16)
            record = record.at[:, :, plan.key_stats[s, run]].add(stats)
        for (kind, part), values in _tables(store, layout).items():
            for g in range(layout.groups):
                for chunk in plan.table[kind, part, g, s]:
                    entries = values[:, :, chunk.first:chunk.first + chunk.count, g]
                    record = record.at[at(chunk)].add(_bits16(entries) << (16 * chunk.high))
        if layout.member_bits and s == 0:  # one bit per slot of the page: salient
            salient = jnp.any(slots[..., None] == jnp.arange(layout.page_size), axis=2).astype(jnp.uint32)
            for k, (row, offset) in enumerate(plan.member):  # slots k * d ..
                part = salient[..., k * layout.head_dim:(k + 1) * layout.head_dim]
                record = record.at[:, :, row, :part.shape[-1]].add(part << offset)
    return jax.lax.bitcast_convert_type(record, jnp.int32)


def _decode(layout: PageLayout, record: jax.Array) -> tuple[list[tuple[Store, jax.Array]], jax.Array | None]:
    """`_encode` inverted: records int32 [N, kv_heads, rows, d] -> per subset (Store with codes unpacked uint8
    [N, kv_heads, n_s, d], slots int32 [N, kv_heads, n_s]), and the CST scale float16 [N, kv_heads, 1, d] or None."""
    plan, out = layout.plan, []
    half = lambda chunk: _halves(record[:, :, chunk.row, chunk.lane:chunk.lane + chunk.count])[int(chunk.high)]
    slots = None
    if layout.member_bits:
        salient = jnp.concatenate([(record[:, :, row] >> offset) & 1 for row, offset in plan.member],
                                  axis=-1)[..., :layout.page_size]  # [N, kv_heads, page_size]
        slots = jnp.argsort(1 - salient, axis=-1, stable=True).astype(jnp.int32)  # salient slots, then the rest
    for s in range(len(layout.sizes)):
        n, bits = layout.sizes[s], layout.bits[s]
        codes = [jnp.concatenate([(record[:, :, r.row:r.row + r.count] >> r.offset) & ((1 << bits) - 1)
                                  for r in plan.codes[s, kv]], axis=2).astype(jnp.uint8) for kv in (0, 1)]
        stats = {(kind, part): jnp.stack([jnp.concatenate([half(c) for c in plan.table[kind, part, g, s]], axis=2)
                                          for g in range(layout.groups)], axis=-1)
                 for kind in layout.kinds for part in (0, 1)}  # [N, kv_heads, n_s, groups]
        if layout.key_mode == "channel":
            key = _halves(record[:, :, [plan.key_stats[s, run] for run in range(layout.runs(s))]])
            stats["k", 0], stats["k", 1] = key  # [N, kv_heads, runs, d]
        if slots is None:
            mine = jnp.broadcast_to(layout.first_slot(s) + jnp.arange(n, dtype=jnp.int32), (*record.shape[:2], n))
        else:
            mine = slots[..., layout.first_slot(s):layout.first_slot(s) + n]
        store = Store(codes[0], codes[1], mine, stats["k", 0], stats["k", 1], stats["v", 0], stats["v", 1])
        out.append((store, mine))
    scale = half(plan.scale)[:, :, None] if layout.cst else None
    return out, scale


def layer_stores(spec: PageCodec, pages: tuple[jax.Array, ...]) -> tuple[tuple[Store, ...], jax.Array | None]:
    """One layer's packed pool decoded into the codec's stores, the page as batch axis (codes packed as
    zipjax.kv.codec packs them, slots as int32), and the CST value scales float16 [pages, kv_heads, 1, head_dim]
    (or None): what a page holds, for inspection and tests."""
    subsets, scale = _decode(spec.layout(pages[0].shape[-1]), jnp.concatenate(pages, axis=2))
    stores = tuple(dataclasses.replace(store, k_codes=pack(store.k_codes, bits), v_codes=pack(store.v_codes, bits))
                   for (store, _), bits in zip(subsets, spec.bits, strict=True))
    return stores, scale


def packed_state(qg: jax.Array, stores: tuple[jax.Array, ...], v_scale: jax.Array | None, spec: PageCodec,
                 table: jax.Array, count: jax.Array, positions: jax.Array, sliding_window: int | None,
                 block_pages: int, state: SoftmaxState) -> SoftmaxState:
    """Fold a row's packed pages into its online-softmax state.

    qg [n, kv_heads, group, qn, head_dim] (grouped queries); stores: one layer's pool arrays (v_scale: the pool's,
    None); table int32 [n, P]: packed page ids of logical pages 0 .. count - 1 (count int32 [n]); positions int32
    [n, qn] (-1: padding). With `spec.uses_kernel` the Pallas kernel reads the records through the table
    (`kernel_state`); otherwise pages are read `block_pages` at a time up to the longest row's count, each
    dequantized and attended like a dense block."""
    del v_scale  # part of the records
    if spec.uses_kernel and _kernel_shards(stores[0].shape[1]) is not False:
        return kernel_state(qg, stores, spec, table, count, positions, sliding_window, state)
    num_blocks = (jnp.max(count) + block_pages - 1) // block_pages

    def step(j, state):
        pages = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)  # [n, bp]
        k, v, pos, logical = _dequantize(spec, stores, pages, j * block_pages)
        delta = positions[:, None, :, None] - pos[:, :, None, :]  # [n, kv_heads, qn, keys]
        visible = (delta >= 0) & (logical[None, :] < count[:, None])[:, None, None, :]
        if sliding_window is not None:
            visible &= delta < sliding_window
        return online_softmax_step(state, grouped_scores(qg, k.astype(qg.dtype)), visible[:, :, None],
                                   v.astype(qg.dtype), values=grouped_values)

    return jax.lax.fori_loop(0, num_blocks, step, state)


def kernel_state(qg: jax.Array, stores: tuple[jax.Array, ...], spec: PageCodec, table: jax.Array, count: jax.Array,
                 positions: jax.Array, sliding_window: int | None, state: SoftmaxState) -> SoftmaxState:
    """`packed_state` by zipjax.kernels.paged_packed_attention: its (out, lse) folded into the state by log-sum-exp
    (a row that saw nothing has lse MASK_VALUE and weighs nothing)."""
    call = functools.partial(paged_packed_attention, layout=spec.layout(qg.shape[-1]), sliding_window=sliding_window)
    args = (ungroup(qg), tuple(stores), table, count, positions)
    if _kernel_shards(qg.shape[1]):  # a Mosaic call is never partitioned automatically: one call per KV-head shard
        pool, heads = PartitionSpec(None, "model"), PartitionSpec(None, None, "model")
        replicated = PartitionSpec()
        specs = (heads, tuple(pool for _ in stores), replicated, replicated, replicated)
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


def _dequantize(spec: PageCodec, stores: tuple[jax.Array, ...], pages: jax.Array, first: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The keys of packed pages int32 [n, bp] (logical pages first .. first + bp - 1), subset after subset:
    k, v float32 [n, kv_heads, keys, head_dim], their positions int32 [n, kv_heads, keys] (logical page * page_size
    + slot: the ranking, hence the order, differs per KV head) and their logical pages int32 [keys]."""
    n, bp = pages.shape
    record = jnp.concatenate([x[pages].reshape(n * bp, *x.shape[1:]) for x in stores], axis=2)  # [n*bp, h, rows, d]
    layout = spec.layout(record.shape[-1])
    subsets, scale = _decode(layout, record)
    ks, vs, poss, logicals = [], [], [], []
    for s, (store, slots) in enumerate(subsets):
        size = layout.sizes[s]
        if layout.key_mode == "channel":
            runs = np.array([layout.run_of(t) for t in range(size)])
            k = dequantize(store.k_codes, store.k_step[:, :, runs], store.k_min[:, :, runs])
        else:
            k = dequantize(grouped(store.k_codes, layout.channels), store.k_step[..., None], store.k_min[..., None])
        v = dequantize(grouped(store.v_codes, layout.channels), store.v_step[..., None], store.v_min[..., None])
        v = v.reshape(store.v_codes.shape)
        if scale is not None:
            v = v * scale.astype(jnp.float32)
        logical = first + jnp.repeat(jnp.arange(bp, dtype=jnp.int32), size)  # [bp * size]
        ks.append(_by_head(k.reshape(store.k_codes.shape), n))
        vs.append(_by_head(v, n))
        poss.append(logical * spec.page_size + _by_head(slots[..., None], n)[..., 0])  # [n, kv_heads, bp * size]
        logicals.append(logical)
    return (jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2), jnp.concatenate(poss, axis=2),
            jnp.concatenate(logicals))


def _by_head(x: jax.Array, n: int) -> jax.Array:
    """[n * bp, kv_heads, size, d] -> [n, kv_heads, bp * size, d]."""
    rows, heads, size, d = x.shape
    return x.reshape(n, rows // n, heads, size, d).transpose(0, 2, 1, 3, 4).reshape(n, heads, -1, d)
