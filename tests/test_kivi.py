"""KIVI as its official code runs it: key statistics per (channel, run of `group` tokens), the prompt's last T0 % R
keys and last R values in full precision, a key residual quantized as a whole at R, a sliding window of R values;
checked by hand on a tiny cache, then against the dense cache and the Pallas kernel on the shipped checkpoint."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import teacher_forced

import zipjax
from zipjax import kv
from zipjax.config import ModelConfig
from zipjax.kv.codec import dequantize, grouped, quantize, quantize_key_blocks
from zipjax.kv.dense import KVCache
from zipjax.kv.kivi import KIVICache

ROOT = Path(__file__).resolve().parents[1]
HEADS, KV_HEADS, D = 4, 2, 16


def test_key_statistics_are_per_channel_and_run_of_group_tokens():
    """Two runs of 4 tokens with very different ranges: each run gets its own (step, min) per channel."""
    low = jnp.arange(8.0).reshape(4, 2) / 10  # tokens 0..3: values in [0, 0.7]
    k = jnp.concatenate([low, low + 100.0])[None, None]  # [1, 1, 8 tokens, 2 channels]
    codes, step, minimum = quantize_key_blocks(k, 2, 4)
    assert step.shape == minimum.shape == (1, 1, 2, 2)  # [batch, heads, runs, channels]
    np.testing.assert_allclose(np.asarray(minimum[0, 0], np.float32), [[0.0, 0.1], [100.0, 100.1]], atol=0.07)
    np.testing.assert_allclose(np.asarray(step[0, 0], np.float32), [[0.2, 0.2], [0.2, 0.2]], atol=0.02)  # fp16 at 100
    err = jnp.abs(dequantize(codes, jnp.repeat(step, 4, axis=2), jnp.repeat(minimum, 4, axis=2)) - k)
    assert float(err.max()) < 0.11  # within half a run's step
    _, whole_step, _ = quantize(k, 2, axis=2)  # one statistic over both runs: a step 150x coarser
    assert float(whole_step.astype(jnp.float32).min()) > 30


def _tiny() -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D, max_position_embeddings=128,
                       dtype="float32")


# jitted whole (one compile per shape, not one per jnp op): the by-hand test calls them on many shapes
_quantize_key_blocks = jax.jit(quantize_key_blocks, static_argnums=(1, 2))
_quantize = jax.jit(quantize, static_argnums=1, static_argnames="axis")
_dequantize = jax.jit(dequantize)


def _reference(q, keys, values, kq: int, vq: int, method: kv.KIVI) -> np.ndarray:
    """KIVI's decode attention written out: keys below kq quantized per run (the runs as they were quantized:
    from 0 in steps of R, each in runs of `group`), values below vq per token; the rest exact. q [batch, heads, d];
    keys, values [batch, kv_heads, n, d]."""
    k = np.asarray(keys, np.float32).copy()
    for first in range(0, kq, method.residual):
        part = keys[:, :, first:first + method.residual]
        codes, step, minimum = _quantize_key_blocks(part, method.bits, method.group)
        k[:, :, first:first + method.residual] = _dequantize(codes, *(jnp.repeat(x, method.group, axis=2)
                                                                       for x in (step, minimum)))
    v = np.asarray(values, np.float32).copy()
    if vq:
        codes, step, minimum = _quantize(grouped(values[:, :, :vq], method.group), method.bits, axis=-1)
        v[:, :, :vq] = np.asarray(_dequantize(codes, step, minimum)).reshape(v[:, :, :vq].shape)
    group = HEADS // KV_HEADS
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [batch, heads, n, d]
    scores = np.einsum("bhd,bhnd->bhn", np.asarray(q), k) / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhn,bhnd->bhd", p / p.sum(-1, keepdims=True), v)


def test_prefill_and_decode_residuals_by_hand():
    """R = 8, group 4, a 21-token prompt: keys 0..15 quantized (21 - 21 % 8), values 0..12 (21 - 8); each decode
    step quantizes the value leaving the 8-token window, and the step at slot 23 quantizes keys 16..23 as a whole.
    Every step's output equals KIVI's attention written out by hand."""
    method = kv.KIVI(bits=2, group=4, residual=8)
    n, steps = 21, 5
    # numpy arrays: jax.random.normal is a long compile on CPU, and each slice of a jax array one more
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    keys = normal(1, KV_HEADS, n + steps, D) * np.linspace(0.5, 4, D, dtype=np.float32)
    values, queries = normal(1, KV_HEADS, n + steps, D), normal(1, n + steps, HEADS, D)
    cache = KIVICache.init(_tiny(), method, 1, n + steps, n)
    to_tokens = lambda x: x.transpose(0, 2, 1, 3)  # [batch, kv_heads, n, d] -> [batch, n, kv_heads, d]

    @jax.jit  # one program for the prompt and one for all decode steps, rather than one per jnp op
    def attend(cache, q, k, v):
        out, cache = cache.attend(0, q, to_tokens(k), to_tokens(v), None)
        return out, cache.advance(q.shape[1])

    _, cache = attend(cache, queries[:, :n], keys[:, :, :n], values[:, :, :n])
    store = cache.layers[0].store
    np.testing.assert_array_equal(np.asarray(store.slots[0, 0, :16]), list(range(13)) + [-1] * 3)
    assert not np.asarray(store.k_codes[0, :, 16:]).any()  # keys 16..20 are the residual: not quantized yet
    np.testing.assert_array_equal(np.asarray(store.k_step[0, 0, 4:], np.float32), 1.0)  # runs 4.. untouched
    ring = np.asarray(cache.layers[0].v_ring)
    held = np.arange(n - 9, n)  # the newest R + 1 prompt tokens, at slot % 9
    np.testing.assert_array_equal(ring[:, :, held % 9], np.asarray(values[:, :, held]))
    for c in range(n, n + steps):
        out, cache = attend(cache, queries[:, c:c + 1], keys[:, :, c:c + 1], values[:, :, c:c + 1])
        kq, vq = (c // 8) * 8, c - 8  # at attention time: keys below kq, values below c - R quantized
        expected = _reference(queries[:, c], keys[:, :, :c + 1], values[:, :, :c + 1], kq, vq, method)
        np.testing.assert_allclose(np.asarray(out[:, 0]), expected, atol=2e-5)
    store = cache.layers[0].store
    np.testing.assert_array_equal(np.asarray(store.slots[0, 0, :20]), list(range(n + steps - 8)) + [-1] * 2)
    assert np.asarray(store.k_codes[0, :, 16:24]).any()  # the residual 16..23 was quantized at slot 23
    assert not np.asarray(store.k_codes[0, :, 24:]).any()


@pytest.fixture(scope="module")
def trained(stdlib_llama):
    return stdlib_llama


def test_kivi_tracks_the_dense_cache_and_the_kernel_equals_the_jnp_path(trained):
    """Left padding, a prompt that is not a multiple of R, two key flushes: 8 bits tracks the dense cache; the
    Pallas kernel (interpreted, blocks of `group` tokens) gives the jnp path's logits at 2 bits."""
    rng = np.random.default_rng(0)  # 13 tokens after the prompt: decode slots 60..71 hold the flushes at 63 and 71
    ids = jnp.asarray(rng.integers(3, trained.config.vocab_size, (2, 60 + 13)), jnp.int32)
    starts = jnp.asarray([0, 9], jnp.int32)
    dense = teacher_forced(trained, KVCache.init(trained.config, 2, 80, starts), ids, 60)[0]
    eight = kv.KIVI(bits=8, group=8, residual=8)
    ours = teacher_forced(trained, kv.init_cache(eight, trained.config, 2, 80, 60, starts), ids, 60)[0]
    assert np.abs(ours - dense).max() < 0.05
    two = kv.KIVI(bits=2, group=8, residual=8)
    jnp_path = teacher_forced(trained, kv.init_cache(two, trained.config, 2, 80, 60, starts), ids, 60)[0]
    kernel = teacher_forced(trained, kv.init_cache(dataclasses.replace(two, kernel=True), trained.config, 2, 80,
                                                    60, starts), ids, 60)[0]
    assert np.abs(kernel - jnp_path).max() < 1e-3


def test_real_bytes_and_bad_configurations(trained):
    """nbytes counts every array: codes, one key statistic per 32 tokens and channel, value statistics, slots and
    the two R + 1 rings; the per-run key statistics make KIVI-2 bigger than one statistic per block would."""
    cfg = trained.config  # 2 KV heads of 32 channels, 6 layers
    cache = jax.jit(lambda s: kv.init_cache(kv.KIVI(bits=2, residual=32), cfg, 1, 1024, 512, s, jnp.float16))(
        jnp.zeros(1, jnp.int32))
    # per token: K and V codes, V (step, min), slot; per 32-token run: K (step, min) per channel; the rings
    per_head = 1024 * (2 * 32 * 2 // 8 + 2 * 2 + 2) + (1024 // 32) * 32 * 2 * 2 + 2 * 33 * 32 * 2
    assert cache.nbytes() == cfg.num_layers * cfg.num_kv_heads * per_head + 4 + 4  # + cursor, start
    with pytest.raises(zipjax.ZipjaxError, match="multiple of group"):
        kv.KIVI(group=32, residual=48)
    with pytest.raises(zipjax.ZipjaxError, match="does not divide head_dim"):
        kv.init_cache(kv.KIVI(group=12, residual=24), cfg, 1, 64, 16)
