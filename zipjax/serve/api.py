"""The OpenAI-compatible HTTP server: `create_app(engine, served_name=...)` is a FastAPI app over a running engine.

    GET  /health                 503 until the engine has compiled every bucket, then 200
    GET  /v1/models              the checkpoint (its served name) and one entry per ME-Switch expert
    POST /v1/completions         text, texts, token ids or lists of token ids; echo, logprobs, stop, n, stream
    POST /v1/chat/completions    through the checkpoint's chat template (400 when it has none)
    POST /tokenize, POST /detokenize, GET /tokenizer_info    vLLM's shapes
    GET  /metrics                Prometheus text: the engine's counters, TTFT / inter-token histograms

A request becomes one engine request per choice (n per prompt; choice i*n + j is prompt i's sample j, seeded
`seed + j`). Every refusal is OpenAI's error body with the status that names its class: 400 bad input (types,
values, a prompt plus max_tokens beyond the model's length, a knob zipjax does not implement at a non-neutral
value), 404 an unknown model, 413 a body or prompt over the stated `Limits`, 503 a full queue (at once, never a
wait). A stream that fails part-way sends a last `data: {"error": ...}` event. A client that disconnects has its
requests cancelled, so their KV pages free within an engine step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zipjax.errors import ZipjaxError
from zipjax.sampling import MAX_SEED
from zipjax.serve.engine import EngineFull
from zipjax.serve.metrics import ChoiceTimer, ServerMetrics
from zipjax.serve.openai_schema import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    from_validation,
    refuse_unsupported,
)
from zipjax.serve.output import ChoiceOutput, chat_logprobs, completion_logprobs, token_text
from zipjax.serve.requests import Request as EngineRequest
from zipjax.serve.requests import RequestStream, SamplingParams, TokenLogprob


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for. Over a limit: 413, with the limit named."""

    max_body_bytes: int = 4 << 20  # the JSON body
    max_prompt_tokens: int | None = None  # one prompt; None: the model's length (engine.max_model_len)
    max_choices: int = 256  # prompts x n in one request


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # as given (echo returns it); None: token ids were given, echo decodes them


@dataclasses.dataclass
class Choice:
    index: int
    prompt: Prompt
    output: ChoiceOutput
    timer: ChoiceTimer
    stream: RequestStream | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0
    sent_tokens: int = 0  # streaming: tokens (and logprobs) already sent
    sent_chars: int = 0  # streaming: text_offset of the next token
    started: bool = False  # streaming: the first event (role / echo) is out
    reported: bool = False  # streaming: the finish reason is out


@dataclasses.dataclass
class Job:
    """One HTTP request's choices and how to format them."""

    kind: str  # "completion" | "chat"
    request_id: str
    model: str
    created: int
    choices: list[Choice]
    prompts: list[Prompt]
    logprobs: int | None  # top alternatives per token; None: no logprobs
    n: int = 1
    echo: bool = False
    include_usage: bool = False
    name: Callable[[int], str] | None = None  # a token's name in logprobs


