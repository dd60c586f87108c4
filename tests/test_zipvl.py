"""ZipVL: the adaptive count p(tau), sparse prefill (equal to dense attention restricted to the important set, at
(p / n)^2 of its FLOPs), and the mixed-precision / eviction caches on the shipped trained checkpoint."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import kv
from zipjax.harness.kv_analysis import prompt_queries_keys
from zipjax.kv import QuantizedKVCache
from zipjax.kv.saliency import prompt_statistics
from zipjax.kv.zipvl import (
    _compact_attention,
    attention_flops,
    bucket_sizes,
    important_count,
    important_order,
    restricted_attention,
    sparse_prefill_attention,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(stdlib_llama):
    return stdlib_llama


@pytest.fixture(scope="module")
def real_qk(trained):
    text = (ROOT / "zipjax" / "generate.py").read_text()[:3000]
    ids = np.asarray([trained.tokenizer.encode(text)[:96]], np.int32)
    return prompt_queries_keys(trained, ids)


def test_p_is_monotone_in_tau_and_p1_counts_tokens_with_mass(real_qk):
    taus = [0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0]
    counts = []
    for layer, (q, k) in enumerate(real_qk):
        starts = jnp.array([10], jnp.int32)  # 10 padding slots: no mass
        mass, _ = prompt_statistics(q, k, starts, method="probe", probe_ratio=0.2, normalize="probe",
                                   key=jax.random.key(layer))
        p = [int(important_count(mass, tau)[0]) for tau in taus]
        assert p == sorted(p), p
        assert p[-1] == int((mass.sum(axis=1) > 0).sum()) == 96 - 10
        counts.append(p[taus.index(0.975)])
    print(f"p(0.975) per layer on a 96-token prompt: {counts}")
    assert len(set(counts)) > 1  # adaptive: the layers differ


def test_p_by_hand():
    mass = jnp.array([[[0.5, 0.0, 0.3, 0.2]]])  # [batch, kv_heads, n]
    assert int(important_count(mass, 0.5)[0]) == 1
    assert int(important_count(mass, 0.8)[0]) == 2
    assert int(important_count(mass, 0.81)[0]) == 3
    assert int(important_count(mass, 1.0)[0]) == 3


@pytest.mark.parametrize("sliding_window", [None, 9])
def test_sparse_prefill_equals_dense_attention_restricted_to_the_important_set(sliding_window):
    batch, length, heads, kv_heads, d = 2, 40, 4, 2, 16
    rng = np.random.default_rng(0)  # numpy draws: jax.random.normal compiles for seconds on CPU, once per shape
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q, k, v = normal(batch, length, heads, d), normal(batch, length, kv_heads, d), normal(batch, length, kv_heads, d)
    starts = jnp.array([0, 5], jnp.int32)
    score = normal(batch, kv_heads, length)
    score = jnp.where(jnp.arange(length) >= starts[:, None, None], score, -jnp.inf)
    order = important_order(score)
    count = jnp.array([13, 22], jnp.int32)
    out, bucket = sparse_prefill_attention(q, k, v, order, count, starts, buckets=4, sliding_window=sliding_window)
    assert bucket_sizes(length, 4)[int(bucket)] == 30  # the smallest of 10, 20, 30, 40 holding p = 22
    rank = jnp.argsort(order, axis=-1)  # rank of each token
    important = (rank < count[:, None, None]) & (jnp.arange(length) >= starts[:, None, None])
    assert bool(important[:, :, -1].all())  # the last token is always important
    if sliding_window is None:
        expected = restricted_attention(q, k, v, important, starts)
    else:  # the same definition with a window: mask by hand
        slots = jnp.arange(length)
        delta = slots[:, None] - slots[None, :]
        mask = (delta >= 0) & (delta < sliding_window) & (slots[None, :] >= starts[:, None, None])
        mask = mask[:, None] & important[:, :, None, :]
        qg = q.reshape(batch, length, kv_heads, 2, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) / 4.0
        probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, -1e30), axis=-1)
        expected = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        expected = jnp.where(important.transpose(0, 2, 1)[..., None, None], expected, 0.0).reshape(q.shape)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)


def test_attention_flops_fall_as_one_minus_rho_squared():
    dense, sparse = attention_flops(1000, 421, 32, 128)
    assert round(100 * (1 - sparse / dense), 1) == 82.3  # the paper's 42.1% -> 82.3% (Table 3)
    length, heads, kv_heads, d = 256, 4, 2, 32
    args = (jnp.zeros((1, length, heads, d)), jnp.zeros((1, length, kv_heads, d)), jnp.zeros((1, length, kv_heads, d)),
            jnp.zeros((1, kv_heads, length), jnp.int32), jnp.array([64]), jnp.zeros(1, jnp.int32))

    def flops(size):
        fn = jax.jit(functools.partial(_compact_attention, size=size, sliding_window=None))
        cost = fn.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    for size in (64, 128):
        ratio = flops(size) / flops(length)
        print(f"XLA cost analysis: rho = {size / length}, FLOPs ratio {ratio:.4f} (rho^2 = {(size / length) ** 2})")
        assert abs(ratio - (size / length) ** 2) < 0.01


def _prompt_cache(trained, method, length=64):
    ids = jnp.asarray(np.random.default_rng(1).integers(3, trained.config.vocab_size, (2, length)), jnp.int32)
    starts = jnp.array([0, 7], jnp.int32)
    cache = QuantizedKVCache.init(trained.config, method, 2, length + 32, length, starts)
    positions = jnp.maximum(jnp.arange(length)[None] - starts[:, None], 0)
    _, cache = trained.apply(ids, positions, cache)
    return cache, starts


def test_eviction_keeps_p_tokens_per_head_within_the_static_room(trained):
    method = kv.ZipVL(tau=0.9, evict=True, ratio_range=(0.1, 0.5), buffer_len=8)
    cache, _ = _prompt_cache(trained, method)
    assert {seg.subset for seg in cache.geometry.segments()} == {0}  # no low-bit store
    kept = [np.asarray((layer.stores[0].slots >= 0).sum(axis=-1)) for layer in cache.layers]  # [batch, kv_heads]
    for per_head in kept:
        assert (per_head == per_head[:, :1]).all()  # one p per sequence and layer
        assert (per_head >= 7).all() and (per_head <= 32).all()  # clipped into [0.1, 0.5] x 64
    print("tokens kept per layer (sequence 0):", [int(k[0, 0]) for k in kept])


def test_mixed_precision_stores_every_token_once(trained):
    cache, starts = _prompt_cache(trained, kv.ZipVL(buffer_len=8))
    for layer in cache.layers:
        prompt = [st for st, seg in zip(layer.stores, cache.geometry.segments(), strict=True) if seg.first_block == 0]
        slots = np.concatenate([np.asarray(st.slots) for st in prompt], axis=2)
        for b, start in enumerate(np.asarray(starts)):
            for h in range(slots.shape[1]):
                held = np.sort(slots[b, h][slots[b, h] >= 0])
                np.testing.assert_array_equal(held, np.arange(start, 64))


def test_generate_with_zipvl_and_bad_configurations(trained):
    prompts = [trained.tokenizer.encode("def fibonacci(n):"), trained.tokenizer.encode("import os\n")]
    # the default ZipVL generates on a mesh in tests/test_sharding.py; here eviction with the kernel, and dense prefill
    for method in (kv.ZipVL(buffer_len=16, evict=True, kernel=True), kv.ZipVL(buffer_len=16, sparse_prefill=False)):
        out = zipjax.generate(trained, prompts, 24, stop_tokens=(), kv=method)
        assert out.shape == (2, out.shape[1]) and (out[:, -24:] >= 0).all()
    for bad, match in [(dict(tau=0), "tau"), (dict(tau=1.5), "tau"), (dict(ratio_range=(0.6, 0.2)), "ratio_range"),
                       (dict(low_bits=3), "supported bit width"), (dict(buckets=0), "buckets")]:
        with pytest.raises(zipjax.ZipjaxError, match=match):
            kv.ZipVL(**bad)


def test_one_important_set_per_layer_shared_by_heads_unless_per_head(trained):
    """Algorithm 1 indexes a layer's Q, K and V with one T: every KV head of a layer stores the same important
    slots; `per_head=True` lets the heads choose (with the same count p)."""
    shared, _ = _prompt_cache(trained, kv.ZipVL(buffer_len=8))
    own, _ = _prompt_cache(trained, kv.ZipVL(buffer_len=8, per_head=True))
    differ = 0
    for layer_shared, layer_own in zip(shared.layers, own.layers, strict=True):
        slots = np.sort(np.asarray(layer_shared.stores[0].slots), axis=-1)  # [batch, kv_heads, room]
        assert (slots == slots[:, :1]).all()
        own_slots = np.sort(np.asarray(layer_own.stores[0].slots), axis=-1)
        differ += int((own_slots != own_slots[:, :1]).any())
    assert differ > 0


def test_probes_are_64_recent_and_64_random_queries():
    from zipjax.kv.saliency import probe_slots

    starts = jnp.array([0, 40], jnp.int32)
    slots = np.asarray(probe_slots(starts, 300, 0.1, jax.random.key(0), (64, 64)))
    assert slots.shape == (2, 128)
    np.testing.assert_array_equal(slots[:, 64:], np.broadcast_to(np.arange(236, 300), (2, 64)))
    assert (slots[:, :64] < 236).all() and (slots[1, :64] >= 40).all()
    assert probe_slots(starts, 300, 0.1, jax.random.key(0)).shape == (2, 30)  # the 5% + 5% option
    assert probe_slots(starts, 96, 0.1, jax.random.key(0), (64, 64)).shape == (2, 96)  # clipped to the prompt
    assert kv.ZipVL().probes == (64, 64) and not kv.ZipVL().per_head


def test_stored_bytes_count_the_clipped_p_not_the_room(trained):
    cache, _ = _prompt_cache(trained, kv.ZipVL(tau=0.9, evict=True, ratio_range=(0.1, 0.5), buffer_len=8))
    unused = 0
    for layer in cache.layers:
        for store in layer.stores:
            slots = np.asarray(store.slots)
            per_entry = sum(x.nbytes // slots.size for x in store.arrays().values() if x.shape[:3] == slots.shape)
            unused += int((slots < 0).sum()) * per_entry
    assert unused > 0 and cache.stored_nbytes() == cache.nbytes() - unused


def test_sparse_prefill_over_a_dense_cache(trained):
    """compress=False (the paper's Video-MME setting): the prompt pass is ZipVL's sparse attention, and the cache
    holds every key and value exactly."""
    length = 64
    ids = jnp.asarray(np.random.default_rng(1).integers(3, trained.config.vocab_size, (2, length)), jnp.int32)
    starts = jnp.array([0, 7], jnp.int32)
    positions = jnp.maximum(jnp.arange(length)[None] - starts[:, None], 0)
    run = lambda method: trained.apply(ids, positions, kv.init_cache(method, trained.config, 2, length + 32, length,
                                                                     starts))
    sparse_dense, cache = run(kv.ZipVL(buffer_len=8, compress=False))
    sparse_quantized, _ = run(kv.ZipVL(buffer_len=8))
    np.testing.assert_allclose(np.asarray(sparse_dense), np.asarray(sparse_quantized), atol=1e-4)
    _, dense = trained.apply(ids, positions, kv.KVCache.init(trained.config, 2, length + 32, starts))
    np.testing.assert_allclose(np.asarray(cache.inner.k[0]), np.asarray(dense.k[0]), atol=1e-5)  # layer 0
    assert cache.nbytes() == dense.nbytes()
    with pytest.raises(zipjax.ZipjaxError, match="dense cache"):
        kv.ZipVL(compress=False, sparse_prefill=False)


def test_zipvl_says_which_cache_it_makes():
    """compress=False is still ZipVL, and the method itself makes the dense cache with sparse prefill (no buffer
    slots, no packing checks); compress=True makes the quantized cache with its full-precision buffer."""
    from zipjax.config import ModelConfig
    from zipjax.kv.sparse import SparsePrefillKVCache

    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, dtype="float32")
    dense = kv.ZipVL(compress=False, buffer_len=8)
    assert dense.decode_slots == 0 and kv.ZipVL(buffer_len=8).decode_slots == 8
    assert isinstance(jax.eval_shape(lambda: kv.init_cache(dense, config, 2, 40, 32)), SparsePrefillKVCache)
    quantized = jax.eval_shape(lambda: kv.init_cache(kv.ZipVL(buffer_len=8), config, 2, 40, 32))
    assert isinstance(quantized, QuantizedKVCache)
    with pytest.raises(zipjax.ZipjaxError, match="full-precision window"):
        kv.ZipVL(buffer_len=16).check(config, 2, 40, 32)
    dense.check(config, 2, 40, 32)  # a dense cache has no window to fit
