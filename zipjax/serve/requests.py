"""What a client hands the serving engine and what it gets back: requests, sampling settings, token updates, and the
per-request stream that carries updates from the engine's thread to a caller (a thread or an asyncio task).

The engine (zipjax.serve.engine) runs its steps on one background thread; an HTTP handler submits a `Request` and
reads the `RequestStream` it gets. Everything here is plain Python (no jax): the OpenAI layer (zipjax.serve.api)
builds requests from JSON bodies and formats updates, and never sees an array.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator

from zipjax.errors import ZipjaxError
from zipjax.sampling import MAX_SEED, MIN_TEMPERATURE
from zipjax.validate import boolean, integer, number, optional

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on logprobs / top_logprobs
FINISH_REASONS = ("stop", "length", "abort")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen. Checked on construction (a ZipjaxError names the field).

    temperature 0 is greedy; top_k / top_p None mean off. seed None: the engine draws one (the request's tokens then
    differ run to run); with a seed, the tokens are a function of (seed, prompt, settings) only, never of the batch
    mates or of preemptions. logprobs: None for none, n >= 0 for the chosen token's log-probability plus the n most
    likely alternatives at each generated position; prompt_logprobs: the same for every prompt token (the first
    has none), as OpenAI's `echo` with `logprobs` returns."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        integer(self.max_tokens, "max_tokens", lo=0)
        number(self.temperature, "temperature", lo=0)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ZipjaxError(f"temperature {self.temperature} is too small to sample with; use 0 for greedy")
        optional(integer, self.top_k, "top_k", lo=1)
        optional(number, self.top_p, "top_p", lo=0, hi=1, lo_open=True)
        optional(integer, self.seed, "seed", lo=0, hi=MAX_SEED)
        if not isinstance(self.stop_token_ids, tuple | list):
            raise ZipjaxError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r:.60}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # hashable, as annotated
        for token in self.stop_token_ids:
            integer(token, "stop_token_ids", lo=0)
        boolean(self.ignore_eos, "ignore_eos")
        boolean(self.prompt_logprobs, "prompt_logprobs")
        optional(integer, self.logprobs, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if self.prompt_logprobs and self.logprobs is None:
            raise ZipjaxError("prompt_logprobs needs logprobs (the number of alternatives to report, 0 or more)")


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to generate: its prompt as token ids, its settings, and the weights it runs on (`expert`: a name
    of the model's `deltas`, e.g. an ME-Switch expert; None: the base model)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    expert: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model (float32, before temperature and filters, as OpenAI and
    vLLM report it), and the `top` most likely tokens at that position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Update:
    """What a request's stream yields, in order: new tokens since the last update (with their log-probabilities when
    asked), and once, in the last update, why it finished: "stop" (an end or stop token, which is included in
    `token_ids`), "length" (max_tokens, or the model's length), "abort" (cancelled). The first update carries the
    prompt's log-probabilities when they were asked for (entry 0 is None: the first token has no context)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first update)


class RequestStream:
    """The updates of one request, pushed by the engine thread and read by one consumer: `for update in stream`
    (blocking) or `async for update in stream` (in the event loop that called `Engine.submit`). Iteration ends after
    the update with a finish reason. `cancel()` asks the engine to stop the request and free its pages."""

    def __init__(self, request: Request, cancel: collections.abc.Callable[[str], None]):
        self.request = request
        self._cancel = cancel
        self._updates: collections.deque[Update | BaseException] = collections.deque()
        self._lock = threading.Condition()
        self._finished = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._event = asyncio.Event() if self._loop is not None else None

    # -- engine side ---------------------------------------------------------------------------------------------
    def push(self, item: Update | BaseException) -> None:
        """Called by the engine thread: deliver an update (or an error that ends the stream)."""
        with self._lock:
            self._updates.append(item)
            self._lock.notify_all()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    # -- consumer side -------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        if not self._finished:
            self._cancel(self.request.request_id)

    def _take(self) -> Update | None:
        if not self._updates:
            return None
        item = self._updates.popleft()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def __iter__(self) -> Iterator[Update]:
        while not self._finished:
            with self._lock:
                while not self._updates:
                    self._lock.wait()
                update = self._take()
            yield update

    async def __aiter__(self) -> AsyncIterator[Update]:
        if self._event is None:
            raise RuntimeError("this stream was submitted outside an event loop; iterate it with `for`")
        while not self._finished:
            with self._lock:
                update = self._take()
                if update is None:
                    self._event.clear()
            if update is None:
                await self._event.wait()
                continue
            yield update

    def collect(self) -> list[Update]:
        """Every update until the request finishes (blocking)."""
        return list(self)
