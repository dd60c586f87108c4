"""`zipjax serve`'s HTTP layer: request parsing and refusals, text and logprob formatting (units), then the openai
client against a real engine on checkpoints/stdlib-llama behind uvicorn on a loopback port (one server per module)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import openai
import pytest
import uvicorn
from pydantic import ValidationError

import zipjax
from zipjax.cli import main as zipjax_main
from zipjax.serve.api import Limits, create_app
from zipjax.serve.cli import bind
from zipjax.serve.engine import Engine, EngineConfig
from zipjax.serve.openai_schema import ApiError, ChatRequest, CompletionRequest, from_validation, refuse_unsupported
from zipjax.serve.output import ChoiceOutput, chat_logprobs, completion_logprobs, token_text
from zipjax.serve.requests import TokenLogprob, Update
from zipjax.tokenizer import Tokenizer

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "stdlib-llama"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(CHECKPOINT)


# ------------------------------------------------------------------------------------------------ units


def _parse(model, body: dict) -> ApiError | object:
    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        return from_validation(e.errors())
    try:
        refuse_unsupported(parsed)
    except ApiError as e:
        return e
    return parsed


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature", "finite"),
    ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": [1, "a"]}, "prompt", "list of token ids"),
    ({"prompt": "x", "stop": 3}, "stop", "list of strings"),
    ({"prompt": "x", "temprature": 0}, "temprature", "Unrecognized request argument"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x", "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats",
     "not supported"),
])
def test_a_bad_completion_body_is_a_400_naming_the_field(body, param, words):
    error = _parse(CompletionRequest, body)
    assert isinstance(error, ApiError) and error.status == 400, error
    assert error.param == param and words in error.message, error.body()
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_neutral_values_of_unimplemented_knobs_are_accepted():
    neutral = {"prompt": "x", "frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
               "logit_bias": {}, "best_of": 1, "suffix": None, "user": "me", "min_tokens": 0, "top_k": -1,
               "stream_options": {"include_usage": True}, "response_format": {"type": "text"}}
    assert isinstance(_parse(CompletionRequest, neutral), CompletionRequest)
    chat = {"messages": [{"role": "user", "content": "hi", "name": None}], "tools": [], "tool_choice": "none",
            "parallel_tool_calls": True, "echo": False}
    assert isinstance(_parse(ChatRequest, chat), ChatRequest)
    for bad, param in ((dict(tools=[{"type": "function"}]), "tools"), (dict(echo=True), "echo"),
                       (dict(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages.0.name"),
                       (dict(messages=[{"role": "user", "content": 7}]), "messages.0.content")):
        error = _parse(ChatRequest, {**chat, **bad})
        assert isinstance(error, ApiError) and error.status == 400 and error.param == param, (bad, error)


def test_stop_strings_cut_the_text_and_streaming_never_shows_their_start(tokenizer):
    ids = tokenizer.encode("def main():\n    return 42\n", add_special_tokens=False)
    full = tokenizer.decode(ids)
    for stop, include in (("return", False), ("return", True), ("):\n", False), ("absent", False)):
        cut = full.find(stop)
        expected = full if cut < 0 else full[:cut + len(stop) if include else cut]
        for streaming in (False, True):
            out = ChoiceOutput(tokenizer, [stop, "zzzz"], include_stop=include, streaming=streaming)
            pieces = []
            for token in ids:
                out.add(Update((token,)))
                if streaming:
                    pieces.append(out.take_text())
                    assert expected.startswith("".join(pieces)), (stop, pieces)
                if out.finished:
                    break
            if not out.finished:
                out.add(Update((), finish_reason="length"))
            pieces.append(out.take_text())
            assert out.text == expected and (not streaming or "".join(pieces) == expected), (stop, include)
            assert out.finish_reason == ("length" if cut < 0 else "stop")


def test_the_stop_token_is_counted_but_not_shown(tokenizer):
    ids = tokenizer.encode("import os", add_special_tokens=False)
    out = ChoiceOutput(tokenizer)
    out.add(Update(tuple(ids[:-1])))
    out.add(Update((ids[-1], EOS), finish_reason="stop"))
    assert out.text == "import os" and out.token_ids == [*ids, EOS] and out.finish_reason == "stop"
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]  # a stop_token_ids token that is plain text
    out = ChoiceOutput(tokenizer)
    out.add(Update((*ids, newline), finish_reason="stop"))
    assert out.text == "import os" and len(out.token_ids) == len(ids) + 1


def test_legacy_logprobs_match_openais_format(tokenizer):
    ids = tokenizer.encode("x = 1", add_special_tokens=True)
    entries = [None] + [TokenLogprob(t, -0.5 * i, ((t, -0.5 * i), (EOS, -7.0))) for i, t in enumerate(ids[1:])]
    entries[-1] = TokenLogprob(ids[-1], -math.inf, ((EOS, -1.0),))
    name = token_text(tokenizer, False)
    out = completion_logprobs(entries, ids, 1, name)
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert out["tokens"] == [name(t) for t in ids] and out["tokens"][0] == "<s>"
    assert out["text_offset"] == [sum(len(name(t)) for t in ids[:i]) for i in range(len(ids))]
    assert out["token_logprobs"][-1] == -9999.0  # JSON has no -inf
    assert out["top_logprobs"][1] == {name(ids[1]): 0.0}  # the chosen token is also the most likely
    assert out["top_logprobs"][-1] == {name(ids[-1]): -9999.0, "</s>": -1.0}
    as_ids = completion_logprobs(entries, ids, 0, token_text(tokenizer, True), offset=5)
    assert as_ids["tokens"][1] == f"token_id:{ids[1]}" and as_ids["text_offset"][0] == 5
    assert all(len(top) == 1 for top in as_ids["top_logprobs"][1:])
    chat = chat_logprobs(entries[1:], 2, name)["content"]
    assert chat[0]["token"] == name(ids[1]) and chat[0]["bytes"] == list(name(ids[1]).encode())
    assert [t["token"] for t in chat[0]["top_logprobs"]] == [name(ids[1]), "</s>"]


# ------------------------------------------------------------------------------------------------ end to end

MAX_SEQS, BUDGET, PAGES, WAITING = 4, 32, 96, 24
LIMITS = dict(max_body_bytes=64 << 10, max_prompt_tokens=300)
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["import os\n", "def parse(text):\n", "class Queue:\n    def", "for i in range(", "# the main loop\n",
           "x = [", "with open(path) as f:\n", "return self."]


@dataclasses.dataclass
class Served:
    url: str
    chat_url: str  # the same engine behind a tokenizer with a chat template
    engine: object
    model: object
    client: openai.OpenAI

    def post(self, path: str, body, *, url: str | None = None, **kwargs) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post((url or self.url) + path, content=content, timeout=120,
                          headers={"content-type": "application/json"}, **kwargs)


def _start_uvicorn(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def served(stdlib_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    shutil.copy(CHECKPOINT / "tokenizer.json", folder)
    config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    engine = Engine(stdlib_llama, EngineConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, num_pages=PAGES,
                                               max_waiting=WAITING), log=lambda text: None)
    engine.start()
    app = create_app(engine, served_name="stdlib-llama", limits=Limits(**LIMITS))
    chat_app = create_app(engine, served_name="stdlib-llama", tokenizer=Tokenizer(folder), limits=Limits(**LIMITS))
    servers = [_start_uvicorn(app), _start_uvicorn(chat_app)]
    try:
        health = httpx.get(servers[0][2] + "/health", timeout=10)
        assert health.status_code in (200, 503)
        engine.wait_ready(900)
        client = openai.OpenAI(base_url=servers[0][2] + "/v1", api_key="none", timeout=300, max_retries=0)
        yield Served(servers[0][2], servers[1][2], engine, stdlib_llama, client)
    finally:
        for server, thread, _ in servers:
            server.should_exit = True
            thread.join(30)
        engine.stop()


def _idle(engine, timeout: float = 60) -> dict:
    """The engine's metrics once no request runs or waits (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine.metrics()
        if metrics["running"] == 0 and metrics["waiting"] == 0:
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.02)


