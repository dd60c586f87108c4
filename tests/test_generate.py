"""zipjax.generate: token-exact greedy decoding against transformers, stop tokens, sampling, streaming, compiles."""

import jax
import numpy as np
import pytest
import torch
from conftest import hf_greedy, random_ids
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import zipjax
from zipjax.sampling import filter_logits

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compile_counter():
    events = []

    def listener(name, duration, **kwargs):
        if name == BACKEND_COMPILE:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def two_prompts(seed: int = 0) -> list[list[int]]:
    ids = random_ids(2, 13, seed=seed)
    return [ids[0, :7].tolist(), ids[1].tolist()]


def test_greedy_matches_transformers_with_left_padding(tiny):
    model = tiny.load()
    prompts = two_prompts()
    ours = zipjax.generate(model, prompts, 24, stop_tokens=())
    ref = hf_greedy(tiny.hf, prompts, 24, pad_id=model.config.pad_id)
    assert ours.shape == ref.shape == (2, 13 + 24)
    np.testing.assert_array_equal(ours, ref)


def test_stop_tokens_pad_the_rest_like_transformers(tiny):
    model = tiny.load()
    prompts = two_prompts(seed=3)
    free = zipjax.generate(model, prompts, 24, stop_tokens=())
    stop = int(free[0, 13 + 5])  # a token the first sequence produces at step 5
    ours = zipjax.generate(model, prompts, 24, stop_tokens=[stop])
    ref = hf_greedy(tiny.hf, prompts, 24, pad_id=model.config.pad_id, eos_token_id=stop)
    padded = np.full_like(ours, model.config.pad_id)
    padded[:, : ref.shape[1]] = ref  # transformers stops early once every sequence is done
    np.testing.assert_array_equal(ours, padded)
    first = np.flatnonzero(ours[0, 13:] == stop)[0]
    assert (ours[0, 13 + first + 1:] == model.config.pad_id).all()


def test_default_stop_tokens_are_the_models_eos(tiny):
    model = tiny.load()
    assert model.config.eos_token_ids == (2,)
    prompt = two_prompts()[:1]
    np.testing.assert_array_equal(zipjax.generate(model, prompt, 8), zipjax.generate(model, prompt, 8, stop_tokens=2))


def test_second_call_with_same_shapes_does_not_recompile(tiny_models, compile_counter):
    model = tiny_models["llama_gqa"].load()
    prompts = [*two_prompts(), [9, 8, 7]]  # a batch of 3: no other test compiles this shape
    first = zipjax.generate(model, prompts, 20, stop_tokens=())
    assert compile_counter, "the first call should compile"
    compile_counter.clear()
    again = zipjax.generate(model, prompts, 20, stop_tokens=())
    # same bucket (16) and cache length (128): other prompt lengths, another max_new_tokens, other stop tokens
    other = zipjax.generate(model, [[5] * 16, [6], [7, 8]], 30, stop_tokens=[7, 9])
    assert compile_counter == [], f"{len(compile_counter)} recompilations"
    np.testing.assert_array_equal(first, again)
    assert other.shape == (3, 16 + 30)


def test_stream_yields_exactly_what_generate_returns(tiny_models):
    model = tiny_models["mistral_window"].load()
    prompts = two_prompts()
    for kwargs in (dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=4)):
        full = zipjax.generate(model, prompts, 16, stop_tokens=(), **kwargs)
        steps = np.stack(list(zipjax.generate_stream(model, prompts, 16, stop_tokens=(), **kwargs)), axis=1)
        np.testing.assert_array_equal(steps, full[:, 13:])


def test_stream_stops_when_every_sequence_is_done(tiny_models):
    model = tiny_models["llama_gqa"].load()
    prompt = two_prompts()[:1]
    free = zipjax.generate(model, prompt, 12, stop_tokens=())
    stop = int(free[0, -12 + 3])
    steps = list(zipjax.generate_stream(model, prompt, 12, stop_tokens=[stop]))
    assert [int(s[0]) for s in steps] == free[0, -12:-12 + 4].tolist()


def test_sampling(tiny_models):
    model = tiny_models["llama_gqa"].load()
    prompts = two_prompts()
    greedy = zipjax.generate(model, prompts, 16, stop_tokens=())
    np.testing.assert_array_equal(zipjax.generate(model, prompts, 16, temperature=1.5, top_k=1, stop_tokens=()),
                                  greedy)
    a = zipjax.generate(model, prompts, 16, temperature=1.0, seed=1, stop_tokens=())
    b = zipjax.generate(model, prompts, 16, temperature=1.0, seed=1, stop_tokens=())
    c = zipjax.generate(model, prompts, 16, temperature=1.0, seed=2, stop_tokens=())
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (40, 0.5), (None, 0.999)])
def test_filters_match_transformers_warpers(top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 300).astype(np.float32) * 3
    ours = np.asarray(filter_logits(logits, None if top_k is None else np.int32(top_k),
                                    None if top_p is None else np.float32(top_p)))
    ref = torch.tensor(logits)
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "holds no prompts"),
    ([[5, 300]], {}, "must lie in"),
    ([[5, -1]], {}, "must lie in"),
    ([list(range(3, 132))], {}, "longer than the model's maximum of 128"),
    ([[5, 6]], dict(max_new_tokens=127), "exceeds the model's maximum of 128"),
    ([[5, 6]], dict(max_new_tokens=10, cache_length=8), "does not fit a cache of 8 slots"),
    ([[5, 6]], dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    ([[5, 6]], dict(temperature=-1.0), "temperature must be >= 0"),
    ([[5, 6]], dict(temperature=1.0, top_p=1.5), "top_p must lie in"),
    ([[5, 6]], dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    ([[5, 6]], dict(stop_tokens=[999]), "stop tokens must lie in"),
    ("hello", {}, "must be token ids"),
    ([[1.5, 2.0]], {}, "non-integer"),
])
def test_bad_input_is_a_clear_error(tiny_models, prompts, kwargs, message):
    model = tiny_models["llama_gqa"].load()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(zipjax.ZipjaxError, match=message):
        zipjax.generate(model, prompts, **kwargs)


def test_explicit_cache_length_is_honoured(tiny_models):
    model = tiny_models["llama_gqa"].load()
    prompts = two_prompts()
    np.testing.assert_array_equal(zipjax.generate(model, prompts, 19, cache_length=13 + 19, stop_tokens=()),
                                  zipjax.generate(model, prompts, 19, stop_tokens=()))
