"""The ZipAR attention Pallas kernel against its jnp reference, in interpret mode (and the TPU interpreter)."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from zipjax.kernels.zipar_attention import reference, zipar_attention, zipar_attention_kernel


def _case(seed, batch, q_len, heads, kv_heads, head_dim, max_len, dtype=jnp.float32, written_fraction=0.7):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    slots = jnp.asarray(np.stack([np.sort(rng.choice(np.arange(max_len // 4, max_len), q_len, replace=False))
                                  for _ in range(batch)]), jnp.int32)  # [batch, q_len]: per-sequence schedules
    written = jnp.asarray(rng.random((batch, max_len)) < written_fraction)
    written = jnp.stack([w.at[s].set(True) for w, s in zip(written, slots, strict=True)])
    starts = jnp.asarray(rng.integers(0, max_len // 4, batch), jnp.int32)
    return q, k, v, slots, written, starts


@pytest.mark.parametrize("batch,q_len,heads,kv_heads,head_dim,max_len,block_k", [
    (1, 1, 4, 4, 16, 64, 32),       # one query, no GQA
    (2, 5, 8, 2, 32, 200, 64),      # GQA 4, a cache length that is not a multiple of the block
    (3, 13, 6, 3, 64, 333, 128),    # 13 active rows (Emu3 at s=7), GQA 2
    (2, 3, 8, 1, 16, 96, 16),       # multi-query (one KV head)
])
def test_kernel_matches_reference(batch, q_len, heads, kv_heads, head_dim, max_len, block_k):
    args = _case(0, batch, q_len, heads, kv_heads, head_dim, max_len)
    ref = reference(*args)
    out = zipar_attention_kernel(*args, block_k=block_k, interpret=True)
    assert out.shape == ref.shape
    assert float(jnp.abs(out - ref).max()) <= 2e-6


def test_padding_queries_and_unwritten_slots_are_ignored():
    q, k, v, slots, written, starts = _case(1, 2, 4, 4, 2, 16, 80)
    # a padding query (slot at the end, nothing of its own written) and keys behind a sequence's start
    slots = slots.at[:, -1].set(79)
    written = written.at[:, 79].set(False)
    ref = reference(q, k, v, slots, written, starts)
    out = zipar_attention_kernel(q, k, v, slots, written, starts, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    # changing K/V in unwritten or pre-start slots changes nothing
    hidden = (~written)[:, None, :, None] | (jnp.arange(80)[None, None, :, None] < starts[:, None, None, None])
    noisy_k = jnp.where(hidden, 100.0, k)
    out2 = zipar_attention_kernel(q, noisy_k, v, slots, written, starts, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=2e-6)


def test_bfloat16():
    """bf16 inputs and output; the reference runs in float32 on the same (bf16-rounded) values."""
    q, k, v, slots, written, starts = _case(2, 2, 6, 8, 2, 32, 128, dtype=jnp.bfloat16)
    ref = reference(*(x.astype(jnp.float32) for x in (q, k, v)), slots, written, starts)
    out = zipar_attention_kernel(q, k, v, slots, written, starts, block_k=64, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) <= 1e-2


def test_tpu_interpreter():
    args = _case(3, 1, 3, 4, 2, 128, 256)
    ref = reference(*args)
    out = zipar_attention_kernel(*args, block_k=128, interpret=pltpu.InterpretParams())
    assert float(jnp.abs(out - ref).max()) <= 2e-6


def test_explicit_choice_on_cpu():
    args = _case(4, 1, 2, 4, 2, 16, 64)
    np.testing.assert_allclose(np.asarray(zipar_attention(*args, use_kernel=True)),
                               np.asarray(zipar_attention(*args, use_kernel=False)), atol=2e-6)
