"""The serving engine (zipjax.serve.engine) on the shipped stdlib-llama checkpoint: what it generates equals
`zipjax.generate` token for token whatever the batch, chunking, preemption or prefix cache, seeded sampling does not
depend on batch mates, cancellations free their pages, and bad requests are refused by name.

Every engine here has the same step shapes (4 decode rows; up to 2 prefill blocks of 16; a 128-page pool), so
after the first one compiles them the others start from jax's in-process cache."""

from __future__ import annotations

import numpy as np
import pytest

import zipjax
from zipjax.errors import ZipjaxError
from zipjax.serve.engine import Engine, EngineConfig, EngineFull
from zipjax.serve.requests import Request, SamplingParams

SHAPES = dict(max_num_seqs=4, max_num_batched_tokens=32, page_size=8, block_size=16, num_pages=128)
TEXTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
         "    return self._cache[key]\n", "# Copyright (c) Python Software Foundation\n"]


def start(model, **overrides) -> Engine:
    engine = Engine(model, EngineConfig(**{**SHAPES, **overrides}), log=lambda _: None)
    engine.start()
    engine.wait_ready(600)
    return engine


@pytest.fixture(scope="module")
def engine(stdlib_llama):
    engine = start(stdlib_llama)
    yield engine
    engine.stop()


def prompt(model, text: str) -> tuple[int, ...]:
    return tuple(model.tokenizer.encode(text))


def reference(model, ids: tuple[int, ...], n: int) -> list[int]:
    return zipjax.generate(model, [list(ids)], n)[0, len(ids):len(ids) + n].tolist()


def tokens_of(stream) -> list[int]:
    return [t for update in stream for t in update.token_ids]


def greedy(ids, n: int, request_id: str, **params) -> Request:
    return Request(request_id, ids, SamplingParams(max_tokens=n, ignore_eos=True, **params))


def assert_no_page_held(engine: Engine) -> None:
    counts = engine.metrics()
    assert counts["pages_used"] == 0
    assert counts["pages_free"] + counts["pages_cached"] == counts["pages_total"]


def test_greedy_outputs_equal_generate_with_more_requests_than_slots(engine, stdlib_llama):
    prompts = [prompt(stdlib_llama, t) for t in TEXTS]  # 6 requests, 4 run at once
    streams = [engine.submit(greedy(ids, 20, f"r{i}")) for i, ids in enumerate(prompts)]
    outputs = [tokens_of(s) for s in streams]
    for ids, out in zip(prompts, outputs, strict=True):
        assert out == reference(stdlib_llama, ids, 20)
    assert_no_page_held(engine)


def test_a_long_prompt_goes_in_chunks_and_equals_the_unchunked_output(engine, stdlib_llama):
    ids = prompt(stdlib_llama, "".join(TEXTS) * 5)
    assert len(ids) > 3 * SHAPES["max_num_batched_tokens"]
    steps = engine.metrics()["steps"]
    assert tokens_of(engine.submit(greedy(ids, 12, "long"))) == reference(stdlib_llama, ids, 12)
    assert engine.metrics()["steps"] - steps >= len(ids) // SHAPES["max_num_batched_tokens"] + 11


def test_a_small_pool_preempts_and_outputs_do_not_change(engine, stdlib_llama):
    # 4 sequences of ~300 tokens need ~160 pages of 8; the pool has 127
    prompts = [prompt(stdlib_llama, t) for t in TEXTS[:4]]
    before = engine.metrics()["preemptions"]
    streams = [engine.submit(greedy(ids, 300, f"p{i}")) for i, ids in enumerate(prompts)]
    outputs = [tokens_of(s) for s in streams]
    assert engine.metrics()["preemptions"] > before
    for ids, out in zip(prompts, outputs, strict=True):
        assert out == reference(stdlib_llama, ids, 300)
    assert_no_page_held(engine)


