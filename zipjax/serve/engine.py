"""The serving engine: requests in flight share one paged KV pool and advance together, one jitted step at a time
(continuous batching), on a background thread.

    engine = Engine(model, EngineConfig(max_num_seqs=16))
    engine.start()                               # compiles every step shape, then serves
    stream = engine.submit(Request("a", prompt_ids, SamplingParams(max_tokens=32)))
    for update in stream: ...                    # or `async for` in an event loop

Each step runs the decode rows of every running sequence and chunks of prompts (zipjax.serve.scheduler), through
the model with the paged cache (zipjax.serve.paged), and samples each row by its request's own settings
(zipjax.serve.step). Step shapes are padded to buckets compiled at start-up, so nothing compiles while serving;
`ready` turns True once they are. The pool is donated to each step (updated in place). Page tables, the free list
and the prefix cache live on the host (zipjax.serve.pages).

Async scheduling (as vLLM v1 does it): the step thread dispatches step n + 1 before it reads step n's tokens back,
so scheduling, building the batch and reporting step n run while the device computes step n + 1. A sequence that
decodes in both takes step n's token on the device (zipjax.serve.step: a placeholder in its tokens until read).
Outputs do not change: a request's sampling depends on its seed and token count only. A sequence whose token in
flight ends it by length is not scheduled again; one that a stop token (or an abort) ends while its next token is
already being computed has that token dropped, and its pages are free before the next step is planned (the device
runs steps in order, so a reused page is written by its new owner after the dropped write). When nothing can be
planned without the tokens in flight (every running sequence is ending, or waits for pages), the thread reads them
first; `EngineConfig(async_scheduling=False)` reads every step's tokens before planning the next.

On a mesh (`Engine(model, mesh=...)`, or a model loaded with one) the parameters are placed as `zipjax.load` places
them, the pool is split by KV head (zipjax.serve.paged.pool_shardings), and the step and the pack step are jitted
with the pool's shardings in and out, donated: XLA's SPMD partitioner runs them over the chips. The host side is
unchanged: the same page tables drive the same step.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh

from zipjax.errors import ZipjaxError
from zipjax.kv.method import as_method
from zipjax.model import Model
from zipjax.platform import free_memory_bytes
from zipjax.serve.batch import build_batch
from zipjax.serve.packed import PackedPool, page_codec
from zipjax.serve.paged import Pool, page_shards, pool_shardings
from zipjax.serve.pages import PageTable
from zipjax.serve.requests import Request, RequestStream, TokenLogprob, Update
from zipjax.serve.scheduler import Plan, Scheduler, Sequence, buckets, in_flight
from zipjax.serve.scoring import prompt_logprobs
from zipjax.serve.step import StepOutput, pack_pages, serve_step
from zipjax.sharding import as_auto_mesh, check_mesh, mesh_context, replicated, tree_shardings
from zipjax.validate import boolean, integer, optional

PACK_PAGES = 16  # dense pages packed per call of the compiled pack step
DEFAULT_POOL_SHARE = 0.4  # of the device's free memory, when neither num_pages nor kv_memory is given


@dataclasses.dataclass
class Flight:
    """A dispatched step whose tokens are not read yet: per sampled row, the sequence and its placeholder's index."""

    out: StepOutput  # on the device
    rows: list[tuple[Sequence, int, int]]  # (sequence, row of out, index in sequence.tokens)
    logprobs: bool  # some row asks for log-probabilities


