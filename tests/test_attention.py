"""The library's attention over a slot-addressed cache (zipjax.attention.cache_attention) on the CPU path: blockwise
online softmax equal to plain masked attention, reading only the blocks a query can see; and the model's prompt
pass in chunks equal to one pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipjax.attention import chunked_attention, gqa_attention, slot_mask
from zipjax.kv.dense import KVCache
from zipjax.transformer import Transformer, prompt_pass

CASES = [  # batch, q_len, heads, kv_heads, head_dim, max_len, cursor, window, block_q, block_k
    (2, 37, 8, 2, 16, 100, 0, None, 16, 32),  # GQA 4, prefill, lengths not multiples of the blocks
    (3, 1, 6, 3, 16, 300, 150, None, 256, 64),  # decode, GQA 2
    (2, 20, 4, 4, 8, 64, 10, 7, 8, 16),  # a second chunk after a first, sliding window
    (1, 64, 4, 1, 16, 64, 0, 16, 32, 32),  # multi-query, window
    (2, 33, 9, 3, 64, 200, 40, None, 512, 512),  # SmolLM2-shaped heads, one block each
]


def _case(seed, batch, q_len, heads, kv_heads, head_dim, max_len, cursor):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), jnp.float32)
    starts = jnp.asarray(rng.integers(0, cursor + 2, batch), jnp.int32).at[0].set(0)  # left padding, one unpadded
    return q, k, v, jnp.int32(cursor), starts


@pytest.mark.parametrize("case", CASES)
def test_chunked_attention_equals_plain_masked_attention(case):
    batch, q_len, heads, kv_heads, head_dim, max_len, cursor, window, block_q, block_k = case
    q, k, v, cur, starts = _case(0, batch, q_len, heads, kv_heads, head_dim, max_len, cursor)
    mask = slot_mask(cur + jnp.arange(q_len), jnp.arange(max_len), starts, window)
    reference = gqa_attention(q, k, v, mask)
    out = chunked_attention(q, k, v, cur, starts, window, block_q=block_q, block_k=block_k)
    sees = np.asarray(mask.any(-1))  # queries with at least one visible key; the others are left padding
    err = float(jnp.abs(out - reference)[sees].max())
    print(f"{case}: max abs error {err:.2e}")
    assert err < 1e-5
    assert bool(jnp.all(out[~sees] == 0)), "a query that sees nothing gets zeros"


def test_a_decode_step_reads_only_the_filled_extent():
    """Slots past the cursor and before the window hold NaN: a step that read them would return NaN."""
    q, k, v, cur, starts = _case(1, 2, 1, 8, 2, 16, 4096, 700)
    poisoned = [x.at[:, :, 701:].set(jnp.nan).at[:, :, :300].set(jnp.nan) for x in (k, v)]
    out = chunked_attention(q, *poisoned, cur, starts, 401, block_k=128)
    mask = slot_mask(cur + jnp.arange(1), jnp.arange(4096), starts, 401)
    np.testing.assert_allclose(out, gqa_attention(q, k, v, mask), atol=1e-5)


def test_chunked_prompt_pass_equals_one_pass(stdlib_llama):
    model = stdlib_llama
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 4000, (2, 256)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), ids.shape)
    whole, whole_cache = Transformer(model.config).apply({"params": model.params}, ids, positions,
                                                         KVCache.init(model.config, 2, 384), last_only=True)
    chunked, chunked_cache = jax.jit(prompt_pass, static_argnames=("config", "chunk"))(
        model.params, model.config, ids, positions, KVCache.init(model.config, 2, 384), chunk=64)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    assert int(chunked_cache.cursor) == 256
    np.testing.assert_allclose(chunked_cache.k[3], whole_cache.k[3], atol=1e-5)


def test_causal_attention_is_differentiable_with_the_dense_gradient():
    """The cache-less path (training, fine-tuning experts) runs the key-block loops of `chunked_attention`, whose
    bounds depend on the data; its custom gradient is the dense masked softmax's, equal within float32 rounding."""
    from zipjax.attention import causal_attention, dense_causal_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 40, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 40, 8)), jnp.float32) for _ in range(2))
    for window in (None, 7):
        def loss(f, window=window):
            return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, window)))

        np.testing.assert_allclose(causal_attention(q, k, v, window), dense_causal_attention(q, k, v, window),
                                   atol=1e-5)
        ours = jax.grad(loss(causal_attention), argnums=(0, 1, 2))(q, k, v)
        dense = jax.grad(loss(dense_causal_attention), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, dense, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
