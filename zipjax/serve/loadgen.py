"""A load generator for any OpenAI-compatible server (`zipjax bench-serve URL`, benchmarks/serve.py): streamed
`/v1/completions` requests sent as a Poisson process or at a fixed concurrency, and the serving metrics of vLLM's
`vllm bench serve` computed from what came back. Plain asyncio + httpx; no jax.

The metrics are vLLM's, defined as in vllm/benchmarks/serve.py (`calculate_metrics`) and its request function
(vllm/benchmarks/lib/endpoint_request_func.py), so numbers compare with `vllm bench serve` runs:
- TTFT: from sending the request to the first streamed chunk that carries `choices` (its text may be empty).
- ITL: every gap between consecutive such chunks; a chunk holding several tokens is one gap.
- E2E latency: from sending the request to the last such chunk (the usage chunk after it does not count).
- TPOT: (E2E - TTFT) / (output tokens - 1), over requests with more than one output token. Output tokens are the
  server's `usage.completion_tokens` (asked for with `stream_options.include_usage`), so chunks carrying several
  tokens count right; a server that sends no usage falls back to one token per chunk, and the run says so.
- Request throughput, output and total (input + output) token throughput: completed requests or tokens over the
  duration, which runs from the first send to the last request's end; goodput: requests meeting every given SLO
  (TTFT, TPOT, E2E in milliseconds; a one-token request has TPOT 0) over the same duration.
- Mean, median, standard deviation and percentiles (numpy's linear interpolation) in milliseconds.
Arrivals: with a finite request rate, exponential gaps from a seeded generator (gamma with `burstiness` != 1),
rescaled so the last request arrives at num_prompts / rate, as vLLM does; with rate inf all start at once. A
max concurrency caps requests in flight (a FIFO semaphore). Prompts: random token ids as vLLM's random dataset
draws them (per request a random offset into the vocabulary without special tokens, then consecutive ids), sent as
token-id lists or, for servers that take text only, decoded to text and re-fitted to the exact token length. Each
request asks for `ignore_eos` so it produces exactly its output length (a server that spells this differently gets
`extra_body` instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from zipjax.errors import ZipjaxError

SLO_METRICS = ("ttft", "tpot", "e2el")  # goodput's service-level objectives, in milliseconds
PERCENTILES = (90, 99)
MAX_ERROR_CHARS = 300
FIT_ROUNDS = 10  # decode / re-encode rounds that fit a text prompt to its token length


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request's prompt (token ids or text), its length in tokens, and the tokens it asks for."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclasses.dataclass
class RequestResult:
    """What the client saw of one request; times are seconds of `time.perf_counter()`."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0  # tokens asked for
    output_tokens: int = 0  # tokens received: usage.completion_tokens, else one per chunk
    usage_reported: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0  # E2E
    error: str = ""


# -- prompts -----------------------------------------------------------------------------------------------------

def allowed_token_ids(vocab_size: int, special_ids: Sequence[int] = ()) -> np.ndarray:
    """The ids prompts are drawn from: the vocabulary without its special tokens."""
    if vocab_size < 2:
        raise ZipjaxError(f"the vocabulary size must be at least 2, got {vocab_size}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ZipjaxError("every token of the vocabulary is a special token; no prompt can be drawn")
    return allowed


def token_prompts(num_prompts: int, input_len: int, output_len: int, allowed: np.ndarray,
                  seed: int = 0) -> list[Prompt]:
    """vLLM's random dataset as token ids: request i takes `input_len` consecutive allowed ids from a random offset
    (plus i), wrapping around."""
    _check_lengths(num_prompts, input_len, output_len)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, allowed.size, size=num_prompts)
    return [Prompt([int(t) for t in allowed[(offsets[i] + i + np.arange(input_len)) % allowed.size]], input_len,
                   output_len) for i in range(num_prompts)]


def text_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """The same prompts as text, for servers that take text only: each is decoded and re-fitted until it encodes
    (without special tokens) to `input_len` tokens again, as vLLM does; `prompt_len` is what it encodes to.
    `tokenizer`: a transformers tokenizer (`encode`, `decode`, `vocab_size`, `all_special_ids`)."""
    allowed = allowed_token_ids(tokenizer.vocab_size, tokenizer.all_special_ids)
    rng = np.random.default_rng(seed + 1)
    out = []
    for p in token_prompts(num_prompts, input_len, output_len, allowed, seed):
        ids = list(p.prompt)
        for _ in range(FIT_ROUNDS):
            text = tokenizer.decode(ids)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) == input_len:
                break
            ids = ids[:input_len] + [int(t) for t in rng.choice(allowed, max(input_len - len(ids), 0))]
        else:
            text = tokenizer.decode(ids)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        out.append(Prompt(text, len(ids), output_len))
    return out


