"""The paged packed-KV kernel (zipjax.kernels.paged_packed_attention) against its jnp reference, the serving path's
`packed_state` (zipjax.serve.packed), and compiled ahead of time for a TPU v5e and an H100 at LLaMA-3-8B decode
shapes.

Pools are packed by the library's own `compress_layer` from random dense pages (ZipCache's ranked 4/2-bit subsets
with CST values, KIVI's 8-token key runs, uniform's token-wise keys, also in groups of 8 channels), read through a
shuffled page table with ragged counts (one row with no packed page, one padding query), one or several queries per
row, with and without a sliding window, with the table split over two programs. Both forms of the kernel run
interpreted (TPU: the scalar-prefetched table, one grid step per slot; GPU: the page loop, masked power-of-two
loads); the engine's step through the kernel (kernel=True) must give the tokens of the jnp step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.kernels.common import MASK_VALUE, empty_state, group_queries, normalise, ungroup
from zipjax.kernels.paged_packed_attention import Blocks, PageLayout, paged_packed_attention

from zipjax import aot, kv
from zipjax.config import ModelConfig
from zipjax.platform import compiling_for
from zipjax.serve.packed import PackedPool, compress_layer, packed_state, page_codec

CONFIG = ModelConfig(architecture="llama", vocab_size=32, hidden_size=256, intermediate_size=64, num_layers=1,
                     num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=512)
PAGE = 16
TABLE = [[7, 3, 10, 1, 0, 0], [0] * 6, [11, 2, 8, 5, 7, 0], [3, 0, 0, 0, 0, 0]]  # packed pages, logical order
COUNT = [4, 0, 5, 1]
METHODS = {"zipcache": kv.ZipCache(), "uniform": kv.Uniform(), "uniform-2-grouped": kv.Uniform(bits=2, group=8),
           "kivi": kv.KIVI(group=8, residual=16)}  # KIVI: two 8-token key runs per subset of a page


def packed_pool(method, seed: int = 0, page: int = PAGE):
    """A one-layer packed pool of 12 pages, 8 of them filled (in shuffled order) from random dense pages."""
    spec = page_codec(method, CONFIG, page)
    rng = np.random.default_rng(seed)
    shape = (9, page, CONFIG.num_kv_heads, CONFIG.head_dim)
    k = jnp.asarray(rng.normal(size=shape) * np.linspace(0.5, 3.0, CONFIG.head_dim), jnp.float32)
    v = jnp.asarray(rng.normal(size=shape), jnp.float32)
    mass = jnp.asarray(rng.random(shape[:3]), jnp.float32)
    pool = PackedPool.init(CONFIG, spec, 12)
    stores, scale = compress_layer(spec, k, v, mass, pool.stores[0], pool.v_scale, jnp.arange(1, 9),
                                   jnp.array([3, 7, 1, 10, 5, 11, 2, 8]))
    assert scale is None  # the CST scales are part of the records
    return spec, stores


def rows(queries: int, seed: int = 1, page: int = PAGE):
    """Queries [4, queries, 8, 32] of 4 rows, their table, counts and positions (row 1 is padding)."""
    count = jnp.array(COUNT, jnp.int32)
    positions = count[:, None] * page + 3 * jnp.arange(queries)[None] - 20 * (queries - 1)
    positions = positions.at[1, 0].set(-1)
    q = jnp.asarray(np.random.default_rng(seed).normal(size=(4, queries, 8, 32)), jnp.float32)
    return q, jnp.array(TABLE, jnp.int32), count, positions


def reference(spec, stores, q, table, count, positions, window):
    """The serving path's jnp attention over packed pages: (out, lse), lse MASK_VALUE where nothing is seen."""
    qg = group_queries(q, CONFIG.num_kv_heads)
    jnp_spec = dataclasses.replace(spec, kernel=False)
    state = packed_state(qg, stores, None, jnp_spec, table, count, positions, window, 2, empty_state(qg.shape[:4], 32))
    lse = jnp.where(state.denom > 0, state.max + jnp.log(jnp.maximum(state.denom, 1e-30)), MASK_VALUE)
    return ungroup(normalise(state)), ungroup(lse)[..., 0]


# (queries, window, splits): one query; three queries with a sliding window; the table split over two programs with a
# window. Every method meets every geometry once, on alternating backends so that every method and every geometry
# runs in both forms of the kernel (the page decode and the row masking are separate stages of it).
GEOMETRIES = [(1, None, None), (3, 40, None), (1, 30, 2)]
BACKENDS = {"zipcache": ("tpu", "gpu", "tpu"), "uniform": ("gpu", "tpu", "gpu"),
            "uniform-2-grouped": ("tpu", "gpu", "gpu"), "kivi": ("gpu", "tpu", "tpu")}
CASES = [(method, *geometry, backend) for method, backends in BACKENDS.items()
         for geometry, backend in zip(GEOMETRIES, backends, strict=True)]