def _no_pages_leaked(engine) -> None:
    metrics = _idle(engine)
    assert metrics["pages_used"] == 0, metrics


def _reference(model, prompt: str, max_tokens: int) -> list[int]:
    """zipjax.generate's greedy tokens for the prompt, through the first end token (which usage counts)."""
    ids = model.tokenizer.encode(prompt)
    new = np.asarray(zipjax.generate(model, [ids], max_tokens)[0, len(ids):]).tolist()
    end = next((i for i, t in enumerate(new) if t in model.config.eos_token_ids), None)
    return new if end is None else new[:end + 1]


def _ids(logprobs) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in logprobs.tokens]


def test_greedy_text_equals_generate_streamed_and_not(served):
    for prompt in PROMPTS[:3]:
        expected = _reference(served.model, prompt, 24)
        text = served.model.tokenizer.decode([t for t in expected if t not in served.model.config.eos_token_ids])
        out = served.client.completions.create(model="stdlib-llama", prompt=prompt, max_tokens=24, temperature=0,
                                               logprobs=0, extra_body={"return_tokens_as_token_ids": True})
        choice = out.choices[0]
        assert _ids(choice.logprobs) == expected and choice.text == text
        assert choice.finish_reason == ("stop" if len(expected) < 24 else "length")
        prompt_len = len(served.model.tokenizer.encode(prompt))
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, len(expected))
        chunks = list(served.client.completions.create(prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                                       model="stdlib-llama", stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    _no_pages_leaked(served.engine)


def test_vllm_bench_serve_payload_streams_with_usage(served):
    """The body `vllm bench serve` sends (openai-completions backend), read as it reads it."""
    body = {"model": "stdlib-llama", "prompt": PROMPTS[3], "repetition_penalty": 1.0, "max_tokens": 16,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.Client(timeout=120) as client, client.stream("POST", served.url + "/v1/completions",
                                                            json=body) as response:
        events = list(_stream_lines(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 8  # tokens arrive as they come


def _complete(client, prompt: str, seed: int | None, stream: bool) -> str:
    settings = dict(temperature=0.9, top_p=0.95, seed=seed, extra_body={"top_k": 50}) if seed is not None else \
        dict(temperature=0)
    out = client.completions.create(model="stdlib-llama", prompt=prompt, max_tokens=20, stream=stream, **settings)
    return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text


def test_16_concurrent_streams_each_equal_their_single_request_output(served):
    jobs = [(PROMPTS[i % len(PROMPTS)], None if i % 2 == 0 else 100 + i) for i in range(16)]
    alone = [_complete(served.client, prompt, seed, stream=False) for prompt, seed in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: _complete(served.client, *job, stream=True), jobs))
    assert together == alone
    assert alone[1] != alone[3] or jobs[1][0] != jobs[3][0]
    _no_pages_leaked(served.engine)


def test_n_choices_are_seeded_seed_plus_j(served):
    out = served.client.completions.create(model="stdlib-llama", prompt=["x = ", "def "], n=3, seed=7, max_tokens=8,
                                           temperature=1.0)
    assert [c.index for c in out.choices] == list(range(6))
    for c in out.choices:
        prompt = ["x = ", "def "][c.index // 3]
        single = served.client.completions.create(model="stdlib-llama", prompt=prompt, seed=7 + c.index % 3,
                                                  max_tokens=8, temperature=1.0)
        assert c.text == single.choices[0].text
    assert out.usage.prompt_tokens == sum(len(served.model.tokenizer.encode(p)) for p in ["x = ", "def "])


def test_echo_logprobs_score_prompts_as_lm_eval_reads_them(served):
    """lm-eval's local-completions loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1."""
    tokenizer = served.model.tokenizer
    prompts = [tokenizer.encode("import numpy as np\n"), tokenizer.encode("def f(x):\n    return x")]
    body = {"model": "stdlib-llama", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    response = served.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    scored = served.post("/v1/completions", {**body, "max_tokens": 0}).json()["choices"]
    for ids, choice, score in zip(prompts, choices, scored, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
        reference = jax.nn.log_softmax(served.model.logits(np.asarray([ids]))[0], axis=-1)
        expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
        np.testing.assert_allclose(logprobs["token_logprobs"][1:-1], expected, atol=2e-4)
        for top, value in zip(logprobs["top_logprobs"][1:-1], logprobs["token_logprobs"][1:-1], strict=True):
            assert isinstance(top, dict) and 1 <= len(top) <= 2 and max(top.values()) >= value - 1e-6
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
        assert choice["text"].startswith(tokenizer.decode(ids))
        assert score["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:-1]
        assert score["finish_reason"] == "length" and score["text"] == tokenizer.decode(ids)
    assert response.json()["usage"]["completion_tokens"] == 2


def test_stop_strings_end_the_choice_and_free_its_pages(served):
    full = _complete(served.client, PROMPTS[1], None, stream=False)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    for stream in (False, True):
        out = served.client.completions.create(model="stdlib-llama", prompt=PROMPTS[1], max_tokens=20,
                                               temperature=0, stop=[stop], stream=stream)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[:full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"
    _no_pages_leaked(served.engine)


def _error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert all(word in error["message"] for word in words), error
    return error


def test_every_class_of_bad_request_gets_its_status_and_openais_error_body(served):
    ok = {"model": "stdlib-llama", "prompt": "x", "max_tokens": 2}
    _error(served.post("/v1/completions", b'{"prompt": "x",'), 400, "not valid JSON")
    _error(served.post("/v1/completions", b"[1, 2]"), 400, "JSON object")
    assert _error(served.post("/v1/completions", {**ok, "max_tokens": "2"}), 400)["param"] == "max_tokens"
    assert _error(served.post("/v1/completions", {**ok, "model": "gpt-4"}), 404, "gpt-4")["param"] == "model"
    _error(served.post("/v1/completions", {**ok, "max_tokens": 511}), 400, "maximum context length is 512")
    _error(served.post("/v1/completions", {**ok, "prompt": [5000]}), 400, "outside the vocabulary")
    _error(served.post("/v1/completions", {**ok, "prompt": []}), 400, "empty")
    _error(served.post("/v1/completions", {**ok, "presence_penalty": 1.5}), 400, "presence_penalty")
    _error(served.post("/v1/completions", {**ok, "seed": -1}), 400, "seed")
    _error(served.post("/v1/completions", {**ok, "temperature": 1e-9}), 400, "temperature")
    _error(served.post("/v1/completions", {**ok, "stop": [""]}), 400, "stop")
    _error(served.post("/v1/completions", {**ok, "prompt": "y" * (70 << 10)}), 413, "larger than")
    _error(served.post("/v1/completions", {**ok, "prompt": [5] * 301}), 413, "limit of 300")
    _error(served.post("/v1/completions", {**ok, "n": 300}), 413, "choices")
    _error(served.post("/v1/nothing", ok), 404)
    _error(httpx.get(served.url + "/v1/completions", timeout=10), 405)
    no_template = _error(served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400,
                         "stdlib-llama", "chat template")
    assert no_template["param"] == "messages"
    full = _error(served.post("/v1/completions", {**ok, "n": WAITING + MAX_SEQS + 4, "max_tokens": 1}), 503,
                  "capacity")
    assert full["type"] == "service_unavailable"
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="stdlib-llama", prompt="x", max_tokens=2, extra_body={"top_k": -5})
    assert served.post("/v1/completions", ok).status_code == 200  # the server outlives all of it
    _no_pages_leaked(served.engine)
    assert 'zipjax_http_errors_total{status="413"} 3' in httpx.get(served.url + "/metrics", timeout=10).text


def test_models_tokenizer_endpoints_and_metrics(served):
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200
    models = served.client.models.list().data
    assert [m.id for m in models] == ["stdlib-llama"] and models[0].max_model_len == 512
    tokenizer = served.model.tokenizer
    tokens = served.post("/tokenize", {"prompt": "import os", "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode("import os") and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 512 and tokens["token_strs"][0] == "<s>"
    assert served.post("/tokenize", {"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [EOS]
    assert served.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "import os"}
    _error(served.post("/detokenize", {"tokens": [-1]}), 400, "vocabulary")
    info = httpx.get(served.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["chat_template"] is None
    served.client.completions.create(model="stdlib-llama", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(served.url + "/metrics", timeout=10).text
    for name in ("zipjax_num_requests_running", "zipjax_kv_pages_used", "zipjax_kv_pages_total",
                 "zipjax_prefix_cache_hit_tokens_total", "zipjax_preemptions_total",
                 'zipjax_time_to_first_token_seconds_bucket{le="+Inf"}', "zipjax_inter_token_latency_seconds_count"):
        assert name in text, name
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(samples["zipjax_kv_pages_total"]) == served.engine.metrics()["pages_total"] >= PAGES - 1
    assert float(samples["zipjax_kv_pages_used"]) == 0
    assert float(samples["zipjax_time_to_first_token_seconds_count"]) >= 1


def test_chat_uses_the_template_and_streams_deltas_with_the_role_first(served):
    tokenizer = served.model.tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    chat = openai.OpenAI(base_url=served.chat_url + "/v1", api_key="none", timeout=300, max_retries=0)
    ids = chat.post("/../tokenize", cast_to=object, body={"messages": messages})["tokens"]
    assert tokenizer.decode(ids).startswith("system: be brief\nuser: def add(a, b):\nassistant:")
    plain = served.client.completions.create(model="stdlib-llama", prompt=ids, max_tokens=12, temperature=0)
    out = chat.chat.completions.create(model="stdlib-llama", messages=messages, max_completion_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == plain.choices[0].text
    assert len(choice.logprobs.content) == out.usage.completion_tokens and out.usage.prompt_tokens == len(ids)
    assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    chunks = list(chat.chat.completions.create(model="stdlib-llama", messages=messages, max_tokens=12,
                                               temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    bad = httpx.post(served.chat_url + "/v1/chat/completions", timeout=30,
                     json={"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    _error(bad, 400, "user")


def _stream_lines(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def test_a_client_that_disconnects_mid_stream_frees_its_pages(served):
    body = {"model": "stdlib-llama", "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=120) as client, client.stream("POST", served.url + "/v1/completions",
                                                            json=body) as response:
        lines = _stream_lines(response)
        for _ in range(3):
            assert json.loads(next(lines))["choices"][0]["finish_reason"] is None
        assert served.engine.metrics()["pages_used"] > 0
    _no_pages_leaked(served.engine)  # within steps, not after 400 tokens
    assert served.engine.metrics()["generated_tokens"] > 0


def test_an_error_during_a_stream_is_its_last_event(served):
    """Two requests with the same request_id (vLLM's extension): the engine refuses the second's stream, and the
    first runs on undisturbed."""
    body = {"model": "stdlib-llama", "prompt": PROMPTS[0], "max_tokens": 450, "temperature": 0, "ignore_eos": True,
            "request_id": "same"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(served.post, "/v1/completions", body)
        deadline = time.monotonic() + 60
        while served.engine.metrics()["running"] == 0:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.005)
        with httpx.Client(timeout=120) as client, client.stream("POST", served.url + "/v1/completions",
                                                                json={**body, "stream": True}) as second:
            events = list(_stream_lines(second))
        assert first.result().json()["usage"]["completion_tokens"] == 450
    assert events[-1] == "[DONE]" and "already in flight" in json.loads(events[-2])["error"]["message"], events[-3:]
    _no_pages_leaked(served.engine)


def test_serve_refuses_a_port_in_use_before_loading(served):
    port = int(served.url.rsplit(":", 1)[1])
    assert zipjax_main(["serve", str(CHECKPOINT), "--port", str(port)]) == 2
    assert zipjax_main(["serve", str(CHECKPOINT), "--kv-memory", "1GiB", "--kv-pages", "9"]) == 2


def _serve_process() -> tuple[subprocess.Popen, str]:
    """`zipjax serve` in a child on a free loopback port (small buckets: it compiles them, or reads them from the
    compilation cache this process filled); its URL once /health answers 200."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    child = subprocess.Popen([sys.executable, "-m", "zipjax.cli", "serve", str(CHECKPOINT), "--port", "0",
                              "--max-num-seqs", str(MAX_SEQS), "--max-num-batched-tokens", str(BUDGET),
                              "--kv-pages", str(PAGES)], stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in child.stderr:
        seen.append(line)
        if line.startswith("[serving stdlib-llama at http://"):
            url = line.split(" at ")[1].split("/v1")[0]
            break
    else:
        raise AssertionError(f"zipjax serve exited with {child.wait(10)}: {''.join(seen)[-2000:]}")
    deadline = time.monotonic() + 600
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.2)
    return child, url


def test_the_serve_command_serves_and_stops_cleanly_on_sigint_and_sigterm(served):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)):
        child, url = _serve_process()
        try:
            assert url.startswith("http://127.0.0.1:")
            body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == \
                served.post("/v1/completions", body).json()["choices"][0]["text"]
            with httpx.Client(timeout=120) as client, client.stream(
                    "POST", url + "/v1/completions", json={**body, "max_tokens": 400, "stream": True}) as response:
                lines = _stream_lines(response)
                next(lines)
                child.send_signal(sig)  # mid-stream: the stream ends ("abort"), the server exits
                events = list(lines)
            assert child.wait(60) == code
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
            assert "Traceback" not in child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture(scope="module")
def served_experts(stdlib_llama):
    """A second engine: stdlib-llama with an ME-Switch bank of two experts (perturbed copies, 2-bit deltas)."""
    from zipjax import experts

    rng = np.random.RandomState(0)
    variants = {name: jax.tree.map(lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32),
                                   stdlib_llama.params) for name in ("docs", "tests")}
    model = experts.attach(stdlib_llama, experts.compress(stdlib_llama, variants, bits=2), check=False)
    engine = Engine(model, EngineConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, num_pages=PAGES),
                    log=lambda text: None)
    engine.start()
    server, thread, url = _start_uvicorn(create_app(engine, served_name="stdlib-llama"))
    try:
        engine.wait_ready(900)
        yield url, model
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()


def test_experts_are_model_ids_and_each_request_runs_on_its_own(served_experts):
    url, model = served_experts
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    models = client.models.list().data
    assert [(m.id, m.parent) for m in models] == [("stdlib-llama", None), ("docs", "stdlib-llama"),
                                                  ("tests", "stdlib-llama")]
    ids = model.tokenizer.encode(PROMPTS[1])

    def run(name: str) -> list[int]:
        out = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0, logprobs=0,
                                        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        return _ids(out.choices[0].logprobs)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one step mixes the three
        outputs = dict(zip(("stdlib-llama", "docs", "tests"), pool.map(run, ("stdlib-llama", "docs", "tests")),
                           strict=True))
    for name, tokens in outputs.items():
        expert = None if name == "stdlib-llama" else name
        expected = np.asarray(zipjax.generate(model, [ids], 12, expert=expert, stop_tokens=())[0, len(ids):])
        assert tokens == expected.tolist(), name
    assert outputs["docs"] != outputs["stdlib-llama"] or outputs["tests"] != outputs["stdlib-llama"]
    missing = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    _error(missing, 404, "nope")


_ANY_NUMBER = st.one_of(st.none(), st.booleans(), st.integers(-3, 6), st.floats(-2, 3), st.text(max_size=3))
_BODIES = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["stdlib-llama", "other", ""]),
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=3),
                        st.lists(st.integers(-3, 5000), max_size=20),
                        st.lists(st.lists(st.integers(0, 4095), max_size=8), max_size=3), st.integers(), st.none()),
    "max_tokens": _ANY_NUMBER, "temperature": _ANY_NUMBER, "top_p": _ANY_NUMBER, "top_k": _ANY_NUMBER,
    "n": st.one_of(st.integers(-1, 3), st.text(max_size=2)), "seed": st.one_of(st.integers(-2, 1 << 40), st.none()),
    "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "echo": st.one_of(st.booleans(), st.integers(0, 1)), "logprobs": st.one_of(st.none(), st.integers(-1, 25)),
    "stream": st.booleans(), "frequency_penalty": _ANY_NUMBER, "stop_token_ids": st.lists(st.integers(-1, 5000),
                                                                                           max_size=2),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "bogus": st.integers(),
})


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                     derandomize=True)
@hypothesis.given(body=_BODIES)
def test_fuzzed_completion_bodies_get_an_answer_or_openais_error_body_never_a_crash(served, body):
    """A bounded property-based fuzz of /v1/completions: every body gets a success or OpenAI's error body with a
    status of its class, and the server stays up."""
    with httpx.Client(timeout=120) as client, client.stream("POST", served.url + "/v1/completions",
                                                            json=body) as response:
        content = response.read().decode()
    assert response.status_code in (200, 400, 404, 413, 503), (body, response.status_code, content[:500])
    if response.status_code != 200:
        assert set(json.loads(content)["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream"):
        assert content.rstrip().endswith("data: [DONE]") and '"error"' not in content, content[-500:]
    else:
        assert json.loads(content)["usage"]["total_tokens"] >= 1


def test_the_server_outlived_the_fuzz_and_leaked_no_page(served):
    _no_pages_leaked(served.engine)
    assert served.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_streamed_choices_and_prefix_cache_hits_are_reported(served):
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
    body = dict(model="stdlib-llama", prompt=prompt, max_tokens=10, temperature=1.0, seed=3, n=2)
    whole = served.client.completions.create(**body)
    again = served.client.completions.create(**body)
    assert [c.text for c in again.choices] == [c.text for c in whole.choices]
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # at least one full page came from the cache
    chunks = list(served.client.completions.create(**body, stream=True))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
    _no_pages_leaked(served.engine)
