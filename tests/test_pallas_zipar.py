"""The ZipAR attention Pallas kernel against its jnp reference, in interpret mode (and the TPU interpreter), for both
bodies: the TPU one (KV blocks on the grid, state in VMEM scratch) and the GPU one (KV loop in the kernel, split-K).
Compilation for real TPUs and an H100 is tests/test_aot_zipar.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from zipjax.kernels.zipar_attention import Blocks, reference, zipar_attention

BACKENDS = ("tpu", "gpu")
BLOCK_K = {"tpu": 128, "gpu": 64}
# the shape most tests share with one case of test_kernel_matches_reference, so the jitted kernel compiles once per
# backend: batch, q_len, heads, kv_heads, head_dim, max_len (not a multiple of either block)
SHARED = (2, 5, 8, 2, 32, 200)
jit_reference = jax.jit(reference)  # one compile per shape instead of one per eager op


def _case(seed, batch, q_len, heads, kv_heads, head_dim, max_len, dtype=jnp.float32, written_fraction=0.7):
    """Random inputs built in numpy (eager jnp ops would each compile)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    slots = np.stack([np.sort(rng.choice(np.arange(max_len // 4, max_len), q_len, replace=False))
                      for _ in range(batch)])  # [batch, q_len]: per-sequence schedules
    written = rng.random((batch, max_len)) < written_fraction
    np.put_along_axis(written, slots, True, axis=1)
    starts = rng.integers(0, max_len // 4, batch)
    return q, k, v, jnp.asarray(slots, jnp.int32), jnp.asarray(written), jnp.asarray(starts, jnp.int32)


def _max_error(out, ref) -> float:
    return float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,q_len,heads,kv_heads,head_dim,max_len,gpu_block", [
    (1, 1, 4, 4, 16, 64, 32),       # one query, no GQA, a cache shorter than one TPU block
    (*SHARED, 64),                  # GQA 4, a cache length that is not a multiple of the block
    (3, 13, 6, 1, 64, 333, 128),    # 13 active rows (Emu3 at s=7), multi-query (one KV head): 78 rows, padded
])
def test_kernel_matches_reference(backend, batch, q_len, heads, kv_heads, head_dim, max_len, gpu_block):
    args = _case(0, batch, q_len, heads, kv_heads, head_dim, max_len)
    ref = jit_reference(*args)
    block_k = BLOCK_K["tpu"] if backend == "tpu" else gpu_block
    out = zipar_attention(*args, backend=backend, blocks=Blocks(block_k), interpret=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _max_error(out, ref) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_queries_and_unwritten_slots_are_ignored(backend):
    q, k, v, slots, written, starts = _case(1, *SHARED)
    # a padding query (slot at the end, nothing of its own written) and keys behind a sequence's start
    slots = slots.at[:, -1].set(199)
    written = written.at[:, 199].set(False)
    ref = jit_reference(q, k, v, slots, written, starts)
    out = zipar_attention(q, k, v, slots, written, starts, backend=backend, blocks=Blocks(BLOCK_K[backend]),
                                 interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    # changing K/V in unwritten or pre-start slots changes nothing
    hidden = (~written)[:, None, :, None] | (jnp.arange(200)[None, None, :, None] < starts[:, None, None, None])
    noisy_k = jnp.where(hidden, 100.0, k)
    out2 = zipar_attention(q, noisy_k, v, slots, written, starts, backend=backend, blocks=Blocks(BLOCK_K[backend]),
                                  interpret=True)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_no_query_can_see_are_never_read(backend):
    """KV blocks before a sequence's oldest visible key, or after the newest one at or before its newest query, are
    skipped: NaNs there change nothing (any read would spread them through the softmax)."""
    q, k, v, slots, written, starts = _case(5, *SHARED)
    starts = jnp.asarray([130, 0], jnp.int32)  # sequence 0 starts in the second TPU block, third GPU block
    # sequence 1: a padding query at the last slot (as zipjax.zipar.cache places them), nothing written past 100
    slots = jnp.asarray([[130, 140, 150, 170, 180], [10, 20, 40, 100, 199]], jnp.int32)
    written = written.at[:, 130].set(True).at[:, 10].set(True).at[1, 101:].set(False)
    block_k = BLOCK_K[backend]
    block = jnp.arange(200) // block_k  # [max_len]
    first, last = jnp.asarray([130, 0]) // block_k, jnp.asarray([180, 100]) // block_k  # [batch]
    outside = ((block[None] < first[:, None]) | (block[None] > last[:, None]))[:, None, :, None]
    assert bool(outside.any(axis=(1, 2, 3)).all())
    ref = jit_reference(q, k, v, slots, written, starts)
    poisoned_k, poisoned_v = jnp.where(outside, jnp.nan, k), jnp.where(outside, jnp.nan, v)
    out = zipar_attention(q, poisoned_k, poisoned_v, slots, written, starts, backend=backend,
                                 blocks=Blocks(block_k), interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_that_sees_nothing_gives_zeros_not_nan(backend):
    q, k, v, slots, written, starts = _case(6, *SHARED)
    slots = slots.at[0, 0].set(3)
    starts = starts.at[0].set(10)  # query 0 of sequence 0 is before its start
    written = written.at[1].set(False)  # sequence 1 has nothing written at all
    out = zipar_attention(q, k, v, slots, written, starts, backend=backend, blocks=Blocks(BLOCK_K[backend]),
                                 interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert float(jnp.abs(out[0, 0]).max()) == 0.0 and float(jnp.abs(out[1]).max()) == 0.0
    ref = jit_reference(q, k, v, slots, written, starts)
    np.testing.assert_allclose(np.asarray(out[0, 1:]), np.asarray(ref[0, 1:]), atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    """bf16 inputs and output; the reference runs in float32 on the same (bf16-rounded) values."""
    q, k, v, slots, written, starts = _case(2, *SHARED, dtype=jnp.bfloat16)
    ref = jit_reference(*(x.astype(jnp.float32) for x in (q, k, v)), slots, written, starts)
    out = zipar_attention(q, k, v, slots, written, starts, backend=backend, blocks=Blocks(BLOCK_K[backend]),
                                 interpret=True)
    assert out.dtype == jnp.bfloat16
    assert _max_error(out, ref) <= 1e-2


def test_tpu_interpreter_with_a_ragged_last_block():
    """Mosaic's DMA semantics, uninitialised VMEM read as NaN: the last block runs past the cache (200 slots in
    blocks of 128), and what the buffer holds there must be hidden (keys) and zeroed (values)."""
    args = _case(3, 1, 3, 4, 2, 128, 200)
    ref = jit_reference(*args)
    params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    out = zipar_attention(*args, backend="tpu", blocks=Blocks(128), interpret=params)
    assert _max_error(out, ref) <= 2e-6


def test_explicit_choice_on_cpu():
    args = _case(4, 1, 2, 4, 2, 16, 64)
    np.testing.assert_allclose(np.asarray(zipar_attention(*args)),
                               np.asarray(reference(*args)), atol=2e-6)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "k": a["k"][..., :8]}, r"k has shape \(1, 2, 64, 8\)"),
    (lambda a: {**a, "v": a["v"][:, :, :-1]}, r"v has shape \(1, 2, 63, 16\)"),
    (lambda a: {**a, "v": a["v"].astype(jnp.bfloat16)}, r"v has dtype bfloat16"),
    (lambda a: {**a, "q_slots": a["q_slots"][:, :1]}, r"q_slots has shape \(1, 1\)"),
    (lambda a: {**a, "written": a["written"].astype(jnp.int32)}, r"written has dtype int32"),
    (lambda a: {**a, "starts": a["starts"][None]}, r"starts has shape \(1, 1\)"),
    (lambda a: {**a, "q": a["q"][:, :, :3]}, r"q has 3 heads"),
])
def test_bad_inputs_name_the_argument(change, message):
    q, k, v, slots, written, starts = _case(7, 1, 2, 4, 2, 16, 64)
    args = change(dict(q=q, k=k, v=v, q_slots=slots, written=written, starts=starts))
    with pytest.raises(ValueError, match=message):
        zipar_attention(**args, interpret=True)


@pytest.mark.parametrize("backend,block_k", [("tpu", 100), ("gpu", 96), ("cpu", None)])
def test_illegal_blocks_and_backends_are_refused(backend, block_k):
    args = _case(8, 1, 2, 4, 2, 16, 64)
    with pytest.raises(ValueError, match=r"block_k|backend"):
        zipar_attention(*args, backend=backend, blocks=Blocks(block_k), interpret=True)
