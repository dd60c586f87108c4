"""The GPU paged dense-attention kernel (zipjax.kernels.paged_dense_attention) against its jnp reference, the serving
path's `paged_state` (zipjax.serve.paged), the serving policy that routes a dense pool to it on a GPU
(zipjax.serve.gpu_paged.dense_route), the engine's model step through it, and the serving step compiled ahead of
time for an H100 at LLaMA-3-8B's per-layer shapes.

The kernel runs interpreted (its Triton form: the page loop, masked power-of-two loads) over a pool whose pages no
table names within a row's extent are NaN: a table's entries past a row's furthest visible page name them, and the
kernel must never read them. Rows: decode rows (one query) and prefill blocks (several queries, a partial one, a
padding one), with logical page offsets (`first`), GQA / MQA / MHA, with and without a sliding window, a head_dim
and a page size that are not powers of two.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import has_primitive
from zipjax.kernels.common import MASK_VALUE, empty_state, group_queries, normalise, ungroup
from zipjax.kernels.paged_dense_attention import Blocks, paged_dense_attention

import zipjax
from zipjax import aot
from zipjax.config import PUBLISHED
from zipjax.errors import ZipjaxError
from zipjax.platform import compiling_for
from zipjax.serve.gpu_paged import dense_route, gpu_dense_attention, misfit
from zipjax.serve.paged import PagedCache, Pool, StepLayout, paged_state
from zipjax.transformer import Transformer

NAN_PAGE = 21  # pages 20 .. 23 are NaN: named by tables only past a row's extent
TABLE = [[3, 5, 7, 9, 21, 22, 23, 21], [1, 2, 4, 6, 8, 21, 21, 21], [11, 12, 13, 14, 21, 21, 21, 21],
         [0, 21, 21, 21, 21, 21, 21, 21]]


def pool(page: int, kv_heads: int, head_dim: int, seed: int = 0) -> jax.Array:
    """24 pages [24, page, 2 * kv_heads, head_dim] of random K/V, pages 20 .. 23 NaN."""
    kv = np.random.default_rng(seed).normal(size=(24, page, 2 * kv_heads, head_dim)).astype(np.float32)
    kv[20:] = np.nan
    return jnp.asarray(kv)


def rows(queries: int, page: int, heads: int, head_dim: int, seed: int = 1):
    """Queries [4, queries, heads, head_dim], positions and firsts: row 1 padding; each row's last query in the
    last page its table names before the NaN pages (row 2's table starts at logical page 2)."""
    first = jnp.array([0, 0, 2, 0], jnp.int32)
    last = jnp.array([4 * page - 3, -1, 6 * page - 1, page // 2])  # within table slots 3, -, 3, 0
    positions = last[:, None] - 3 * jnp.arange(queries)[::-1][None]
    positions = jnp.where((last[:, None] < 0) | (positions < 0), -1, positions)
    if queries > 1:
        positions = positions.at[3, -2:].set(-1)  # a partial block: its padding at the end
        positions = positions.at[3, :-2].set(jnp.arange(queries - 2))
    q = jnp.asarray(np.random.default_rng(seed).normal(size=(4, queries, heads, head_dim)), jnp.float32)
    return q, jnp.array(TABLE, jnp.int32), positions.astype(jnp.int32), first


def reference(q, kv, table, positions, first, window):
    """The serving path's jnp attention: (out, lse). It reads every row's table up to the furthest extent of any
    row, so it is given the pool with the NaN pages zeroed (the engine pads tables with the finite null page)."""
    kv = jnp.nan_to_num(kv)
    qg = group_queries(q, kv.shape[2] // 2)
    state = paged_state(qg, kv, table, positions, first, window, 1, empty_state(qg.shape[:4], q.shape[-1]))
    lse = jnp.where(state.denom > 0, state.max + jnp.log(jnp.maximum(state.denom, 1e-30)), MASK_VALUE)
    return ungroup(normalise(state)), ungroup(lse)[..., 0]


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("queries", [1, 6])
def test_kernel_matches_the_jnp_path(heads, kv_heads, window, queries):
    kv = pool(16, kv_heads, 16)
    q, table, positions, first = rows(queries, 16, heads, 16)
    out, lse = paged_dense_attention(q, kv, table, positions, first, sliding_window=window, backend="gpu",
                                     interpret=True)
    want, want_lse = reference(q, kv, table, positions, first, window)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    assert (np.asarray(out)[positions < 0] == 0).all() and (np.asarray(lse)[positions < 0] == MASK_VALUE).all()


def test_odd_head_dim_and_page_size_and_row_blocks_match_the_jnp_path():
    """head_dim 24 (loaded as 32, masked), 12-token pages (16, masked), and a prefill block's 6 x 4 query rows
    cut into two programs of 16."""
    kv = pool(12, 2, 24)
    q, table, positions, first = rows(6, 12, 8, 24)
    out, lse = paged_dense_attention(q, kv, table, positions, first, sliding_window=7, backend="gpu", interpret=True,
                                     blocks=Blocks(rows=16))
    want, want_lse = reference(q, kv, table, positions, first, 7)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_wrong_inputs_are_named():
    kv = pool(16, 2, 16)
    q, table, positions, first = rows(1, 16, 8, 16)
    cases = [((q[..., :8], kv, table, positions, first), "kv_pages"), ((q[:, :, :3], kv, table, positions, first),
             "kv_pages"), ((q, kv, table.astype(jnp.float32), positions, first), "page_table"),
             ((q, kv, table, positions[:2], first), "positions"), ((q, kv, table, positions, first[:2]), "first")]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            paged_dense_attention(*args, interpret=True)
    with pytest.raises(ValueError, match=r"blocks\.rows"):
        Blocks(rows=24)


def test_the_dense_route_follows_the_kernel_policy():
    kv = jax.ShapeDtypeStruct((64, 16, 16, 128), jnp.bfloat16)  # LLaMA-3-8B's 8 KV heads
    assert dense_route(None, 32, kv) is None and dense_route(False, 32, kv) is None  # a CPU: jnp
    assert dense_route(True, 32, kv) == "gpu"  # forced: the GPU kernel, interpreted here
    with compiling_for("gpu"):
        assert dense_route(None, 32, kv) == "gpu" and dense_route(False, 32, kv) is None
        assert dense_route(None, 8, jax.ShapeDtypeStruct((64, 16, 4, 512), jnp.bfloat16)) is None
        with pytest.raises(ZipjaxError, match="head_dim 512 is over 256"):
            dense_route(True, 8, jax.ShapeDtypeStruct((64, 16, 4, 512), jnp.bfloat16))
        devices = jax.devices()[:8]
        for data, model, why in ((2, 4, "data axis"), (1, 8, None), (1, 4, None), (1, 3, "do not split")):
            with jax.set_mesh(zipjax.make_mesh(data=data, model=model, devices=devices[:data * model])):
                found = misfit(32, kv)
                assert (found is None) if why is None else (why in found), (data, model, found)
    with compiling_for("tpu"):
        assert dense_route(None, 32, kv) == "tpu"


def test_the_step_runs_the_kernel_per_kv_head_shard():
    """On a 2-way "model" mesh the step's decode rows and prefill blocks are read once per KV-head shard (a
    shard_map: a Triton call is never partitioned by XLA), as on one device."""
    kv = jnp.nan_to_num(pool(16, 4, 16))
    table = jnp.where(jnp.array(TABLE) >= 20, 0, jnp.array(TABLE, jnp.int32))  # the engine's null-page padding
    qd, _, decode_positions, _ = rows(1, 16, 8, 16)
    qp, _, prefill_positions, _ = rows(6, 16, 8, 16, seed=2)
    q = jnp.concatenate([qd[:, 0], qp.reshape(-1, 8, 16)])
    attend = jax.jit(lambda *a: gpu_dense_attention(*a, None))
    args = (q, kv, table, decode_positions[:, 0], table, prefill_positions)
    want = jnp.concatenate([reference(qd, kv, table, decode_positions, None, None)[0][:, 0],
                            reference(qp, kv, table, prefill_positions, None, None)[0].reshape(-1, 8, 16)])
    with jax.set_mesh(zipjax.make_mesh(data=1, model=2, devices=jax.devices()[:2])):
        assert "manual_computation" in attend.lower(*args).as_text()
        np.testing.assert_allclose(attend(*args), want, atol=1e-5)


def greedy_steps(model, kernel: bool, prompts: list[list[int]], new_tokens: int,
                 page: int = 16) -> tuple[list[list[int]], bool]:
    """The engine's paged model step (PagedCache over a pool), run by hand: each prompt prefilled in 8-token
    blocks beside two decode rows (padding), then `new_tokens` greedy decode steps beside a padding block. Returns
    the tokens and whether the step ran a Pallas kernel."""
    config, block, width = model.config, 8, 4
    kv_pool = Pool.init(config, 1 + len(prompts) * width, page)
    tables = jnp.asarray([[1 + s * width + j for j in range(width)] for s in range(len(prompts))], jnp.int32)
    step = jax.jit(lambda params, pool, tokens, positions, layout, rows: Transformer(config).apply(
        {"params": params}, tokens[:, None], positions[:, None], PagedCache(pool, layout, 2, None, kernel),
        rows=rows))
    outputs, kernels = [[] for _ in prompts], []

    def run(decode_pos, prefill_pos, tokens, pool, rows):
        slot = lambda s, p: tables[s, p // page] * page + p % page
        seqs = [s for s in range(len(prompts)) for _ in range(block)]
        flat = np.concatenate([decode_pos, prefill_pos.reshape(-1)])
        owners = list(range(len(prompts))) + seqs
        slots = jnp.asarray([slot(s, p) if p >= 0 else 0 for s, p in zip(owners, flat, strict=True)], jnp.int32)
        layout = StepLayout(slots, tables, jnp.asarray(decode_pos, jnp.int32), tables,
                            jnp.asarray(prefill_pos, jnp.int32))
        args = (model.params, pool, jnp.asarray(tokens, jnp.int32), jnp.maximum(jnp.asarray(flat), 0), layout,
                jnp.asarray(rows, jnp.int32))
        if not kernels:  # one shape of step: traced once
            kernels.append(has_primitive(step.trace(*args).jaxpr))
        logits, cache = step(*args)
        return np.asarray(jnp.argmax(logits[:, 0], axis=-1)), cache.pool

    chosen = [0] * len(prompts)
    for start in range(0, max(map(len, prompts)), block):  # chunked prefill
        pos = np.array([[p if p < len(prompt) else -1 for p in range(start, start + block)] for prompt in prompts])
        tokens = [0] * len(prompts) + [prompt[p] if p >= 0 else 0 for prompt, row in zip(prompts, pos, strict=True)
                                       for p in row]
        last = [min(max(len(prompt) - 1 - start, 0), block - 1) for prompt in prompts]
        picked, kv_pool = run(np.full(len(prompts), -1), pos, tokens, kv_pool,
                              [len(prompts) + s * block + x for s, x in enumerate(last)])
        chosen = [new if start <= len(prompt) - 1 < start + block else old
                  for new, old, prompt in zip(picked, chosen, prompts, strict=True)]
    lengths = [len(p) for p in prompts]
    for _ in range(new_tokens):
        for s, token in enumerate(chosen):
            outputs[s].append(int(token))
        pos = np.full((len(prompts), block), -1)
        tokens = [out[-1] for out in outputs] + [0] * pos.size
        chosen, kv_pool = run(np.array(lengths), pos, tokens, kv_pool, list(range(len(prompts))))
        lengths = [n + 1 for n in lengths]
    return outputs, all(kernels)


def test_the_model_step_through_the_kernel_gives_the_jnp_tokens(stdlib_llama):
    prompts = [list(stdlib_llama.tokenizer.encode("def main():\n    return")), [5, 9, 14]]
    (kernel_tokens, ran), (jnp_tokens, jnp_ran) = (greedy_steps(stdlib_llama, k, prompts, 2) for k in (True, False))
    assert ran and not jnp_ran
    assert kernel_tokens == jnp_tokens


def test_the_serving_step_compiles_for_an_h100_through_the_kernel():
    """One of LLaMA-3-8B's layers at its per-layer shapes and a short serving geometry (16 decode rows, 2 prefill
    blocks of 64 tokens, 2k-token tables; about 25 s for both compiles on 2 cores): by the default policy on an H100
    the dense pool is read by the Triton kernel (two calls: decode rows, prefill blocks), on the same donated pool and
    in no more temporaries than the jnp step (57.0 MiB each: at one layer the step's peak is elsewhere; at the full
    geometry, 64 decode rows, 8 blocks, 8k tables, 145.3 MiB each, and over all 32 layers 145 MiB against 347)."""
    from benchmarks.serve_aot import Shape, compile_programs

    config = dataclasses.replace(PUBLISHED["llama-3-8b"], dtype="bfloat16", num_layers=1)
    shape = Shape(max_num_seqs=16, prefill_blocks=2, max_model_len=2048)
    num_pages = 8 * shape.table_width + 1
    reports = {}
    for kernel in (None, False):
        (compiled, report), = compile_programs(config, aot.target("h100"), 1, dataclasses.replace(shape, kernel=kernel),
                                               num_pages)[0]
        calls = sum("__gpu$xla.gpu.triton" in line and "paged_dense_attention" in line
                    for line in compiled.as_text().splitlines())
        assert calls == (2 if kernel is None else 0) and report.fits
        reports[kernel] = report
    print(f"h100 temporaries: kernel {reports[None].temp_bytes / 2**20:.2f} MiB, jnp "
          f"{reports[False].temp_bytes / 2**20:.2f} MiB")
    assert reports[None].temp_bytes <= reports[False].temp_bytes
    assert reports[None].alias_bytes == reports[False].alias_bytes  # the same donated pool