@pytest.mark.parametrize(("method", "queries", "window", "splits", "backend"), CASES)
def test_kernel_matches_the_jnp_path(method, queries, window, splits, backend):
    spec, stores = packed_pool(METHODS[method])
    q, table, count, positions = rows(queries)
    want_out, want_lse = reference(spec, stores, q, table, count, positions, window)
    out, lse = paged_packed_attention(q, stores, table, count, positions, layout=spec.layout(32),
                                      sliding_window=window, blocks=Blocks(splits=splits), backend=backend,
                                      interpret=True)
    seen = want_lse > MASK_VALUE / 2
    assert bool(jnp.any(seen)) and not bool(jnp.all(seen))  # row 1 and early queries see nothing
    out_error = float(jnp.abs(out - want_out).max())
    lse_error = float(jnp.abs(jnp.where(seen, lse - want_lse, 0.0)).max())
    print(f"{backend} {method} queries={queries} window={window}: max |out| error {out_error:.2e}, lse {lse_error:.2e}")
    assert out_error < 1e-5 and lse_error < 1e-5
    assert bool(jnp.all(jnp.where(seen, True, (lse == MASK_VALUE) & jnp.all(out == 0, axis=-1))))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_a_prefill_block_of_queries_matches_the_jnp_path(backend):
    """10 queries x G = 4 per row: 40 rows, two row blocks of 32 in Triton's form."""
    spec, stores = packed_pool(METHODS["zipcache"])
    q, table, count, positions = rows(10)
    want_out, want_lse = reference(spec, stores, q, table, count, positions, None)
    out, lse = paged_packed_attention(q, stores, table, count, positions, layout=spec.layout(32), backend=backend,
                                      interpret=True)
    seen = want_lse > MASK_VALUE / 2
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(jnp.where(seen, lse, 0.0), jnp.where(seen, want_lse, 0.0), atol=1e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_ranked_pages_longer_than_a_head_match_the_jnp_path(backend):
    """ZipCache's 64-token pages on heads of 32 channels: the salient bits of a page span two bit columns."""
    spec, stores = packed_pool(kv.ZipCache(), page=64)
    assert len(spec.layout(32).plan.member) == 2
    q, table, count, positions = rows(2, page=64)
    positions = positions - jnp.array([[40], [0], [100], [30]])  # rows that see part of their last pages
    want_out, want_lse = reference(spec, stores, q, table, count, positions, 50)
    out, lse = paged_packed_attention(q, stores, table, count, positions, layout=spec.layout(32), sliding_window=50,
                                      backend=backend, interpret=True)
    seen = want_lse > MASK_VALUE / 2
    assert bool(jnp.any(seen))
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(jnp.where(seen, lse, 0.0), jnp.where(seen, want_lse, 0.0), atol=1e-5)


def test_packed_state_follows_the_kernel_policy():
    """kernel=None: the kernel traced for a TPU or a GPU (the lane-dense pool is read in place there), jnp on the
    CPU; True: the kernel everywhere (interpreted here), folded into a running state exactly as the jnp path folds its
    pages; False: jnp everywhere."""
    spec, stores = packed_pool(kv.ZipCache())
    assert spec.kernel is None and not spec.uses_kernel
    assert page_codec(kv.ZipCache(kernel=True), CONFIG, PAGE).uses_kernel
    for platform, expected in (("tpu", True), ("gpu", True), ("cpu", False)):
        with compiling_for(platform):
            assert spec.uses_kernel is expected
            assert dataclasses.replace(spec, kernel=True).uses_kernel
            assert not dataclasses.replace(spec, kernel=False).uses_kernel
    q, table, count, positions = rows(2)
    qg = group_queries(q, CONFIG.num_kv_heads)
    start = empty_state(qg.shape[:4], 32)
    start = start._replace(max=start.max.at[0].set(0.5), denom=start.denom.at[0].set(2.0), acc=start.acc.at[0].set(1.0))
    states = [packed_state(qg, stores, None, dataclasses.replace(spec, kernel=use), table, count, positions, None, 2,
                           start) for use in (False, True)]
    np.testing.assert_allclose(normalise(states[1]), normalise(states[0]), atol=1e-5)
    lse = [state.max + jnp.log(state.denom) for state in states]
    np.testing.assert_allclose(lse[1], lse[0], atol=1e-5)


def test_wrong_inputs_are_named():
    spec, stores = packed_pool(kv.ZipCache())
    q, table, count, positions = rows(1)
    layout = spec.layout(32)
    with pytest.raises(ValueError, match="pages"):
        other = page_codec(kv.ZipCache(), CONFIG, 8).layout(32)  # an 8-token page: fewer rows
        paged_packed_attention(q, stores, table, count, positions, layout=other)
    with pytest.raises(ValueError, match="pages"):
        paged_packed_attention(q, stores[:1], table, count, positions, layout=layout)
    with pytest.raises(ValueError, match="head_dim"):
        paged_packed_attention(q[..., :16], stores, table, count, positions, layout=layout)
    with pytest.raises(ValueError, match="positions"):
        paged_packed_attention(q, stores, table, count, positions[:, :0], layout=layout)
    with pytest.raises(ValueError, match="backend"):
        paged_packed_attention(q, stores, table, count, positions, backend="cuda", layout=layout)
    with pytest.raises(ValueError, match="splits"):
        Blocks(splits=0)
    with pytest.raises(ValueError, match="bits"):
        PageLayout(32, (3,), (16,))


def test_the_page_format_is_lane_dense_and_exact():
    """Every pool array is int32 [pages, kv_heads, R, head_dim] with R a multiple of 8 or 1, 2, 4 (the shapes
    XLA:TPU lays out row-major); no two parts of a record share a bit; a record decodes back to its page's slots."""
    from zipjax.serve.packed import layer_stores

    for name, method in METHODS.items():
        spec, stores = packed_pool(method)
        layout = spec.layout(32)
        assert all(x.dtype == jnp.int32 and x.shape == (12, 2, r, 32) for x, r in zip(stores, layout.leaves,
                                                                                        strict=True)), name
        assert all(r % 8 == 0 or r in (1, 2, 4) for r in layout.leaves) and sum(layout.leaves) == layout.rows, name
        plan, used = layout.plan, np.zeros((layout.rows, 32), np.uint64)

        def claim(rows, lanes, mask, used=used, name=name):
            assert not np.any(used[rows, lanes] & np.uint64(mask)), (name, rows, lanes, mask)
            used[rows, lanes] |= np.uint64(mask)

        for (s, _), runs in plan.codes.items():
            for run in runs:
                claim(slice(run.row, run.row + run.count), slice(None), ((1 << layout.bits[s]) - 1) << run.offset)
        for k, (row, offset) in enumerate(plan.member):  # here one column: 16 slots on 32 lanes
            claim(row, slice(32 * k, min(PAGE, 32 * k + 32)), 1 << offset)
        for row in plan.key_stats.values():
            claim(row, slice(None), 0xFFFFFFFF)
        for chunk in [c for chunks in plan.table.values() for c in chunks] + [plan.scale] * spec.cst:
            claim(chunk.row, slice(chunk.lane, chunk.lane + chunk.count), 0xFFFF << (16 * chunk.high))
        decoded, scale = layer_stores(spec, stores)
        assert (scale is not None) == spec.cst and len(decoded) == len(spec.sizes), name
        slots = np.concatenate([np.asarray(store.slots[3]) for store in decoded], axis=-1)  # a filled page
        assert sorted(slots[0].tolist()) == list(range(PAGE)), name


@pytest.mark.slow
def test_the_engine_step_through_the_kernel_gives_the_jnp_tokens(stdlib_llama):
    from test_serve_packed import TEXTS, greedy, prompt, start, tokens_of

    ids = prompt(stdlib_llama, "".join(TEXTS) * 2)
    outputs = []
    for kernel in (None, True):  # None: jnp on this CPU
        engine = start(stdlib_llama, kv.ZipCache(kernel=kernel), max_num_seqs=1, max_num_batched_tokens=16,
                       max_model_len=80)  # the 65 tokens: 16-page tables, a short interpreted page loop
        try:
            outputs.append(tokens_of(engine.submit(greedy(ids, 12, "k"))))
            assert engine.metrics()["packed_pages_cached"] > 0
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]


