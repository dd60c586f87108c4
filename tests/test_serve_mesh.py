"""The serving engine on a device mesh (zipjax.serve.engine with `mesh=`, `zipjax serve --mesh DxM`): greedy tokens of
concurrent requests on a 2x4 mesh of the suite's eight CPU devices equal one device's, dense and ZipCache pages, with
the pool split (never replicated) and no page leaked; and LLaMA-3-70B's serving step compiled ahead of time for a
v5e:4x4 slice, whose 16-way model axis does not divide its 8 KV heads, with the pool split 16 ways; prompt
log-probabilities (lm-eval's loglikelihood) served on the mesh equal one device's."""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import numpy as np
import pytest

import zipjax
from zipjax import kv
from zipjax.errors import ZipjaxError
from zipjax.serve.cli import _mesh
from zipjax.serve.engine import Engine, EngineConfig
from zipjax.serve.paged import page_shards
from zipjax.serve.requests import Request, SamplingParams
from zipjax.serve.scoring import prompt_logprobs

SHAPES = dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=8, block_size=16, num_pages=64)
TEXTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
         "    return self._cache[key]\n"]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def engines(stdlib_llama):
    """One engine per (kv method, mesh) for the module's tests, started once (an engine compiles its step shapes at
    start, one on a mesh its own sharded step), with its greedy outputs of TEXTS run first thing:
    `engines(method, mesh) -> (engine, outputs)`; all stopped at the end."""
    started: dict[tuple, tuple[Engine, list[list[int]]]] = {}

    def get(method, mesh: tuple[int, int] | None) -> tuple[Engine, list[list[int]]]:
        key = (None if method is None else method.name, mesh)
        if key not in started:
            on = None if mesh is None else zipjax.make_mesh(data=mesh[0], model=mesh[1])
            engine = Engine(stdlib_llama, EngineConfig(**SHAPES), kv=method, log=lambda _: None, mesh=on)
            engine.start()
            started[key] = (engine, None)
            engine.wait_ready(600)
            started[key] = (engine, run(engine))
        return started[key]

    yield get
    for engine, _ in started.values():
        engine.stop()


