"""The serving benchmark's client (zipjax.serve.loadgen, `zipjax bench-serve`): vLLM's metric arithmetic on
constructed timestamps against hand-computed values, the streamed-chunk accounting (TTFT, every inter-chunk gap,
output tokens from `usage`), the seeded Poisson arrival schedule, the random prompts, the command's errors; then runs
against `zipjax serve`'s app on checkpoints/stdlib-llama behind uvicorn on a loopback port, in this process."""

import dataclasses
import io
import json
import math
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from zipjax import cli
from zipjax.errors import ZipjaxError
from zipjax.serve import loadgen
from zipjax.serve.api import create_app
from zipjax.serve.cli import bind
from zipjax.serve.engine import Engine, EngineConfig
from zipjax.serve.loadgen import Prompt, RequestResult
from zipjax.tokenizer import load_tokenizer

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def _result(start, ttft, itl, output_tokens, prompt_len, success=True, output_len=None):
    return RequestResult(success=success, prompt_len=prompt_len, output_len=output_len or output_tokens,
                         output_tokens=output_tokens, usage_reported=True, start_time=start, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl))


# Four requests over a 1 s run. r2's 5 tokens came in 2 chunks (usage counts them); r3 failed; r4 has one token.
R1 = _result(0.0, 0.1, [0.05, 0.05, 0.1], 4, 10)  # E2E 0.3, TPOT (0.3 - 0.1) / 3
RESULTS = [
    R1,
    _result(0.2, 0.2, [0.3], 5, 20),  # E2E 0.5, TPOT (0.5 - 0.2) / 4 = 0.075
    RequestResult(success=False, prompt_len=99, output_len=8, error="HTTP 500"),
    _result(R1.start_time + R1.latency, 0.4, [], 1, 30),  # starts the instant r1 ends; E2E 0.4, no TPOT
]


def test_metrics_match_hand_computed_values():
    m = loadgen.compute_metrics(RESULTS, duration=1.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 10)
    assert m["request_throughput"] == pytest.approx(3.0)
    assert m["output_throughput"] == pytest.approx(10.0)
    assert m["total_token_throughput"] == pytest.approx(70.0)
    assert m["request_goodput"] is None
    # TTFT [100, 200, 400] ms: percentiles interpolate linearly between order statistics (numpy's, vLLM's)
    assert m["ttft_ms"] == pytest.approx({"mean": 700 / 3, "median": 200.0, "std": math.sqrt(140000 / 9),
                                          "p90": 360.0, "p99": 396.0})
    # TPOT excludes the first token and the one-token request: [66.67, 75] ms
    tpot1, tpot2 = 200 / 3, 75.0
    assert m["tpot_ms"] == pytest.approx({"mean": (tpot1 + tpot2) / 2, "median": (tpot1 + tpot2) / 2,
                                          "std": (tpot2 - tpot1) / 2, "p90": tpot1 + 0.9 * (tpot2 - tpot1),
                                          "p99": tpot1 + 0.99 * (tpot2 - tpot1)})
    # ITL: every gap of every request, [50, 50, 100, 300] ms
    assert m["itl_ms"]["mean"] == pytest.approx(125.0)
    assert m["itl_ms"]["median"] == pytest.approx(75.0)
    assert m["itl_ms"]["p90"] == pytest.approx(240.0)
    assert m["itl_ms"]["p99"] == pytest.approx(294.0)
    # E2E [300, 500, 400] ms
    assert m["e2el_ms"]["mean"] == pytest.approx(400.0)
    assert m["e2el_ms"]["p90"] == pytest.approx(480.0)
    # r1 ends at 0.3 as r4 starts: the intervals are half-open, so at most 2 overlap
    assert m["max_concurrent_requests"] == 2
    assert m["short_outputs"] == 0 and m["usage_missing"] == 0