LLAMA3_8B = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=4, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
                        dtype="bfloat16")


@pytest.mark.parametrize("target", ["v5e:1x1", "h100"])
@pytest.mark.parametrize("method", ["zipcache", "kivi", "uniform"])
def test_compiles_at_llama3_8b_decode_shapes(method, target):
    """64 decode rows over 8k-token tables of 64-token packed pages, a pool of 4 layers x 4096 pages: one kernel
    call per layer, Mosaic on the TPU, Triton on the H100, each reading the pool in place (the lane-dense records are
    laid out row-major by XLA:TPU's default: no relayout copy, temporaries of a few MiB against a 0.8-1.2 GiB pool)."""
    name, method = method, {"zipcache": kv.ZipCache(), "kivi": kv.KIVI(), "uniform": kv.Uniform()}[method]
    chip_target = aot.target(target)
    chip = aot.on_chip(chip_target)
    spec = page_codec(method, LLAMA3_8B, 64)
    pool = aot.abstract(jax.eval_shape(lambda: PackedPool.init(LLAMA3_8B, spec, 4096)), chip)
    batch, slots = 64, 8192 // 64

    def attend(q, pool, table, count, positions):
        outs = [paged_packed_attention(q, stores, table, count, positions, layout=spec.layout(128))[0]
                for stores in pool.stores]
        return sum(outs)

    args = (aot.array((batch, 1, 32, 128), jnp.bfloat16, chip), pool, aot.array((batch, slots), jnp.int32, chip),
            aot.array((batch,), jnp.int32, chip), aot.array((batch, 1), jnp.int32, chip))
    compiled, report = aot.compile(attend, *args, target=chip_target)
    text = compiled.as_text()
    custom_call = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[chip_target.kind]
    assert text.count(custom_call) >= LLAMA3_8B.num_layers and report.fits
    assert report.temp_bytes < 16 << 20  # nothing pool-sized besides the arguments
    print(f"{name} {target}: arguments {report.argument_bytes / 2**20:.0f} MiB, temporaries "
          f"{report.temp_bytes / 2**20:.1f} MiB, compiled in {report.compile_seconds:.1f} s")
