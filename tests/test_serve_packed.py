"""Serving a compressed KV cache on packed pages (zipjax.serve.packed): the page-local saliency and the packing equal
an independent numpy computation; 8-bit pages reproduce dense generation; a ZipCache request's tokens do not depend
on its batch mates or on how its prompt was chunked; packed pages serve the prefix cache; a small packed pool
preempts without leaking a page; methods without a page format are refused by name."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.kernels.common import empty_state, group_queries

import zipjax
from zipjax import kv
from zipjax.config import PUBLISHED, ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.codec import dequantize, unpack
from zipjax.serve.engine import Engine, EngineConfig
from zipjax.serve.packed import PackedPool, compress_layer, layer_stores, page_codec
from zipjax.serve.paged import Pool, add_page_mass, combine_kv, paged_state
from zipjax.serve.requests import Request, SamplingParams

SHAPES = dict(max_num_seqs=4, max_num_batched_tokens=32, page_size=8, block_size=16, num_pages=64)
TEXTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n"]


def start(model, method, **overrides) -> Engine:
    engine = Engine(model, EngineConfig(**{**SHAPES, **overrides}), kv=method, log=lambda _: None)
    engine.start()
    engine.wait_ready(600)
    return engine


@pytest.fixture(scope="module")
def zipcache_engine(stdlib_llama):
    engine = start(stdlib_llama, kv.ZipCache())
    yield engine
    engine.stop()


def prompt(model, text: str) -> tuple[int, ...]:
    return tuple(model.tokenizer.encode(text))


def greedy(ids, n: int, request_id: str) -> Request:
    return Request(request_id, ids, SamplingParams(max_tokens=n, ignore_eos=True))


def tokens_of(stream) -> list[int]:
    return [t for update in stream for t in update.token_ids]


def assert_no_page_held(engine: Engine) -> None:
    counts = engine.metrics()
    for pool in ("", "packed_"):
        assert counts[f"{pool}pages_used"] == 0
        assert counts[f"{pool}pages_free"] + counts[f"{pool}pages_cached"] == counts[f"{pool}pages_total"]


TINY = ModelConfig(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def test_page_local_saliency_and_packing_equal_numpy():
    page, n = 8, 20  # one sequence of 20 tokens on dense pages 1, 2, 3
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, n, 4, 16)).astype(np.float32)
    k = rng.normal(size=(n, 2, 16)).astype(np.float32) * np.linspace(0.5, 2.0, 16)
    v = rng.normal(size=(n, 2, 16)).astype(np.float32)
    k_pages, v_pages = np.zeros((4, page, 2, 16), np.float32), np.zeros((4, page, 2, 16), np.float32)
    k_pages[1:].reshape(-1, 2, 16)[:n], v_pages[1:].reshape(-1, 2, 16)[:n] = k, v
    table, positions, first = jnp.array([[1, 2, 3, 0]]), jnp.arange(n)[None], jnp.zeros((1,), jnp.int32)
    qg = group_queries(jnp.asarray(q), 2)
    kv_pages = combine_kv(jnp.asarray(k_pages), jnp.asarray(v_pages))
    state = paged_state(qg, kv_pages, table, positions, first, None, 2, empty_state(qg.shape[:4], 16))
    mass = add_page_mass(jnp.zeros((4, page, 2)), qg, kv_pages, table, positions, first, None, state)

    scores = np.einsum("qhd,khd->hqk", q[0], np.repeat(k, 2, axis=1)) / 4.0  # heads 0,1 -> kv head 0
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    same_page = (np.arange(n)[:, None] // page) == (np.arange(n)[None, :] // page)
    expect = (probs * same_page).sum(axis=1).reshape(2, 2, n).sum(axis=1)  # [kv_heads, keys]
    got = np.asarray(mass)[1:].reshape(-1, 2)[:n].T
    np.testing.assert_allclose(got, expect, atol=1e-5)

    method = kv.ZipCache()
    spec = page_codec(method, TINY, page)
    packed = PackedPool.init(TINY, spec, 3)
    pages, _ = compress_layer(spec, jnp.asarray(k_pages), jnp.asarray(v_pages), mass, packed.stores[0],
                              packed.v_scale, jnp.array([1, 2]), jnp.array([1, 2]))
    stores, _ = layer_stores(spec, pages)  # the records decoded into the codec's stores
    salient = method.split(page)[0]
    for p in (0, 1):  # packed page p + 1 holds dense page p + 1: tokens 8p .. 8p + 7
        score = expect[:, 8 * p:8 * p + 8] / (page - np.arange(page))
        for h in range(2):
            want = set(np.argsort(-score[h], kind="stable")[:salient].tolist())
            assert set(np.asarray(stores[0].slots[p + 1, h]).tolist()) == want
    # the salient keys come back within half a quantization step of what was packed
    slots = np.asarray(stores[0].slots[1])  # [kv_heads, salient]
    codes = unpack(stores[0].k_codes[1:2], 4)
    keys = np.asarray(dequantize(codes, stores[0].k_step[1:2], stores[0].k_min[1:2]))[0]
    step = np.asarray(stores[0].k_step[1], np.float32)  # [kv_heads, 1, head_dim]
    for h in range(2):
        assert np.all(np.abs(keys[h] - k[:page][slots[h], h]) <= step[h] / 2 + 1e-3)


@pytest.mark.slow
def test_8bit_pages_reproduce_dense_generation(stdlib_llama):
    engine = start(stdlib_llama, kv.Uniform(bits=8))
    try:
        prompts = [prompt(stdlib_llama, t) for t in TEXTS]
        streams = [engine.submit(greedy(ids, 40, f"u{i}")) for i, ids in enumerate(prompts)]
        for ids, stream in zip(prompts, streams, strict=True):
            want = zipjax.generate(stdlib_llama, [list(ids)], 40)[0, len(ids):].tolist()
            assert tokens_of(stream) == want
        assert engine.metrics()["packed_pages_cached"] > 0  # the prompts' pages were packed
        assert_no_page_held(engine)
    finally:
        engine.stop()


def test_zipcache_tokens_do_not_depend_on_batch_mates_or_chunking(zipcache_engine, stdlib_llama):
    long = prompt(stdlib_llama, "".join(TEXTS) * 6)
    assert len(long) > 2 * SHAPES["max_num_batched_tokens"]
    alone = tokens_of(zipcache_engine.submit(greedy(long, 24, "alone")))
    others = [zipcache_engine.submit(greedy(prompt(stdlib_llama, t), 30, f"m{i}")) for i, t in enumerate(TEXTS[:3])]
    together = zipcache_engine.submit(greedy(long, 24, "together"))  # prompt chunks start at other offsets
    assert tokens_of(together) == alone
    for stream in others:
        assert len(tokens_of(stream)) == 30
    assert_no_page_held(zipcache_engine)


def test_packed_pages_serve_the_prefix_cache(zipcache_engine, stdlib_llama):
    ids = prompt(stdlib_llama, "".join(reversed(TEXTS)) * 3)
    first = list(zipcache_engine.submit(greedy(ids, 8, "first")))
    second = list(zipcache_engine.submit(greedy(ids, 8, "second")))
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens >= (len(ids) // SHAPES["page_size"] - 1) * SHAPES["page_size"]
    assert len([t for u in second for t in u.token_ids]) == 8
    assert_no_page_held(zipcache_engine)


@pytest.mark.slow
def test_a_small_packed_pool_preempts_without_leaking(zipcache_engine, stdlib_llama):
    # 4 sequences of ~170 tokens need ~85 packed pages of 8; the packed pool has 63
    before = zipcache_engine.metrics()["preemptions"]
    streams = [zipcache_engine.submit(greedy(prompt(stdlib_llama, t), 160, f"p{i}")) for i, t in enumerate(TEXTS)]
    assert [len(tokens_of(s)) for s in streams] == [160] * 4
    assert zipcache_engine.metrics()["preemptions"] > before
    assert_no_page_held(zipcache_engine)


@pytest.mark.parametrize("method", [kv.ZipVL(), kv.MiniCache()], ids=["zipvl", "minicache"])
def test_methods_without_a_page_format_are_refused_by_name(stdlib_llama, method):
    with pytest.raises(ZipjaxError, match=f"--kv {method.name} is not served: "):
        Engine(stdlib_llama, EngineConfig(**SHAPES), kv=method)


def test_a_packed_page_is_a_fraction_of_a_dense_page():
    config = PUBLISHED["llama-3-8b"]  # bfloat16, head_dim 128: the pod table's shapes
    dense = Pool.page_bytes(config, 64)
    got = {}
    for method, most in ((kv.ZipCache(), 0.26), (kv.KIVI(bits=2), 0.2), (kv.Uniform(bits=4), 0.28)):
        got[method.name] = PackedPool.page_bytes(config, page_codec(method, config, 64)) / dense
        assert got[method.name] < most, got