class EngineFull(ZipjaxError):
    """The waiting queue is full: the server answers 503 at once rather than queueing without bound."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How much the engine keeps in flight. Pool size: `num_pages`, or `kv_memory` bytes of pages, or by default
    enough pages for `max_num_seqs` sequences of `max_model_len` tokens capped at 40% of the free device memory.
    `block_size`: prefill tokens per block (a chunk of a prompt is whole blocks but its last)."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    page_size: int = 16
    num_pages: int | None = None
    kv_memory: int | None = None
    max_model_len: int | None = None
    prefix_cache: bool = True
    max_waiting: int = 256
    block_size: int = 32
    block_pages: int = 8  # pages read per iteration of the attention loop
    dense_pages: int | None = None  # a compressed cache's dense pool (default: see Engine._dense_pages)
    async_scheduling: bool = True  # plan and dispatch the next step before reading this one's tokens

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "max_waiting", "block_size",
                     "block_pages"):
            integer(getattr(self, name), name, lo=1)
        boolean(self.async_scheduling, "async_scheduling")
        optional(integer, self.num_pages, "num_pages", lo=2)
        optional(integer, self.dense_pages, "dense_pages", lo=2)
        optional(integer, self.kv_memory, "kv_memory", lo=1)
        optional(integer, self.max_model_len, "max_model_len", lo=1)
        if self.num_pages is not None and self.kv_memory is not None:
            raise ZipjaxError("give the KV pool as num_pages or as kv_memory, not both")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ZipjaxError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                              f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes each step")


class Engine:
    """`kv`: None for dense pages, or a zipjax.kv method served on packed pages (ZipCache, KIVI, Uniform): then
    `num_pages` / `kv_memory` size the packed pool, and a small dense pool (`dense_pages`) holds prompts being
    computed and each sequence's newest tokens. `mesh`: a ("data", "model") mesh (zipjax.make_mesh) to serve on,
    for a model loaded without one (a model loaded with `mesh=` is served on its own)."""

    def __init__(self, model: Model, config: EngineConfig = EngineConfig(), *, kv=None, log=None,
                 mesh: Mesh | None = None):
        self.spec = None if as_method(kv) is None else page_codec(kv, model.config, config.page_size)
        if model.deltas is not None:
            from zipjax.experts.serve import MergedExperts

            if isinstance(model.deltas, MergedExperts):
                raise ZipjaxError("merged experts serve a batch of one expert only; attach the bank without merged=")
        self.model, self.config = on_mesh(model, mesh), config
        if self.model.mesh is not None and jax.process_count() > 1:
            raise ZipjaxError("the serving engine runs in one process; a multi-host mesh is not served")
        self.log = log if log is not None else (lambda text: print(text, file=sys.stderr))
        cfg = model.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ZipjaxError(f"max_model_len {self.max_model_len} exceeds the model's "
                              f"{cfg.max_position_embeddings} positions")
        num_pages = self._size_pool()
        self.packed_pages = None
        if self.spec is None:
            self.pages = PageTable(num_pages, config.page_size, prefix_cache=config.prefix_cache)
        else:
            self.pages = PageTable(self._whole(self._dense_pages()), config.page_size, prefix_cache=False)
            self.packed_pages = PageTable(num_pages, config.page_size, prefix_cache=config.prefix_cache)
        max_blocks = max(1, config.max_num_batched_tokens // config.block_size)
        self.scheduler = Scheduler(self.pages, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   block_size=config.block_size,
                                   decode_buckets=buckets(config.max_num_seqs, factor=4, first=4),
                                   prefill_buckets=buckets(max_blocks), packed=self.packed_pages,
                                   lag=0 if self.spec is None else self.spec.lag)
        self.pool: Pool | None = None
        self.expert_names: tuple[str, ...] = tuple(getattr(getattr(model.deltas, "bank", None), "names", ()))
        self.ready = False
        self.error: BaseException | None = None
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sequences: dict[str, Sequence] = {}
        self._flight: Flight | None = None  # the step in flight (async scheduling)
        self._carry: jax.Array | None = None  # its sampled tokens on the device, padded (zipjax.serve.step)
        self.steps = self.generated_tokens = self.finished = 0
        self.overlapped_steps = self.dropped_tokens = 0  # dispatched with a step in flight; read but not used

    def _size_pool(self) -> int:
        """The pool's page count; without a max_model_len given, the length is capped at what the pool holds."""
        config = self.config
        self.table_width = self._table_width()
        num_pages = self._num_pages()
        held = (num_pages - 1) * config.page_size
        if held < self.max_model_len and config.max_model_len is None and held >= config.page_size:
            self.log(f"[serve] max_model_len {held}: the KV pool holds {held} tokens, fewer than the model's "
                     f"{self.max_model_len} positions (give --max-model-len, or more memory with --kv-memory)")
            self.max_model_len = held
            self.table_width = self._table_width()
        if held < self.max_model_len:
            raise ZipjaxError(f"a KV pool of {num_pages - 1} pages of {config.page_size} tokens cannot hold one "
                              f"sequence of max_model_len {self.max_model_len}; give more pages or a shorter "
                              "max_model_len")
        return self._whole(num_pages)

    def _whole(self, num_pages: int) -> int:
        """`num_pages` rounded up to whole shards of the pool's page axis on the mesh (1 without one)."""
        shards = page_shards(self.model.mesh, self.model.config.num_kv_heads)
        return -(-num_pages // shards) * shards

    def _table_width(self) -> int:
        """Pages per page-table row: max_model_len's, rounded up to whole attention-loop blocks."""
        width = -(-self.max_model_len // self.config.page_size)
        return -(-width // self.config.block_pages) * self.config.block_pages

    def _num_pages(self) -> int:
        """Pages of the pool (a compressed cache: of its packed pool, after the dense pool's bytes)."""
        cfg, config = self.model.config, self.config
        if config.num_pages is not None:
            return config.num_pages
        page_bytes, reserved = Pool.page_bytes(cfg, config.page_size), 0
        if self.spec is not None:
            page_bytes = PackedPool.page_bytes(cfg, self.spec)
            reserved = self._dense_pages() * Pool.page_bytes(cfg, config.page_size, ranked=self.spec.ranked)
        if config.kv_memory is not None:
            return max(2, (config.kv_memory - reserved) // page_bytes)
        wanted = config.max_num_seqs * self.table_width + 1
        free = free_memory_bytes()
        if free is not None:
            free *= self._chips()
            wanted = min(wanted, (int(free * DEFAULT_POOL_SHARE) - reserved) // page_bytes)
        return max(2, wanted)

    def _chips(self) -> int:
        """Devices the pool is split over, each with its own memory (simulated CPU devices share the host's)."""
        mesh = self.model.mesh
        return 1 if mesh is None or mesh.devices.flat[0].platform == "cpu" else mesh.devices.size

    def _dense_pages(self) -> int:
        """A compressed cache's dense pool: each running sequence's unpacked tail (KIVI's residual, the page being
        filled, the next), and one prompt of max_model_len being computed."""
        config = self.config
        if config.dense_pages is not None:
            return config.dense_pages
        tail = -(-self.spec.lag // config.page_size) + 2
        return config.max_num_seqs * tail + self.table_width + 1

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (decode rows, prefill blocks) step shapes compiled at start-up."""
        return [(d, n) for d in self.scheduler.decode_buckets for n in self.scheduler.prefill_buckets if d or n]

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Allocate the pool and start the step thread (it compiles every shape first; `ready` turns True after)."""
        if self._thread is not None:
            raise ZipjaxError("the engine is already started")
        packed = 0 if self.packed_pages is None else self.packed_pages.num_pages
        init = functools.partial(Pool.init, self.model.config, self.pages.num_pages, self.config.page_size,
                                 spec=self.spec, num_packed=packed)
        self._serve_step, self._pack_pages = serve_step, pack_pages
        if self.model.mesh is None:
            self.pool = init()
        else:  # built on the devices, split from the start; never whole on one
            shardings = pool_shardings(jax.eval_shape(init), self.model.mesh)
            self.pool = jax.jit(init, out_shardings=shardings)()
            self._serve_step, self._pack_pages = sharded_steps(shardings, self.model.mesh)
        rows = self.scheduler.decode_buckets[-1] + self.scheduler.prefill_buckets[-1]  # the most a step samples
        carry = np.zeros((rows,), np.int32)
        self._carry = jax.device_put(carry, None if self.model.mesh is None else replicated(self.model.mesh))
        self._thread = threading.Thread(target=self._run, name="zipjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the step thread; requests still in flight finish with "abort"."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.error is not None:
                raise ZipjaxError(f"the engine failed to start: {self.error}") from self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine was not ready within {timeout} s")
            time.sleep(0.02)

    # -- requests ----------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestStream:
        """Queue a request; its updates arrive on the returned stream. Bad input is a ZipjaxError here, a full
        queue an EngineFull."""
        self._check(request)
        stream = RequestStream(request, self.abort)
        with self._wake:
            if self._stopping:
                raise ZipjaxError("the engine is stopping")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise EngineFull(f"{self.config.max_waiting} requests are already waiting; retry later")
            self._inbox.append(("add", stream))
            self._wake.notify_all()
        return stream

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._inbox.append(("abort", request_id))
            self._wake.notify_all()

    def _check(self, request: Request) -> None:
        prompt, params = request.prompt_ids, request.params
        if not prompt:
            raise ZipjaxError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            raise ZipjaxError(f"prompt token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ZipjaxError(f"stop_token_ids must lie in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ZipjaxError(f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the "
                              f"model's length of {self.max_model_len} tokens")
        if request.expert is not None and request.expert not in self.expert_names:
            raise ZipjaxError(f"no expert named {request.expert!r}"
                              + (f" (served: {', '.join(self.expert_names)})" if self.expert_names else ""))

    def metrics(self) -> dict[str, int]:
        counts = self.pages.counts()
        if self.packed_pages is not None:
            counts.update({f"packed_{name}": count for name, count in self.packed_pages.counts().items()})
        prefix = self.scheduler.prefix
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + len(self._inbox),
                **counts, "prefix_hit_tokens": prefix.hit_tokens, "prefix_query_tokens": prefix.query_tokens,
                "preemptions": self.scheduler.preemptions, "steps": self.steps,
                "generated_tokens": self.generated_tokens, "finished_requests": self.finished,
                "overlapped_steps": self.overlapped_steps, "dropped_tokens": self.dropped_tokens}

    # -- the step thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._warm_up()
            self.ready = True
            while self._next():
                pass
        except BaseException as e:  # the thread must report, not die silently: every stream gets the error
            self.error = e
            for sequence in list(self._sequences.values()):
                sequence.stream.push(e)
            raise
        finally:
            self._abort_all()

    def _warm_up(self) -> None:
        shapes = self.shapes
        if self.spec is not None:
            self._pack([])
        for i, (d, n) in enumerate(shapes):
            start = time.perf_counter()
            jax.block_until_ready(self._step(Plan([], [], d, n))[0])
            self.log(f"[serve] compiled step {i + 1}/{len(shapes)} ({d} decode rows, {n} prefill blocks of "
                     f"{self.config.block_size}) in {time.perf_counter() - start:.1f}s")

    def _next(self) -> bool:
        """Take new requests and cancellations; dispatch the next step if there is one, then read the tokens of the
        step before it (async scheduling) or its own; False once stopping."""
        with self._wake:
            while (not self._inbox and not self.scheduler.has_work() and self._flight is None
                   and not self._stopping):
                self._wake.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            self._add(item) if kind == "add" else self._abort(item)
        plan = self.scheduler.schedule()
        if plan is None and self._flight is not None:  # what is left needs the tokens in flight (or their pages)
            self._land()
            return True
        while plan is None and self.scheduler.running:  # every running sequence waits for pages: free some
            self.scheduler.preempt(self.scheduler.running[-1])
            plan = self.scheduler.schedule()
        if plan is not None:
            out, logprobs = self._step(plan)
            self.overlapped_steps += self._flight is not None
            self._land()
            self._flight = self._book(plan, out, logprobs)
            if not self.config.async_scheduling:
                self._land()
        return True

    def _add(self, stream: RequestStream) -> None:
        request = stream.request
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        eos = () if params.ignore_eos else tuple(self.model.config.eos_token_ids)
        salt = f"{'dense' if self.spec is None else self.spec.name}|{request.expert}".encode()
        sequence = Sequence(request, stream, seed, frozenset((*eos, *params.stop_token_ids)), salt,
                            list(request.prompt_ids), len(request.prompt_ids),
                            limit=min(len(request.prompt_ids) + params.max_tokens, self.max_model_len))
        if request.request_id in self._sequences:
            stream.push(ZipjaxError(f"request id {request.request_id!r} is already in flight"))
            return
        first = None
        if params.prompt_logprobs:
            first = prompt_logprobs(self.model, request.prompt_ids, params.logprobs, request.expert)
        if params.max_tokens == 0:
            stream.push(Update((), prompt_logprobs=first, finish_reason="length"))
            self.finished += 1
            return
        sequence.prompt_logprobs = first
        self._sequences[request.request_id] = sequence
        self.scheduler.waiting.append(sequence)

    def _abort(self, request_id: str) -> None:
        sequence = self._sequences.get(request_id)
        if sequence is not None:
            self._finish(sequence)
            sequence.stream.push(Update((), finish_reason="abort"))

    def _finish(self, sequence: Sequence) -> None:
        """The sequence is done: its pages go back now (a token of it still in flight is dropped when read)."""
        self._sequences.pop(sequence.request.request_id, None)
        self.scheduler.finish(sequence)
        sequence.finished = True
        self.finished += 1

    def _abort_all(self) -> None:
        self._flight = None
        for request_id in list(self._sequences):
            self._abort(request_id)
        with self._wake:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                item.push(Update((), finish_reason="abort"))

    def _step(self, plan: Plan) -> tuple[StepOutput, bool]:
        """Dispatch the plan's step (its output stays on the device) and whether some row wants logprobs."""
        if plan.convert:
            self._pack(plan.convert)
        batch, experts = build_batch(plan, self.scheduler, self.table_width)
        params, deltas = self.model.batch_inputs(experts if self.model.deltas is not None else None,
                                                 batch.tokens.shape[0])
        with mesh_context(self.model.mesh):
            self.pool, out = self._serve_step(params, self.pool, batch, deltas, self._carry,
                                              config=self.model.config, block_pages=self.config.block_pages,
                                              spec=self.spec)
        self._carry = out.carry
        self.pages.release(plan.freed)
        self.steps += 1
        return out, bool(batch.want_logprobs)

    def _pack(self, pairs: list[tuple[int, int]]) -> None:
        """Pack (dense, packed) page pairs, PACK_PAGES per call of the compiled pack step ((0, 0) pads)."""
        for i in range(0, max(len(pairs), 1), PACK_PAGES):
            part = pairs[i:i + PACK_PAGES]
            ids = np.zeros((2, PACK_PAGES), np.int32)
            ids[:, :len(part)] = np.asarray(part, np.int32).reshape(-1, 2).T
            with mesh_context(self.model.mesh):
                self.pool = self._pack_pages(self.pool, ids[0], ids[1], spec=self.spec)

    def _book(self, plan: Plan, out: StepOutput, logprobs: bool) -> Flight:
        """Record what the dispatched step computes, and give each sequence it samples a placeholder token."""
        rows = []

        def sampled(sequence: Sequence, row: int) -> None:
            rows.append((sequence, row, len(sequence.tokens)))
            sequence.tokens.append(in_flight(row))

        for row, sequence in enumerate(plan.decode):
            if not sequence.finished:
                self.scheduler.computed(sequence, 1)
                sampled(sequence, row)
        row = plan.decode_rows
        for chunk in plan.prefill:
            blocks = -(-chunk.count // self.config.block_size)
            if not chunk.sequence.finished:
                samples = chunk.samples
                self.scheduler.computed(chunk.sequence, chunk.count)
                if samples:
                    sampled(chunk.sequence, row + blocks - 1)
            row += blocks
        return Flight(out, rows, logprobs)

    def _land(self) -> None:
        """Read the step in flight's tokens back: put each in place of its placeholder, push updates, finish what
        is done (a sequence finished meanwhile has its token dropped)."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        out = flight.out
        if flight.logprobs:
            tokens, logprobs, top_ids, top_logprobs = jax.device_get((out.tokens, out.logprobs, out.top_ids,
                                                                      out.top_logprobs))
        else:
            tokens, logprobs, top_ids, top_logprobs = jax.device_get(out.tokens), None, None, None
        tokens = tokens.tolist()
        for sequence, row, index in flight.rows:
            if sequence.finished:
                self.dropped_tokens += 1
                continue
            token = tokens[row]
            sequence.tokens[index] = token
            self.generated_tokens += 1
            params = sequence.request.params
            entry = None
            if params.logprobs is not None:
                top = tuple(zip(top_ids[row][:params.logprobs].tolist(), top_logprobs[row][:params.logprobs].tolist(),
                                strict=True))
                entry = (TokenLogprob(token, float(logprobs[row]), top),)
            self._emit(sequence, token, entry, index)

    def _emit(self, sequence: Sequence, token: int, logprobs: tuple[TokenLogprob, ...] | None, index: int) -> None:
        reason = "stop" if token in sequence.stop_ids else "length" if index + 1 >= sequence.limit else None
        update = Update((token,), logprobs, reason)
        if not sequence.started:
            sequence.started = True
            update = dataclasses.replace(update, prompt_logprobs=sequence.prompt_logprobs,
                                         num_cached_tokens=sequence.cached_tokens)
        if reason is not None:
            self._finish(sequence)
        sequence.stream.push(update)


def on_mesh(model: Model, mesh: Mesh | None) -> Model:
    """`model` with its parameters on `mesh` as zipjax.load places them (the model's own mesh without one)."""
    if mesh is None:
        return model
    mesh = as_auto_mesh(mesh)
    if model.mesh is not None:
        if model.mesh != mesh:
            raise ZipjaxError("the model is already placed on another mesh; serve it on its own (mesh=None)")
        return model
    check_mesh(mesh)
    from zipjax.transformer import param_logical_axes

    shardings = tree_shardings(model.params, param_logical_axes(model.config), mesh)
    return dataclasses.replace(model, params=jax.device_put(model.params, shardings), mesh=mesh)


def sharded_steps(pool_sharding: Pool, mesh: Mesh):
    """serve_step and pack_pages jitted for a pool placed by `pool_sharding` (zipjax.serve.paged.pool_shardings): the
    pool in and out with those shardings and donated, the step's sampled tokens replicated (read by the host)."""
    step = jax.jit(serve_step.__wrapped__, static_argnames=("config", "block_pages", "spec"),
                   donate_argnames=("pool",), out_shardings=(pool_sharding, replicated(mesh)))
    pack = jax.jit(pack_pages.__wrapped__, static_argnames=("spec",), donate_argnames=("pool",),
                   out_shardings=pool_sharding)
    return step, pack