def run(engine: Engine) -> list[list[int]]:
    """Every prompt of TEXTS submitted at once (five requests, four slots), greedy."""
    tokenizer = engine.model.tokenizer
    streams = [engine.submit(Request(f"r{i}", tuple(tokenizer.encode(text)),
                                     SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
               for i, text in enumerate(TEXTS)]
    return [[t for update in stream for t in update.token_ids] for stream in streams]


def assert_split_and_nothing_leaked(engine: Engine) -> None:
    counts = engine.metrics()
    for prefix in ("", "packed_") if engine.spec is not None else ("",):
        assert counts[f"{prefix}pages_used"] == 0
        assert counts[f"{prefix}pages_free"] + counts[f"{prefix}pages_cached"] == counts[f"{prefix}pages_total"]
    devices = engine.model.mesh.devices.size
    for x in jax.tree.leaves(engine.pool):  # every array of the pool is split over all eight devices
        assert len(x.sharding.device_set) == devices
        assert x.addressable_shards[0].data.size * devices == x.size, (x.shape, x.sharding)


@pytest.mark.parametrize("method", [None, kv.ZipCache()], ids=["dense", "zipcache"])
def test_greedy_tokens_on_a_2x4_mesh_equal_one_devices(stdlib_llama, engines, method):
    _, single = engines(method, None)
    if method is None:  # the single-device engine itself equals zipjax.generate (tests/test_serve_engine.py)
        ids = tuple(stdlib_llama.tokenizer.encode(TEXTS[0]))
        assert single[0] == zipjax.generate(stdlib_llama, [list(ids)], NEW_TOKENS)[0, len(ids):].tolist()
    engine, on_mesh = engines(method, (2, 4))
    assert on_mesh == single
    assert all(len(tokens) == NEW_TOKENS for tokens in on_mesh)
    assert_split_and_nothing_leaked(engine)
    # stdlib-llama's 2 KV heads on a 4-way model axis: heads over 2, head_dim over the other 2; pages over "data"
    spec = engine.pool.kv[0].sharding.spec
    assert tuple(spec) == ("data", None, "model", "model_minor")
    assert engine.pool.kv[0].shape[0] % page_shards(engine.model.mesh, 2) == 0


def test_prompt_logprobs_on_a_2x4_mesh_equal_one_devices(stdlib_llama, engines):
    """lm-eval's loglikelihood path (token-id prompt, echo with logprobs, max_tokens 0 or 1) on an engine served on
    the mesh: every prompt token's log-probability and alternatives equal one device's (zipjax.serve.scoring on the
    unplaced model, what the one-device engine sends) and the model's own logits."""
    ids = tuple(stdlib_llama.tokenizer.encode(TEXTS[2] + TEXTS[3]))
    single = prompt_logprobs(stdlib_llama, ids, 5, None)
    expected = np.asarray(jax.nn.log_softmax(stdlib_llama.logits(np.asarray([ids]))[0], axis=-1))  # [len, vocab]
    engine, _ = engines(None, (2, 4))  # after its greedy run: a used pool, TEXTS[2]'s pages in the prefix cache
    updates = [engine.submit(Request(f"lp{n}", ids, SamplingParams(max_tokens=n, logprobs=5, prompt_logprobs=True)))
               .collect() for n in (0, 1)]
    for got in (u[0].prompt_logprobs for u in updates):
        assert got[0] is None and single[0] is None and len(got) == len(single) == len(ids)
        assert [(e.token_id, [t for t, _ in e.top]) for e in got[1:]] == [
            (e.token_id, [t for t, _ in e.top]) for e in single[1:]]
        np.testing.assert_allclose([e.logprob for e in got[1:]], [e.logprob for e in single[1:]], atol=1e-5)
        np.testing.assert_allclose([[p for _, p in e.top] for e in got[1:]],
                                   [[p for _, p in e.top] for e in single[1:]], atol=1e-5)
        np.testing.assert_allclose([e.logprob for e in got[1:]], expected[np.arange(len(ids) - 1), ids[1:]],
                                   atol=1e-4)
    assert [u.finish_reason for u in updates[0]] == ["length"] and updates[0][0].token_ids == ()
    token = updates[1][0].logprobs[0]
    assert updates[1][0].token_ids == (token.token_id,) == (int(expected[-1].argmax()),)
    assert abs(token.logprob - expected[-1].max()) < 1e-4
    assert_split_and_nothing_leaked(engine)


def test_a_model_loaded_on_a_mesh_is_served_on_it(stdlib_llama, engines):
    mesh = zipjax.make_mesh(data=1, model=2, devices=jax.devices()[:2])
    model = zipjax.load(stdlib_llama.path, mesh=mesh)
    engine = Engine(model, EngineConfig(**SHAPES), log=lambda _: None)
    engine.start()
    try:
        engine.wait_ready(600)
        on_mesh = run(engine)
    finally:
        engine.stop()
    assert engine.model is model
    assert on_mesh == engines(None, None)[1]
    assert tuple(engine.pool.kv[0].sharding.spec) == (None, None, "model", None)  # 2 KV heads over 2 chips
    assert_split_and_nothing_leaked(engine)
    with pytest.raises(ZipjaxError, match="another mesh"):
        Engine(model, EngineConfig(**SHAPES), mesh=zipjax.make_mesh(data=2, model=4))


def test_the_mesh_option_parses_data_by_model():
    assert _mesh("2x4") == (2, 4)
    for bad in ("8", "2x", "0x8", "axb", "2x4x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="DATAxMODEL"):
            _mesh(bad)


def test_llama_3_70b_serving_step_splits_its_pools_sixteen_ways_on_v5e_4x4():
    """Two of LLaMA-3-70B's 80 layers at its per-layer shapes (benchmarks/serve_aot.py extrapolates the rest), a
    short geometry (16 decode rows, 2 prefill blocks, 2k-token tables): dense pages, then ZipCache packed pages beside
    the dense tail pool. The compiler's memory plan holds 1/16 of the pool per chip (donated: aliased, in the step
    and the pack step; TPU layouts pad a chip's small arrays, so a little more, far from the 1/8 that an array
    replicated over any factor of the mesh would give), and no collective moves a pool array: the largest ones move
    the logits and a block of pages being read."""
    from benchmarks.serve_aot import Shape, collective_sizes, compile_programs, pool_bytes
    from zipjax import aot
    from zipjax.config import PUBLISHED

    config = dataclasses.replace(PUBLISHED["llama-3-70b"], dtype="bfloat16", num_layers=2)
    target = aot.target("v5e:4x4")
    for shape in (Shape(max_num_seqs=16, prefill_blocks=2, max_model_len=2048),
                  Shape(max_num_seqs=16, prefill_blocks=2, page_size=64, max_model_len=2048, kv="zipcache")):
        programs, pool = compile_programs(config, target, 16, shape, 1024)
        assert programs[0][1].fits
        largest = max(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(pool))
        for compiled, report in programs:
            assert pool_bytes(pool) / 16 <= report.alias_bytes < 1.5 * pool_bytes(pool) / 16
            assert max(collective_sizes(compiled)) < largest / 2