def test_goodput_counts_requests_within_every_slo():
    # ttft <= 250 and tpot <= 70: r1 only (r2's TPOT is 75, r4's TTFT 400; r4's TPOT counts as 0)
    assert loadgen.compute_metrics(RESULTS, 2.0, {"ttft": 250, "tpot": 70})["request_goodput"] == pytest.approx(0.5)
    # e2el <= 450: r1 (300) and r4 (400)
    assert loadgen.compute_metrics(RESULTS, 1.0, {"e2el": 450})["request_goodput"] == pytest.approx(2.0)
    assert loadgen.compute_metrics(RESULTS, 1.0, {"tpot": 1000})["request_goodput"] == pytest.approx(3.0)
    with pytest.raises(ZipjaxError, match="unknown goodput SLO 'itl'"):
        loadgen.compute_metrics(RESULTS, 1.0, {"itl": 10})
    with pytest.raises(ZipjaxError, match="positive number of milliseconds"):
        loadgen.compute_metrics(RESULTS, 1.0, {"ttft": -1})


def test_metrics_of_a_run_without_successes_are_zero_not_nan():
    m = loadgen.compute_metrics([RESULTS[2]], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["output_throughput"] == 0.0
    assert m["ttft_ms"]["mean"] == 0.0 and m["itl_ms"]["p99"] == 0.0
    with pytest.raises(ZipjaxError, match="duration"):
        loadgen.compute_metrics(RESULTS, 0.0)


def test_short_outputs_are_reported():
    short = _result(0.0, 0.1, [0.1], 2, 5, output_len=8)
    m = loadgen.compute_metrics([short], 1.0)
    assert m["short_outputs"] == 1
    assert "1 requests ended before their output length" in loadgen.format_report(m)


class FakeClock:
    """perf_counter values handed out in order: the chunk arrival times of a constructed stream."""

    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def _stream(lines, clock_times, monkeypatch, start=0.5):
    monkeypatch.setattr(loadgen, "time", types.SimpleNamespace(perf_counter=FakeClock(clock_times)))
    result, last = RequestResult(prompt_len=3, output_len=5), start
    for line in lines:
        last, done = loadgen.read_event(line, result, start, last)
        if done:
            break
    result.latency = last - start
    return result


CHUNK = 'data: {"choices": [{"index": 0, "text": "%s"}]}'
FINISH = 'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}'
USAGE = 'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}'


def test_stream_timing_follows_vllm(monkeypatch):
    # sent at 0.5; chunks at 1.0, 1.2, 1.5 (two tokens in one chunk), a finish-only chunk at 1.6, then the usage
    lines = [CHUNK % "a", "", ": ping", CHUNK % "b", CHUNK % "cd", FINISH, USAGE, "data: [DONE]", CHUNK % "x"]
    r = _stream(lines, [1.0, 1.2, 1.5, 1.6, 1.7], monkeypatch)
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.2, 0.3, 0.1])  # every chunk with choices is a gap, as in vLLM
    assert r.latency == pytest.approx(1.1)  # to the last chunk with choices, not to the usage chunk
    assert (r.output_tokens, r.usage_reported, r.prompt_len) == (5, True, 7)  # from usage, not the 4 chunks


def test_stream_without_usage_counts_chunks(monkeypatch):
    r = _stream([CHUNK % "a", CHUNK % "b", FINISH, "data: [DONE]"], [1.0, 1.1, 1.2], monkeypatch)
    assert (r.output_tokens, r.usage_reported, r.prompt_len) == (3, False, 3)
    m = loadgen.compute_metrics([dataclasses.replace(r, success=True)], 1.0)
    assert m["usage_missing"] == 1 and "counted per chunk" in loadgen.format_report(m)


def test_a_mid_stream_error_fails_the_request(monkeypatch):
    with pytest.raises(ValueError, match="out of pages"):
        _stream([CHUNK % "a", 'data: {"error": {"message": "out of pages", "type": "server_error"}}'],
                [1.0, 1.1], monkeypatch)