def _check_lengths(num_prompts: int, input_len: int, output_len: int) -> None:
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ZipjaxError(f"{name} must be a positive integer, got {value!r}")


# -- arrivals ----------------------------------------------------------------------------------------------------

def arrival_times(num_prompts: int, request_rate: float, seed: int = 0, burstiness: float = 1.0) -> np.ndarray:
    """When each request is sent, in seconds after the start (non-decreasing). A finite rate gives gamma-distributed
    gaps (shape `burstiness`, mean 1 / rate; exponential, a Poisson process, at burstiness 1), rescaled so the last
    arrival is at num_prompts / rate exactly, as vLLM does to steady throughput across seeds; rate inf: all zero."""
    if not (isinstance(request_rate, (int, float)) and request_rate > 0) or math.isnan(request_rate):
        raise ZipjaxError(f"the request rate must be a positive number or inf, got {request_rate!r}")
    if not (isinstance(burstiness, (int, float)) and burstiness > 0 and math.isfinite(burstiness)):
        raise ZipjaxError(f"burstiness must be a positive finite number, got {burstiness!r}")
    if math.isinf(request_rate):
        return np.zeros(num_prompts)
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_prompts))
    return times * ((num_prompts / request_rate) / times[-1])


# -- one request -------------------------------------------------------------------------------------------------

def completion_body(model: str, prompt: Prompt, *, ignore_eos: bool = True, extra_body: dict | None = None) -> dict:
    """The streamed /v1/completions body of one request (greedy: the load does not depend on sampling)."""
    body = {"model": model, "prompt": prompt.prompt, "max_tokens": prompt.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **(extra_body or {})}


def _error_text(status: int, body: bytes) -> str:
    """A failed response's message: OpenAI's error body, FastAPI's `detail`, or the raw text, shortened."""
    try:
        data = json.loads(body)
        detail = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
        message = detail.get("message", detail) if isinstance(detail, dict) else detail
    except (ValueError, UnicodeDecodeError):
        message = body.decode("utf-8", errors="replace")
    return f"HTTP {status}: {str(message).strip()[:MAX_ERROR_CHARS]}"


def read_event(line: str, result: RequestResult, start: float, last: float) -> tuple[float, bool]:
    """Applies one server-sent-events line to `result`; returns (time of the last token chunk, stream over)."""
    if not line.startswith("data:"):
        return last, False  # blank lines, `:` comments (pings), event names
    data = line[5:].strip()
    if data == "[DONE]":
        return last, True
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"a stream chunk is not a JSON object: {data[:MAX_ERROR_CHARS]}")
    if "error" in chunk:
        error = chunk["error"]
        raise ValueError(str(error.get("message", error) if isinstance(error, dict) else error)[:MAX_ERROR_CHARS])
    now = time.perf_counter()
    if chunk.get("choices"):
        if last == start:
            result.ttft = now - start
        else:
            result.itl.append(now - last)
        if not result.usage_reported:
            result.output_tokens += 1
        last = now
    usage = chunk.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens, result.usage_reported = int(usage["completion_tokens"]), True
        if usage.get("prompt_tokens") is not None:
            result.prompt_len = int(usage["prompt_tokens"])
    return last, False


async def send_request(client, url: str, body: dict, prompt: Prompt) -> RequestResult:
    """Streams one completion and times it. Never raises for the server's or the network's failures: they make a
    failed result that carries the reason."""
    result = RequestResult(prompt_len=prompt.prompt_len, output_len=prompt.output_len)
    start = last = result.start_time = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, await response.aread())
                return result
            async for line in response.aiter_lines():
                last, done = read_event(line.strip(), result, start, last)
                if done:
                    break
    except Exception as e:  # the network's and the server's failures (timeouts, resets, bad chunks) fail the request
        result.error = f"{type(e).__name__}: {str(e)[:MAX_ERROR_CHARS]}"
        return result
    if last == start:
        result.error = "the stream ended without a token chunk"
        return result
    result.latency, result.success = last - start, True
    return result


# -- a run -------------------------------------------------------------------------------------------------------