def test_prefix_cache_hits_and_outputs_equal_a_run_without_it(stdlib_llama):
    shared = prompt(stdlib_llama, "".join(TEXTS))
    engines = {cached: start(stdlib_llama, prefix_cache=cached) for cached in (True, False)}
    try:
        outputs = {}
        for cached, engine in engines.items():
            first = tokens_of(engine.submit(greedy(shared, 8, "a")))
            stream = engine.submit(greedy(shared + prompt(stdlib_llama, "x = 1\n")[1:], 8, "b"))
            updates = stream.collect()
            outputs[cached] = (first, [t for u in updates for t in u.token_ids], updates[0].num_cached_tokens)
        assert outputs[True][:2] == outputs[False][:2]
        assert outputs[True][2] >= (len(shared) // 8 - 1) * 8 and outputs[False][2] == 0
        assert engines[True].metrics()["prefix_hit_tokens"] > 0
    finally:
        for engine in engines.values():
            engine.stop()


def test_seeded_sampling_is_the_same_alone_and_under_load(engine, stdlib_llama):
    ids = prompt(stdlib_llama, TEXTS[0])
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    alone = tokens_of(engine.submit(greedy(ids, 24, "alone", **settings)))
    others = [engine.submit(greedy(prompt(stdlib_llama, t), 30, f"o{i}", temperature=1.0, seed=i))
              for i, t in enumerate(TEXTS[1:4])]
    loaded = tokens_of(engine.submit(greedy(ids, 24, "loaded", **settings)))
    for stream in others:
        tokens_of(stream)
    assert loaded == alone
    assert alone != reference(stdlib_llama, ids, 24)  # it did sample
    other_seed = tokens_of(engine.submit(greedy(ids, 24, "other", **{**settings, "seed": 99})))
    assert other_seed != alone


def test_a_stop_token_ends_the_request_and_is_reported(engine, stdlib_llama):
    ids = prompt(stdlib_llama, TEXTS[1])
    expected = reference(stdlib_llama, ids, 20)
    stop = expected[5]
    updates = engine.submit(Request("s", ids, SamplingParams(max_tokens=20, stop_token_ids=(stop,)))).collect()
    got = [t for u in updates for t in u.token_ids]
    assert got == expected[:expected.index(stop) + 1]
    assert updates[-1].finish_reason == "stop"
    assert engine.submit(greedy(ids, 3, "len")).collect()[-1].finish_reason == "length"


def test_cancelling_frees_the_pages(engine, stdlib_llama):
    streams = [engine.submit(greedy(prompt(stdlib_llama, t), 400, f"c{i}")) for i, t in enumerate(TEXTS[:4])]
    for stream in streams:
        next(iter(stream))
        stream.cancel()
    reasons = [stream.collect()[-1].finish_reason for stream in streams]
    assert reasons == ["abort"] * 4
    assert_no_page_held(engine)
    assert engine.metrics()["running"] == 0


def test_prompt_and_token_logprobs_equal_the_model(engine, stdlib_llama):
    ids = prompt(stdlib_llama, TEXTS[2])
    updates = engine.submit(Request("lp", ids, SamplingParams(max_tokens=3, logprobs=5, prompt_logprobs=True,
                                                             ignore_eos=True))).collect()
    expected = np.asarray(jax_log_softmax(stdlib_llama.logits(np.asarray([ids]))[0]))  # [len, vocab]
    first = updates[0].prompt_logprobs
    assert first[0] is None and len(first) == len(ids)
    for i in range(1, len(ids)):
        assert first[i].token_id == ids[i]
        assert abs(first[i].logprob - expected[i - 1, ids[i]]) < 1e-4
        top_ids = [t for t, _ in first[i].top]
        assert top_ids == np.argsort(-expected[i - 1])[:5].tolist()
    token = updates[0].logprobs[0]
    assert token.token_id == updates[0].token_ids[0] == token.top[0][0]
    assert abs(token.logprob - expected[-1].max()) < 1e-4


def mixed_load(engine: Engine, model) -> list[tuple[list[int], list, str]]:
    """Greedy, seeded-sampling, logprob and stop-token requests at once (more than the engine's 4 slots, a small
    token budget so prompts are chunked), one of them cancelled after its first update: each one's tokens, logprob
    entries and finish reason."""
    ids = [prompt(model, t) for t in TEXTS]
    stop = reference(model, ids[1], 12)[4]  # ends request 1 while its next token is already being computed
    requests = [greedy(ids[0], 30, "g"),
                Request("stop", ids[1], SamplingParams(max_tokens=30, stop_token_ids=(stop,))),
                greedy(ids[2], 25, "sample", temperature=0.9, top_k=40, top_p=0.95, seed=7),
                greedy(ids[3], 20, "lp", logprobs=3),
                greedy(ids[4] * 6, 18, "long"),
                greedy(ids[5], 40, "cancel")]
    streams = [engine.submit(r) for r in requests]
    next(iter(streams[-1]))
    streams[-1].cancel()
    out = []
    for stream in streams:
        updates = stream.collect()
        out.append(([t for u in updates for t in u.token_ids], [e for u in updates for e in u.logprobs or ()],
                    updates[-1].finish_reason))
    return out


def test_async_scheduling_overlaps_steps_and_changes_no_output(engine, stdlib_llama):
    before = engine.metrics()
    overlapped = mixed_load(engine, stdlib_llama)
    after = engine.metrics()
    assert after["overlapped_steps"] - before["overlapped_steps"] > (after["steps"] - before["steps"]) // 2
    assert after["dropped_tokens"] > before["dropped_tokens"]  # the stopped request's token in flight
    assert_no_page_held(engine)
    sync = start(stdlib_llama, async_scheduling=False)
    try:
        for (tokens, entries, reason), (want_tokens, want_entries, want_reason) in zip(
                mixed_load(sync, stdlib_llama)[:-1], overlapped[:-1], strict=True):  # the cancelled one: racy
            assert (tokens, reason) == (want_tokens, want_reason)
            assert [(e.token_id, [t for t, _ in e.top]) for e in entries] == [
                (e.token_id, [t for t, _ in e.top]) for e in want_entries]
            # batch mates differ step by step between the two: float32 sums in another order
            np.testing.assert_allclose([e.logprob for e in entries], [e.logprob for e in want_entries], atol=1e-4)
        assert sync.metrics()["overlapped_steps"] == sync.metrics()["dropped_tokens"] == 0
        assert_no_page_held(sync)
    finally:
        sync.stop()
    reasons = [reason for _, _, reason in overlapped]
    assert reasons == ["length", "stop", "length", "length", "length", "abort"]
    assert overlapped[0][0] == reference(stdlib_llama, prompt(stdlib_llama, TEXTS[0]), 30)
    assert len(overlapped[3][1]) == 20


def jax_log_softmax(logits):
    import jax

    return jax.nn.log_softmax(logits, axis=-1)


def test_bad_requests_are_refused_by_name(engine, stdlib_llama):
    ids = prompt(stdlib_llama, TEXTS[0])
    cases = {
        "the prompt is empty": Request("e", (), SamplingParams()),
        "must be integers in": Request("e", (1, 99999), SamplingParams()),
        "exceed the model's length": Request("e", ids, SamplingParams(max_tokens=600)),
        "no expert named": Request("e", ids, SamplingParams(), expert="nope"),
    }
    for message, request in cases.items():
        with pytest.raises(ZipjaxError, match=message):
            engine.submit(request)
    with pytest.raises(ZipjaxError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ZipjaxError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_a_full_queue_and_an_impossible_pool_are_refused(stdlib_llama):
    engine = Engine(stdlib_llama, EngineConfig(**{**SHAPES, "max_waiting": 2}), log=lambda _: None)  # not started
    ids = prompt(stdlib_llama, TEXTS[0])
    engine.submit(greedy(ids, 4, "q1"))
    engine.submit(greedy(ids, 4, "q2"))
    with pytest.raises(EngineFull, match="already waiting"):
        engine.submit(greedy(ids, 4, "q3"))
    with pytest.raises(ZipjaxError, match="cannot hold one sequence"):
        Engine(stdlib_llama, EngineConfig(**{**SHAPES, "num_pages": 16, "max_model_len": 512}))
    said = []
    capped = Engine(stdlib_llama, EngineConfig(**{**SHAPES, "num_pages": 16}), log=said.append)
    assert capped.max_model_len == 15 * 8 and "max_model_len 120" in said[0]
    with pytest.raises(ZipjaxError, match="not both"):
        EngineConfig(num_pages=10, kv_memory=10**6)
    with pytest.raises(ZipjaxError, match="max_model_len"):
        Engine(stdlib_llama, EngineConfig(**{**SHAPES, "max_model_len": 10**6}))
