"""The dense-page step on jax's TPU ragged paged attention kernel (zipjax.serve.ragged): the engine's flat batch
mapped onto the kernel's inputs and fed to jax's own reference of the kernel equals the jnp paged path on ragged
batches (decode rows, chunked prefill blocks, padding, GQA, a sliding window), reads nothing outside the page
tables, and zeroes padding; the kernel policy; the kernel's signature is the one mapped. The kernel itself compiles
for TPUs in tests/test_serve_aot.py (jax's TPU interpret mode cannot run it)."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import has_primitive
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tuned

import zipjax
from zipjax.errors import ZipjaxError
from zipjax.platform import compiling_for
from zipjax.serve.paged import PagedCache, Pool, StepLayout, combine_kv, page_half, paged_attention, split_kv
from zipjax.serve.ragged import block_sizes, kernel_inputs, misfit, ragged_attention, use_ragged

PAGE, WIDTH, BLOCK = 4, 6, 8  # tokens per page, pages per table row (24 positions), prefill block


def ragged_batch(seed: int, heads: int, kv_heads: int, head_dim: int):
    """A step of 3 decode rows and a padding row, then 4 prefill blocks: a prompt's first chunk (full), its last
    (5 of 8 tokens, its padding tail running 3 positions past the table's 24), a chunk of another prompt after its
    cached prefix, an all-padding block. Pages are scattered; pages no table holds are NaN."""
    rng = np.random.default_rng(seed)
    num_pages = 40
    owned = iter(rng.permutation(np.arange(1, num_pages))[:30].tolist())
    table = lambda n: [next(owned) for _ in range(n)] + [0] * (WIDTH - n)  # null-page padded
    decode_positions = np.array([0, 9, 23, -1], np.int32)
    decode_pages = np.array([table(1), table(3), table(6), [0] * WIDTH], np.int32)
    prompt = table(6)  # one sequence, two of its blocks
    prefill_pages = np.array([prompt, prompt, table(5), [0] * WIDTH], np.int32)
    prefill_positions = np.full((4, BLOCK), -1, np.int32)
    prefill_positions[0] = np.arange(8)
    prefill_positions[1, :5] = np.arange(19, 24)
    prefill_positions[2] = np.arange(12, 20)
    kv = rng.normal(size=(num_pages, PAGE, 2 * kv_heads, head_dim)).astype(np.float32)
    used = set(np.concatenate([decode_pages.ravel(), prefill_pages.ravel()]).tolist())
    kv[[p for p in range(num_pages) if p not in used]] = np.nan
    q = rng.normal(size=(4 + 4 * BLOCK, heads, head_dim)).astype(np.float32)
    return q, kv, decode_pages, decode_positions, prefill_pages, prefill_positions


@functools.partial(jax.jit, static_argnames=("window",))
def jnp_path(q, kv, decode_pages, decode_positions, prefill_pages, prefill_positions, window):
    """The engine's jnp path (zipjax.serve.paged), segment by segment, jitted as the engine's step runs it."""
    d, heads, head_dim = len(decode_positions), q.shape[1], q.shape[2]
    decode = paged_attention(q[:d, None], kv, decode_pages, decode_positions[:, None], window, 2)
    prefill = paged_attention(q[d:].reshape(-1, BLOCK, heads, head_dim), kv, prefill_pages, prefill_positions,
                              window, 2)
    return jnp.concatenate([decode.reshape(-1, heads, head_dim), prefill.reshape(-1, heads, head_dim)])


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(8, 2, None), (6, 3, 5), (4, 4, None), (4, 1, 3)],
                         ids=["gqa", "gqa-sliding-window", "mha", "mqa-sliding-window"])
def test_the_step_mapped_onto_jax_reference_equals_the_jnp_paged_path(heads, kv_heads, window):
    q, kv, *layout = ragged_batch(0, heads, kv_heads, 32)
    q, kv = jnp.asarray(q), jnp.asarray(kv)
    layout = [jnp.asarray(x) for x in layout]
    want = np.asarray(jnp_path(q, kv, *layout, window))
    got = np.asarray(ragged_attention(q, kv, *layout, window, reference=True))
    assert np.isfinite(got).all() and np.isfinite(want).all()  # the NaN pages outside every table are never read
    padding = np.concatenate([np.asarray(layout[1]), np.asarray(layout[3]).ravel()]) < 0
    assert padding.sum() == 1 + 3 + 8 and not got[padding].any() and not want[padding].any()
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)  # max error measured: 6e-7 (float32)


def test_the_kernel_inputs_are_the_documented_mapping():
    _, _, decode_pages, decode_positions, prefill_pages, prefill_positions = ragged_batch(0, 4, 2, 32)
    kv_lens, page_indices, cu_q_lens, num_seqs = kernel_inputs(decode_pages, decode_positions, prefill_pages,
                                                               prefill_positions)
    assert kv_lens.tolist() == [1, 10, 24, 1, 8, 19 + BLOCK, 12 + BLOCK, BLOCK]
    assert cu_q_lens.tolist() == [0, 1, 2, 3, 4, 12, 20, 28, 36] and num_seqs.tolist() == [8]
    np.testing.assert_array_equal(page_indices, np.concatenate([decode_pages, prefill_pages]))
    assert all(x.dtype == jnp.int32 for x in (kv_lens, page_indices, cu_q_lens, num_seqs))


def test_the_combined_layout_interleaves_each_kv_heads_k_and_v():
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.normal(size=(5, PAGE, 3, 8)), jnp.float32) for _ in range(2))
    kv = combine_kv(k, v)  # [5, PAGE, 6, 8]: k0 v0 k1 v1 k2 v2, as jax's kernel reads it
    np.testing.assert_array_equal(kv[:, :, 0::2], k)
    np.testing.assert_array_equal(kv[:, :, 1::2], v)
    assert all(np.array_equal(a, b) for a, b in zip(split_kv(kv), (k, v), strict=True))
    pages = jnp.array([[3, 1], [0, 4]])
    np.testing.assert_array_equal(page_half(kv, pages, 0), k[pages])
    np.testing.assert_array_equal(page_half(kv, pages, 1), v[pages])


def abstract_pool(kv_heads: int, head_dim: int, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((64, 16, 2 * kv_heads, head_dim), dtype)


def test_the_kernel_policy():
    pool = abstract_pool(8, 128)
    assert not use_ragged(None, 32, pool)  # a CPU: the jnp path
    with pytest.raises(ZipjaxError, match="TPU"):
        use_ragged(True, 32, pool)
    with compiling_for("gpu"):
        assert not use_ragged(None, 32, pool)  # jax's Triton paged_attention is decode-only, head-major
    with compiling_for("tpu"):
        assert use_ragged(None, 32, pool) and not use_ragged(False, 32, pool)
        assert not use_ragged(None, 9, abstract_pool(3, 64))  # SmolLM2's head_dim 64: the jnp path
        with pytest.raises(ZipjaxError, match="head_dim 64 is not a multiple of 128"):
            use_ragged(True, 9, abstract_pool(3, 64))
        devices = jax.devices()[:8]
        for data, model, why in ((2, 4, "data axis"), (1, 8, None), (1, 4, None)):
            mesh = zipjax.make_mesh(data=data, model=model, devices=devices[:data * model])
            with jax.set_mesh(mesh):
                found = misfit(32, pool)
                assert (found is None) if why is None else (why in found), (data, model, found)
        with jax.set_mesh(zipjax.make_mesh(data=1, model=8, devices=devices)):
            assert "do not split" in misfit(64, abstract_pool(4, 128))  # the pool splits head_dim there
            assert "do not tile" in misfit(24, abstract_pool(24, 128))  # 6 combined bf16 heads per chip


def jnp_loop(jaxpr) -> bool:
    """Whether a jaxpr runs a while loop outside Pallas kernels (the jnp paged path's loop over blocks of pages)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            return True
        if eqn.primitive.name != "pallas_call":
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns") and jnp_loop(inner):
                        return True
    return False


def test_a_dense_step_traced_for_a_tpu_takes_the_kernel():
    """PagedCache.attend traced for a TPU (zipjax.platform.compiling_for, as zipjax.aot does): jax's kernel runs on
    the dense pool (its static checks pass on the mapped shapes) and the jnp loop does not; with kernel=False, the
    jnp loop only."""
    config = zipjax.config.ModelConfig(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=64,
                                       num_layers=1, num_heads=8, num_kv_heads=2, head_dim=128,
                                       max_position_embeddings=64)
    _, _, decode_pages, decode_positions, prefill_pages, prefill_positions = ragged_batch(0, 8, 2, 128)
    tokens = len(decode_positions) + prefill_positions.size
    layout = StepLayout(jnp.zeros((tokens,), jnp.int32), jnp.asarray(decode_pages), jnp.asarray(decode_positions),
                        jnp.asarray(prefill_pages), jnp.asarray(prefill_positions))
    pool = Pool.init(config, 40, PAGE, jnp.bfloat16)
    q, new = jnp.zeros((tokens, 1, 8, 128), jnp.bfloat16), jnp.zeros((tokens, 1, 2, 128), jnp.bfloat16)

    def traced(kernel):
        attend = lambda pool, q, k, v: PagedCache(pool, layout, 2, None, kernel).attend(0, q, k, v, None)
        with compiling_for("tpu"):
            return jax.jit(attend).trace(pool, q, new, new).jaxpr
    chosen = traced(None)
    assert has_primitive(chosen) and not jnp_loop(chosen)
    forced_off = traced(False)
    assert jnp_loop(forced_off) and not has_primitive(forced_off)


def test_block_sizes_follow_jax_defaults_off_its_table():
    q = jax.ShapeDtypeStruct((576, 8, 128), jnp.bfloat16)
    assert block_sizes(q, abstract_pool(2, 128), 512) == (128, 32)  # jax's defaults for v5e / v6e
    short = jax.ShapeDtypeStruct((20, 8, 128), jnp.bfloat16)
    assert block_sizes(short, abstract_pool(2, 128), 6) == (6, 20)  # clamped to the table and the tokens


def test_the_kernel_signature_is_the_one_mapped():
    """jax 0.10.2 and jax's main branch (0.11.1.dev, 2026-08) ship the same kernel; a jax that renames what
    zipjax.serve.ragged passes fails here, by name, rather than in a TPU compile."""
    params = inspect.signature(rpa.ragged_paged_attention).parameters
    assert list(params)[:6] == ["q", "kv_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"]
    assert {"sm_scale", "sliding_window", "num_kv_pages_per_block", "num_queries_per_block"} <= set(params)
    reference = inspect.signature(rpa.ref_ragged_paged_attention).parameters
    assert list(reference)[:6] == ["queries", "kv_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"]
    assert {"sm_scale", "sliding_window"} <= set(reference)
    assert callable(rpa.get_min_heads_per_blk) and callable(tuned.simplify_key)
    assert "TPU v5" in tuned.TUNED_BLOCK_SIZES and "TPU v6" in tuned.TUNED_BLOCK_SIZES