def test_error_bodies_are_one_line():
    assert loadgen._error_text(400, b'{"error": {"message": "bad prompt", "type": "invalid_request_error"}}') == \
        "HTTP 400: bad prompt"
    assert loadgen._error_text(422, b'{"detail": "Unexpected fields"}') == "HTTP 422: Unexpected fields"
    assert loadgen._error_text(502, b"<html>gateway</html>") == "HTTP 502: <html>gateway</html>"


def test_request_body_asks_for_usage_and_exact_lengths():
    prompt = Prompt([5, 6, 7], 3, 9)
    body = loadgen.completion_body("m", prompt)
    assert body == {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    peer = loadgen.completion_body("m", prompt, ignore_eos=False, extra_body={"generation_config": "{}"})
    assert "ignore_eos" not in peer and peer["generation_config"] == "{}"


# -- arrivals ----------------------------------------------------------------------------------------------------

def test_poisson_schedule_is_seeded_and_ends_at_n_over_rate():
    a, b, c = (loadgen.arrival_times(50, 4.0, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.diff(a) >= 0) and a[0] > 0
    assert a[-1] == pytest.approx(50 / 4.0)


def test_poisson_gaps_are_exponential_and_burstiness_is_gamma():
    n, rate = 20000, 5.0
    gaps = np.diff(loadgen.arrival_times(n, rate, seed=0), prepend=0.0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=1e-9)  # the rescaling pins the total
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: coefficient of variation 1
    # P(gap > mean) = exp(-1) for an exponential
    assert np.mean(gaps > gaps.mean()) == pytest.approx(math.exp(-1), abs=0.015)
    even = np.diff(loadgen.arrival_times(n, rate, seed=0, burstiness=4.0), prepend=0.0)
    assert even.std() / even.mean() == pytest.approx(0.5, abs=0.02)  # gamma shape k: CV 1 / sqrt(k)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused():
    np.testing.assert_array_equal(loadgen.arrival_times(5, math.inf), np.zeros(5))
    for rate in (0, -1.0, math.nan):
        with pytest.raises(ZipjaxError, match="request rate"):
            loadgen.arrival_times(5, rate)
    with pytest.raises(ZipjaxError, match="burstiness"):
        loadgen.arrival_times(5, 1.0, burstiness=0)


# -- prompts -----------------------------------------------------------------------------------------------------

def test_token_prompts_are_vllm_random_sequences():
    allowed = loadgen.allowed_token_ids(100, special_ids=[0, 1, 2])
    assert allowed[0] == 3 and allowed.size == 97
    prompts = loadgen.token_prompts(6, 12, 4, allowed, seed=3)
    assert prompts == loadgen.token_prompts(6, 12, 4, allowed, seed=3)
    assert prompts != loadgen.token_prompts(6, 12, 4, allowed, seed=4)
    for p in prompts:
        assert (p.prompt_len, p.output_len, len(p.prompt)) == (12, 4, 12)
        assert set(p.prompt) <= set(allowed.tolist())
        positions = np.searchsorted(allowed, p.prompt)  # consecutive allowed ids, wrapping around
        assert np.all(np.diff(positions) % allowed.size == 1)
    with pytest.raises(ZipjaxError, match="input_len"):
        loadgen.token_prompts(2, 0, 4, allowed)


def test_text_prompts_encode_to_their_stated_length():
    tok = load_tokenizer(CHECKPOINTS / "stdlib-llama")
    prompts = loadgen.text_prompts(tok, 8, 24, 4, seed=0)
    assert all(isinstance(p.prompt, str) and p.prompt for p in prompts)
    assert [p.prompt_len for p in prompts] == [len(tok.encode(p.prompt, add_special_tokens=False)) for p in prompts]
    assert sum(p.prompt_len == 24 for p in prompts) >= 6  # re-fitting reaches the length nearly always


# -- the command -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["ftp://127.0.0.1:1"], "must start with http"),
    (["http://127.0.0.1:1", "--goodput", "itl:5"], "unknown goodput SLO"),
    (["http://127.0.0.1:1", "--goodput", "ttft"], "METRIC:MILLISECONDS"),
    (["http://127.0.0.1:1", "--prompt-kind", "text"], "needs --tokenizer"),
    (["http://127.0.0.1:1", "--request-rate", "0"], "must be positive"),
    (["http://127.0.0.1:1", "--seed", "-1"], "0 or more"),
    (["http://127.0.0.1:1"], "cannot reach the server at http://127.0.0.1:1"),
    (["http://127.0.0.1:1", "--tokenizer", str(CHECKPOINTS / "stdlib-llama")], "cannot reach the server"),
    (["http://127.0.0.1:1", "--out", "/nonexistent-folder/run.json"], "does not exist"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert cli.main(["bench-serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_server_urls_are_normalized_to_the_root():
    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1", " http://h:1/v1/ "):
        assert loadgen.base_url(url) in ("http://127.0.0.1:8000", "http://h:1")
    for bad in ("127.0.0.1:8000", "http://", "ws://h:1"):
        with pytest.raises(ZipjaxError, match="http://"):
            loadgen.base_url(bad)


def test_progress_writes_a_line_per_tenth_off_a_terminal():
    out = io.StringIO()
    progress = loadgen.Progress(20, "run", stream=out)
    for i in range(20):
        progress(_result(0.0, 0.1, [0.1], 2, 3, success=i != 4))
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("run: 20/20 requests done, 1 failed, 38 tokens in ")

# -- against a live server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_server(stdlib_llama):
    """`zipjax serve`'s app on checkpoints/stdlib-llama behind uvicorn on a loopback port, in this process."""
    engine = Engine(stdlib_llama, EngineConfig(max_num_seqs=2, max_num_batched_tokens=32, num_pages=64),
                    log=lambda text: None)
    engine.start()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, served_name="stdlib-llama"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        engine.wait_ready(900)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()

def test_a_run_against_zipjax_serve_measures_every_request(live_server):
    tok = load_tokenizer(CHECKPOINTS / "stdlib-llama")
    allowed = loadgen.allowed_token_ids(tok.vocab_size, tok.all_special_ids)
    prompts = loadgen.token_prompts(4, 6, 4, allowed, seed=1)
    run = loadgen.benchmark(live_server + "/v1", prompts, max_concurrency=2, progress=False, timeout=300)
    m = run["metrics"]
    assert run["model"] == "stdlib-llama" and run["url"] == live_server
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (4, 0, 24, 16)
    assert m["max_concurrent_requests"] == 2  # the cap held, and was reached
    assert m["short_outputs"] == 0 and m["usage_missing"] == 0  # ignore_eos and include_usage were honoured
    assert m["output_throughput"] == pytest.approx(16 / m["duration_s"])
    for r in run["requests"]:
        assert r["success"] and r["output_tokens"] == 4 and r["error"] == ""
        assert 0 < r["ttft_ms"] <= r["e2el_ms"]
        assert 1 <= len(r["itl_ms"]) + 1 <= 5  # one chunk per token at most, plus a finish-only chunk
        assert r["e2el_ms"] == pytest.approx(r["ttft_ms"] + sum(r["itl_ms"]), abs=0.01)

def test_bench_serve_command_against_zipjax_serve(live_server, tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["bench-serve", live_server, "--num-prompts", "4", "--input-len", "5", "--output-len", "3",
            "--request-rate", "20", "--prompt-kind", "text", "--tokenizer", str(CHECKPOINTS / "stdlib-llama"),
            "--goodput", "e2el:600000", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "Serving Benchmark Result" in printed.out and "Request goodput (req/s)" in printed.out
    saved = json.loads(out.read_text())
    assert saved["metrics"]["completed"] == 4 and saved["metrics"]["total_output_tokens"] == 12
    assert saved["request_rate"] == 20 and saved["prompt_kind"] == "text"
    assert saved["metrics"]["request_goodput"] == pytest.approx(4 / saved["metrics"]["duration_s"])