async def run_load(client, url: str, model: str, prompts: Sequence[Prompt], *, request_rate: float = math.inf,
                   max_concurrency: int | None = None, seed: int = 0, burstiness: float = 1.0,
                   ignore_eos: bool = True, extra_body: dict | None = None,
                   on_result: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Sends every prompt at its arrival time, at most `max_concurrency` in flight (None: no cap); returns the
    results in prompt order and the run's duration in seconds (first send to last end)."""
    offsets = arrival_times(len(prompts), request_rate, seed, burstiness)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(prompt: Prompt, offset: float) -> RequestResult:
        await asyncio.sleep(max(start + offset - time.perf_counter(), 0.0))
        async with gate:
            body = completion_body(model, prompt, ignore_eos=ignore_eos, extra_body=extra_body)
            result = await send_request(client, url, body, prompt)
        if on_result is not None:
            on_result(result)
        return result

    results = await asyncio.gather(*(one(p, float(o)) for p, o in zip(prompts, offsets, strict=True)))
    return list(results), time.perf_counter() - start


# -- metrics -----------------------------------------------------------------------------------------------------

def tpot(result: RequestResult) -> float:
    """Time per output token after the first, in seconds; 0 for a request of one token (as vLLM's goodput)."""
    return (result.latency - result.ttft) / (result.output_tokens - 1) if result.output_tokens > 1 else 0.0


def summary(values_s: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """Mean, median, std and percentiles of durations given in seconds, in milliseconds (all 0 for none)."""
    ms = np.asarray(list(values_s) or [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    out.update({f"p{p:g}": float(np.percentile(ms, p)) for p in percentiles})
    return out


def check_slos(slos: dict[str, float] | None) -> dict[str, float]:
    for name, value in (slos or {}).items():
        if name not in SLO_METRICS:
            raise ZipjaxError(f"unknown goodput SLO {name!r}; choose from {', '.join(SLO_METRICS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ZipjaxError(f"the {name} SLO must be a positive number of milliseconds, got {value!r}")
    return dict(slos or {})


def good_requests(results: Sequence[RequestResult], slos: dict[str, float]) -> int:
    """Completed requests whose TTFT, TPOT and E2E latency are each within its SLO (milliseconds) where one is set."""
    measure = {"ttft": lambda r: r.ttft, "tpot": tpot, "e2el": lambda r: r.latency}
    return sum(all(measure[name](r) <= slo / 1000.0 for name, slo in slos.items()) for r in results if r.success)


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once, over half-open [start, end) intervals (an end before a start at a tie)."""
    events = sorted([(r.start_time, 1) for r in results] + [(r.start_time + r.latency, -1) for r in results])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def compute_metrics(results: Sequence[RequestResult], duration: float, slos: dict[str, float] | None = None,
                    percentiles: Sequence[float] = PERCENTILES) -> dict:
    """vLLM's serving metrics of one run (see the module's docstring); latencies in milliseconds."""
    if not (duration > 0 and math.isfinite(duration)):
        raise ZipjaxError(f"the run's duration must be a positive number of seconds, got {duration!r}")
    slos = check_slos(slos)
    done = [r for r in results if r.success]
    total_in, total_out = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": good_requests(done, slos) / duration if slos else None,
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "max_concurrent_requests": peak_concurrency(done),
        "short_outputs": sum(r.output_tokens < r.output_len for r in done),
        "usage_missing": sum(not r.usage_reported for r in done),
        "ttft_ms": summary([r.ttft for r in done], percentiles),
        "tpot_ms": summary([tpot(r) for r in done if r.output_tokens > 1], percentiles),
        "itl_ms": summary([gap for r in done for gap in r.itl], percentiles),
        "e2el_ms": summary([r.latency for r in done], percentiles),
    }


LATENCY_ROWS = (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency"))


def format_report(metrics: dict, title: str = "Serving Benchmark Result") -> str:
    """The metrics as `vllm bench serve` prints them."""
    lines = [f" {title} ".center(50, "=")]

    def row(name: str, value) -> None:
        lines.append(f"{name:<40} {value:<10}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    row("Benchmark duration (s):", f"{metrics['duration_s']:.2f}")
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", f"{metrics['request_throughput']:.2f}")
    if metrics["request_goodput"] is not None:
        row("Request goodput (req/s):", f"{metrics['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{metrics['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{metrics['total_token_throughput']:.2f}")
    row("Peak concurrent requests:", metrics["max_concurrent_requests"])
    for key, label in LATENCY_ROWS:
        lines.append(f"{label:-^50}")
        short = key.split("_")[0].upper()
        for stat, value in metrics[key].items():
            if stat != "std":
                row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):",
                    f"{value:.2f}")
    lines.append("=" * 50)
    if metrics["usage_missing"]:
        lines.append(f"note: {metrics['usage_missing']} responses had no usage; their tokens were counted per chunk")
    if metrics["short_outputs"]:
        lines.append(f"note: {metrics['short_outputs']} requests ended before their output length")
    return "\n".join(lines)


class Progress:
    """A one-line progress report on `stream` while a run goes: rewritten in place on a terminal, else a line per
    tenth of the requests."""

    def __init__(self, total: int, label: str = "bench-serve", stream=None):
        self.total, self.label, self.stream = total, label, stream if stream is not None else sys.stderr
        self.done = self.failed = self.tokens = 0
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.success
        self.tokens += result.output_tokens if result.success else 0
        step = max(self.total // 10, 1)
        if self.tty or self.done % step == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            line = (f"{self.label}: {self.done}/{self.total} requests done, {self.failed} failed, {self.tokens} "
                    f"tokens in {elapsed:.1f} s")
            self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


# -- a benchmark against a URL -----------------------------------------------------------------------------------

def base_url(url: str) -> str:
    """The server's root from what a user types: `http://host:port`, with or without a trailing `/` or `/v1`."""
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")) or len(root.split("://", 1)[1]) == 0:
        raise ZipjaxError(f"the server URL must start with http:// or https://, got {url!r}")
    return root.removesuffix("/v1")


async def served_model(client, root: str) -> str:
    """The first model the server lists at /v1/models (the one `vllm bench serve` picks by default)."""
    response = await client.get(f"{root}/v1/models")
    if response.status_code != 200:
        raise ZipjaxError(f"{root}/v1/models answered {_error_text(response.status_code, response.content)}; "
                          "name the model with --model")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ZipjaxError(f"{root}/v1/models lists no model; name it with --model") from None


def _http_client(connections: int, timeout: float):
    import httpx  # imported when a run starts: the CLI's other commands never pay for it

    # trust_env=False: a proxy from the environment must not carry loopback benchmark traffic
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), trust_env=False,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


def request_records(results: Sequence[RequestResult]) -> list[dict]:
    """Per-request details for the JSON output (milliseconds)."""
    return [{"success": r.success, "prompt_len": r.prompt_len, "output_len": r.output_len,
             "output_tokens": r.output_tokens, "ttft_ms": round(r.ttft * 1000, 3),
             "e2el_ms": round(r.latency * 1000, 3),
             "itl_ms": [round(gap * 1000, 3) for gap in r.itl], "error": r.error} for r in results]


async def _benchmark(root: str, prompts: Sequence[Prompt], *, model: str | None, request_rate: float,
                     max_concurrency: int | None, seed: int, burstiness: float, ignore_eos: bool,
                     extra_body: dict | None, slos: dict[str, float] | None, progress: bool, label: str,
                     timeout: float) -> dict:
    import httpx

    async with _http_client(max_concurrency or len(prompts), timeout) as client:
        try:
            model = model or await served_model(client, root)
        except httpx.TransportError as e:
            raise ZipjaxError(f"cannot reach the server at {root}: {type(e).__name__} {e}".strip()) from None
        url = f"{root}/v1/completions"
        first = await send_request(client, url, completion_body(model, prompts[0], ignore_eos=ignore_eos,
                                                                extra_body=extra_body), prompts[0])
        if not first.success:  # as vllm bench serve's initial single-prompt run: a misconfigured run stops here
            raise ZipjaxError(f"the test request to {url} failed: {first.error}")
        report = Progress(len(prompts), label) if progress else None
        try:
            results, duration = await run_load(client, url, model, prompts, request_rate=request_rate,
                                               max_concurrency=max_concurrency, seed=seed, burstiness=burstiness,
                                               ignore_eos=ignore_eos, extra_body=extra_body, on_result=report)
        finally:
            if report is not None:
                report.close()
    return {"url": root, "model": model, "num_prompts": len(prompts),
            "request_rate": "inf" if math.isinf(request_rate) else request_rate, "burstiness": burstiness,
            "max_concurrency": max_concurrency, "seed": seed, "ignore_eos": ignore_eos, "extra_body": extra_body,
            "goodput_slos_ms": slos, "metrics": compute_metrics(results, duration, slos),
            "requests": request_records(results)}


def benchmark(url: str, prompts: Sequence[Prompt], *, model: str | None = None, request_rate: float = math.inf,
              max_concurrency: int | None = None, seed: int = 0, burstiness: float = 1.0, ignore_eos: bool = True,
              extra_body: dict | None = None, slos: dict[str, float] | None = None, progress: bool = True,
              label: str = "bench-serve", timeout: float = 600.0) -> dict:
    """Runs the load of `prompts` against the server at `url` (after one untimed test request, as vLLM does) and
    returns the run's settings, its metrics (`compute_metrics`) and per-request records. `timeout`: seconds a
    request may wait for its next chunk. A server that cannot be reached or fails the test request is a
    ZipjaxError; failures during the run are counted in the metrics."""
    if not prompts:
        raise ZipjaxError("the benchmark needs at least one prompt")
    if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                        or max_concurrency < 1):
        raise ZipjaxError(f"max_concurrency must be a positive integer or None, got {max_concurrency!r}")
    check_slos(slos)
    arrival_times(1, request_rate, seed, burstiness)  # checks the rate and burstiness before any request
    return asyncio.run(_benchmark(base_url(url), prompts, model=model, request_rate=request_rate,
                                  max_concurrency=max_concurrency, seed=seed, burstiness=burstiness,
                                  ignore_eos=ignore_eos, extra_body=extra_body, slos=slos, progress=progress,
                                  label=label, timeout=timeout))