class OpenAIServer:
    def __init__(self, engine, served_name: str, tokenizer, limits: Limits):
        self.engine, self.served_name, self.tokenizer, self.limits = engine, served_name, tokenizer, limits
        self.metrics = ServerMetrics()
        self.vocab_size = engine.model.config.vocab_size
        # the tokenizer is used from one worker thread: encoding and chat templates stay off the event loop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zipjax-tokenizer")

    # -- helpers -------------------------------------------------------------------------------------------------
    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def expert_for(self, model: str | None) -> str | None:
        if model is None or model == self.served_name:
            return None
        if model in self.engine.expert_names:
            return model
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def max_prompt_tokens(self) -> int:
        return self.limits.max_prompt_tokens or self.engine.max_model_len

    def check_prompt(self, ids: list[int], generated: int, where: str = "prompt") -> None:
        if not ids:
            raise ApiError(400, f"{where} is empty", param=where)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{where} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})",
                           param=where)
        if len(ids) > self.max_prompt_tokens():
            raise ApiError(413, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens()}", param=where)
        if len(ids) + generated > self.engine.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                                f"However, you requested {len(ids) + generated} tokens ({len(ids)} in the prompt, "
                                f"{generated} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens")

    def sampling(self, body, max_tokens: int, logprobs: int | None, prompt_logprobs: bool, sample: int):
        """The engine's settings for one choice (`sample`: its number among its prompt's n)."""
        if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
            raise ApiError(400, f"seed must lie in [0, {MAX_SEED}], got {body.seed}", param="seed")
        if body.top_k is not None and body.top_k < -1:
            raise ApiError(400, f"top_k must be -1 or 0 (off) or a positive integer, got {body.top_k}", param="top_k")
        for token in body.stop_token_ids or ():
            if not 0 <= token < self.vocab_size:
                raise ApiError(400, f"stop_token_ids holds {token}, outside the vocabulary [0, {self.vocab_size})",
                               param="stop_token_ids")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None, top_p=body.top_p,
                seed=None if body.seed is None else (body.seed + sample) % (MAX_SEED + 1),
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs)
        except ZipjaxError as e:
            raise ApiError(400, str(e)) from None

    @staticmethod
    def stop_strings(body) -> tuple[str, ...]:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop holds {len(stop)} strings, more than the {MAX_STOP_STRINGS} accepted",
                           param="stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"every stop string must hold 1 to {MAX_STOP_CHARS} characters", param="stop")
        return stop

    # -- running choices -----------------------------------------------------------------------------------------
    def make_job(self, kind: str, body, prompts: list[Prompt], max_tokens: int, logprobs: int | None,
                 echo: bool = False) -> Job:
        """Check everything, then submit one engine request per choice (all or none: a refusal cancels the rest)."""
        arrival = time.perf_counter()
        if len(prompts) * body.n > self.limits.max_choices:
            raise ApiError(413, f"this request asks for {len(prompts) * body.n} choices (prompts x n), more than "
                                f"this server's limit of {self.limits.max_choices}", param="n")
        prompt_logprobs = echo and logprobs is not None  # max_tokens 0 with them: score the prompt only
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt.ids, max_tokens, "prompt" if len(prompts) == 1 else f"prompt.{i}")
        stop = self.stop_strings(body)
        params = [self.sampling(body, max_tokens, logprobs, prompt_logprobs, j) for j in range(body.n)]
        expert = self.expert_for(body.model)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job = Job(kind, body.request_id or f"{prefix}-{uuid.uuid4().hex}", body.model or self.served_name,
                  int(time.time()), [], prompts, logprobs, body.n, echo,
                  bool(body.stream_options and body.stream_options.include_usage))
        job.name = token_text(self.tokenizer, body.return_tokens_as_token_ids)
        for prompt in prompts:
            for _ in range(body.n):
                output = ChoiceOutput(self.tokenizer, stop, include_stop=body.include_stop_str_in_output,
                                      streaming=bool(body.stream))
                job.choices.append(Choice(len(job.choices), prompt, output, self.metrics.timer(arrival)))
        self.submit(job, params, expert)
        self.metrics.prompt_tokens += sum(len(p.ids) for p in prompts)
        return job

    def submit(self, job: Job, params: list[SamplingParams], expert: str | None) -> None:
        n = len(params)
        try:
            for choice in job.choices:
                request = EngineRequest(f"{job.request_id}-{choice.index}", tuple(choice.prompt.ids),
                                        params[choice.index % n], expert)
                choice.stream = self.engine.submit(request)
        except BaseException as e:
            for choice in job.choices:
                if choice.stream is not None:
                    choice.stream.cancel()
            if isinstance(e, EngineFull):
                raise ApiError(503, f"the server is at capacity ({e})", code="server_full") from None
            if isinstance(e, ZipjaxError) and self.engine.error is None and "stopping" not in str(e):
                raise ApiError(400, str(e)) from None
            if isinstance(e, ZipjaxError):  # the engine stopped or failed: not the request's fault
                raise ApiError(503, f"the engine is not serving: {self.engine.error or e}") from None
            raise

    @staticmethod
    async def drive(choice: Choice, notify: Callable[[Choice, BaseException | None], None]) -> None:
        """Read one choice's updates into its output; `notify` after each (with the error that ended it, if any)."""
        stream = choice.stream
        try:
            if stream is not None:
                async for update in stream:
                    if update.prompt_logprobs is not None:
                        choice.prompt_logprobs = update.prompt_logprobs
                    choice.cached_tokens = max(choice.cached_tokens, update.num_cached_tokens)
                    choice.timer.tokens(len(update.token_ids))
                    choice.output.add(update)
                    notify(choice, None)
                    if choice.output.finished:
                        break
            choice.timer.finish(choice.output.finish_reason or "abort", len(choice.output.token_ids))
        except Exception as e:
            notify(choice, e)
        finally:
            if stream is not None:
                stream.cancel()  # a stop string (or an error) ended it early: free its pages; a no-op when finished

    async def run_all(self, job: Job, request: Request) -> None:
        """Every choice to its end (non-streaming); the first error is raised."""
        errors: list[BaseException] = []
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            await asyncio.gather(*(self.drive(c, lambda c, e: e is not None and errors.append(e))
                                   for c in job.choices))
        finally:
            watcher.cancel()
            cancel_all(job)
        if errors:
            raise as_api_error(errors[0])

    async def events(self, job: Job, request: Request) -> AsyncIterator[str]:
        """Server-sent events of a streaming job: chunks as tokens arrive, usage, [DONE]; an error as a last chunk."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self.drive(c, lambda c, e: queue.put_nowait((c, e)))) for c in job.choices]
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            for choice in job.choices:
                if choice.stream is None:
                    queue.put_nowait((choice, None))
            while not all(c.reported for c in job.choices):
                choice, error = await queue.get()
                if error is not None:
                    raise as_api_error(error)
                chunk = self.chunk(job, choice)
                if chunk is not None:
                    yield sse(chunk)
            if job.include_usage:
                yield sse({**self.envelope(job, stream=True), "choices": [], "usage": usage(job)})
        except ApiError as e:
            self.metrics.errors[e.status] = self.metrics.errors.get(e.status, 0) + 1
            yield sse(e.body())
        finally:
            watcher.cancel()
            for task in tasks:
                task.cancel()
            cancel_all(job)
        yield "data: [DONE]\n\n"

    # -- formatting ----------------------------------------------------------------------------------------------
    def envelope(self, job: Job, *, stream: bool) -> dict:
        kind = {"completion": "text_completion", "chat": "chat.completion.chunk" if stream else "chat.completion"}
        return {"id": job.request_id, "object": kind[job.kind], "created": job.created, "model": job.model}

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids)

    def chunk(self, job: Job, choice: Choice) -> dict | None:
        """The streaming event for what `choice` gained since its last event (None: nothing to send yet)."""
        output = choice.output
        text = output.take_text()
        ids, entries = output.token_ids[choice.sent_tokens:], output.logprobs[choice.sent_tokens:]
        choice.sent_tokens = len(output.token_ids)
        first = not choice.started
        choice.started = True
        if first and job.echo:
            text = self.prompt_text(choice.prompt) + text
            ids, entries = choice.prompt.ids + ids, list(self.prompt_entries(choice)) + entries
        finish = output.finish_reason if output.finished and not choice.reported else None
        choice.reported = output.finished
        if not (text or finish or first or (job.logprobs is not None and ids)):
            return None
        item: dict = {"index": choice.index}
        if job.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            item.update(delta=delta, logprobs=self.chat_lp(job, entries), finish_reason=finish)
        else:
            logprobs = None
            if job.logprobs is not None:
                logprobs = completion_logprobs(entries, ids, job.logprobs, job.name, choice.sent_chars)
                choice.sent_chars += sum(len(token) for token in logprobs["tokens"])
            item.update(text=text, logprobs=logprobs, finish_reason=finish)
        out = {**self.envelope(job, stream=True), "choices": [item]}
        if job.include_usage:
            out["usage"] = None
        return out

    def prompt_entries(self, choice: Choice) -> tuple[TokenLogprob | None, ...]:
        if choice.prompt_logprobs is not None:
            return choice.prompt_logprobs
        return (None,) * len(choice.prompt.ids)  # echo without logprobs: the prompt's tokens, no numbers

    def chat_lp(self, job: Job, entries: list[TokenLogprob]) -> dict | None:
        return None if job.logprobs is None else chat_logprobs(entries, job.logprobs, job.name)

    def response(self, job: Job) -> dict:
        choices = []
        for choice in job.choices:
            output = choice.output
            if job.kind == "chat":
                choices.append({"index": choice.index, "message": {"role": "assistant", "content": output.text},
                                "logprobs": self.chat_lp(job, output.logprobs),
                                "finish_reason": output.finish_reason})
                continue
            text, ids, entries = output.text, list(output.token_ids), list(output.logprobs)
            if job.echo:
                text = self.prompt_text(choice.prompt) + text
                ids, entries = choice.prompt.ids + ids, list(self.prompt_entries(choice)) + entries
            logprobs = None if job.logprobs is None else completion_logprobs(entries, ids, job.logprobs, job.name)
            choices.append({"index": choice.index, "text": text, "logprobs": logprobs,
                            "finish_reason": output.finish_reason})
        return {**self.envelope(job, stream=False), "choices": choices, "usage": usage(job)}


    # -- endpoints -----------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        refuse_unsupported(body)
        self.expert_for(body.model)
        prompts = await self.completion_prompts(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        job = self.make_job("completion", body, prompts, max_tokens, body.logprobs, echo=bool(body.echo))
        return await self.reply(job, body, request)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        refuse_unsupported(body)
        self.expert_for(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = await self.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # OpenAI's default for chat: whatever the context leaves
            max_tokens = max(self.engine.max_model_len - len(prompt.ids), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = self.make_job("chat", body, [prompt], max_tokens, logprobs)
        return await self.reply(job, body, request)

    async def reply(self, job: Job, body, request: Request) -> Response:
        if body.stream:
            return StreamingResponse(self.events(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await self.run_all(job, request)
        return JSONResponse(self.response(job))

    async def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [Prompt(list(prompt))]
        if isinstance(prompt[0], list):
            return [Prompt(list(ids)) for ids in prompt]
        ids = await self.off_loop(lambda: [self.tokenizer.encode(t, body.add_special_tokens) for t in prompt])
        return [Prompt(i, t) for i, t in zip(ids, prompt, strict=True)]

    async def chat_prompt(self, messages: list[ChatMessage]) -> Prompt:
        if not self.tokenizer.has_chat_template:
            raise ApiError(400, f"the model `{self.served_name}` has no chat template (its tokenizer defines none); "
                                "use /v1/completions", param="messages", code="no_chat_template")
        conversation = [chat_message(m, i) for i, m in enumerate(messages)]
        try:
            return Prompt(await self.off_loop(self.tokenizer.chat, conversation))
        except ZipjaxError as e:
            raise ApiError(400, str(e), param="messages") from None

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self.expert_for(body.model)
        refuse_unsupported(body)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = (await self.chat_prompt(body.messages)).ids
        else:
            ids = await self.off_loop(self.tokenizer.encode, body.prompt, body.add_special_tokens)
        name = token_text(self.tokenizer, False)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                "token_strs": [name(t) for t in ids] if body.return_token_strs else None}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.expert_for(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"tokens holds {bad}, outside the vocabulary [0, {self.vocab_size})", param="tokens")
        return {"prompt": await self.off_loop(self.tokenizer.decode, body.tokens)}

    def models(self) -> dict:
        created = int(time.time())
        entry = {"object": "model", "created": created, "owned_by": "zipjax",
                 "max_model_len": self.engine.max_model_len, "permission": []}
        data = [{"id": self.served_name, "root": self.served_name, "parent": None, **entry}]
        data += [{"id": name, "root": name, "parent": self.served_name, **entry} for name in self.engine.expert_names]
        return {"object": "list", "data": data}


def chat_message(message: ChatMessage, index: int) -> dict[str, str]:
    """A chat message as the template takes it: text content ("developer" is OpenAI's newer name for "system")."""
    content = message.content
    if content is None:
        raise ApiError(400, f"messages.{index}.content is missing", param=f"messages.{index}.content")
    if not isinstance(content, str):
        content = "".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def usage(job: Job) -> dict:
    prompt = sum(len(p.ids) for p in job.prompts)
    completion = sum(len(c.output.token_ids) for c in job.choices)
    cached = sum(c.cached_tokens for c in job.choices[::job.n])  # one per prompt, as prompt_tokens counts
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def cancel_all(job: Job) -> None:
    for choice in job.choices:
        if choice.stream is not None:
            choice.stream.cancel()


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away, then cancel the job's engine requests (their pages free within a step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel_all(job)
            return


def as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ZipjaxError):
        return ApiError(400, str(error))
    return ApiError(500, f"the engine failed: {type(error).__name__}: {error}")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before any of it is parsed (by its
    Content-Length when it states one, else while it arrives); a POST without a content type is read as JSON."""

    def __init__(self, app, limit: int, metrics: ServerMetrics | None = None):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self.refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        if b"content-type" not in headers:
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        error = ApiError(413, f"the request body is larger than this server's limit of {self.limit:,} bytes")
        if self.metrics is not None:
            self.metrics.errors[413] = self.metrics.errors.get(413, 0) + 1
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def create_app(engine, *, served_name: str, tokenizer=None, limits: Limits | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (started by the caller, who also stops it). `served_name`: the model
    id clients ask for; `tokenizer`: another zipjax Tokenizer of the same vocabulary (one with a chat template,
    say) instead of the checkpoint's own."""
    limits = limits or Limits()
    server = OpenAIServer(engine, served_name, tokenizer or engine.model.tokenizer, limits)
    app = FastAPI(title="zipjax serve", summary="OpenAI-compatible completions over a zipjax checkpoint")
    app.state.server = server
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, metrics=server.metrics)
    _error_handlers(app, server)

    @app.get("/health")
    async def health() -> Response:
        if engine.ready and engine.error is None:
            return Response(status_code=200)
        error = ApiError(503, "the engine failed" if engine.error is not None else
                         "the engine is still compiling its programs", code="not_ready")
        return JSONResponse(error.body(), status_code=503)

    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/tokenizer_info")(lambda: server.tokenizer.info())

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(engine.metrics()), media_type="text/plain; version=0.0.4")

    return app


def _error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    """Every error leaves as OpenAI's body: ours, FastAPI's validation (400, not 422), routing (404, 405), bugs."""

    def reply(error: ApiError) -> JSONResponse:
        server.metrics.errors[error.status] = server.metrics.errors.get(error.status, 0) + 1
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return reply(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return reply(from_validation(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return reply(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        return reply(ApiError(500, f"internal error: {type(error).__name__}: {error}"))
