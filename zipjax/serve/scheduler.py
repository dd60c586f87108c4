"""The engine's host-side scheduler: which tokens of which requests go into the next step, with which pages.

Each step takes, in order (vLLM v1's policy):
1. one token of every running sequence that is decoding (its next page allocated when it starts one); when no page
   is left, the most recently admitted sequence is preempted: its pages are released and it waits again, to be
   recomputed from its tokens (prompt and what it generated) when pages free up (its outputs do not change: a
   request's sampling depends on its own seed and token count only);
2. chunks of prompts filling the rest of the token budget: sequences part-way through their prompt first, then
   waiting requests in arrival order while fewer than `max_num_seqs` run. A chunk is split into blocks of
   `block_size` tokens (the step's prefill segment); an admitted request first takes whatever full pages of its
   prefix the prefix cache holds.

The shapes a step runs with are padded up to compiled buckets: decode rows to `decode_buckets`, prefill blocks to
`prefill_buckets`. Everything here is numpy and Python; zipjax.serve.engine runs the step and reports outputs.

With async scheduling (zipjax.serve.engine) the next step is planned while one is still in flight: a sequence's
newest token may then be a placeholder, `in_flight(row)` (negative: row `row` of the step in flight), which the next
step reads on the device. Only a sequence's last token is ever a placeholder and its computed tokens are always
real, so prefix keys never hash one; a sequence whose in-flight token is its last (`at_limit`) is not planned again.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import numpy as np

from zipjax.serve.paged import NULL_PAGE
from zipjax.serve.pages import PageTable, page_key
from zipjax.serve.requests import Request, RequestStream


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request in flight: its tokens so far (prompt, then generated) and the pages holding their K/V."""

    request: Request
    stream: RequestStream
    seed: int
    stop_ids: frozenset[int]
    salt: bytes
    tokens: list[int]
    prompt_len: int
    pages: list[int] = dataclasses.field(default_factory=list)  # dense pages of logical pages len(packed), ...
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of the first len(keys) logical pages
    packed: list[int] = dataclasses.field(default_factory=list)  # packed pages of logical pages 0, 1, ...
    num_computed: int = 0  # tokens whose K/V are in the pages
    cached_tokens: int = 0  # prompt tokens the prefix cache served at first admission
    started: bool = False  # sent its first update
    prompt_logprobs: tuple | None = None  # sent with the first update, when asked for
    limit: int = sys.maxsize  # tokens (prompt and generated) at which it ends by length
    finished: bool = False  # ended (stopped, length, aborted): a token of it still in flight is dropped

    @property
    def at_limit(self) -> bool:
        """Its last token (in flight) is its final one: nothing more to compute."""
        return len(self.tokens) >= self.limit

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclasses.dataclass
class Chunk:
    sequence: Sequence
    start: int  # first position computed
    count: int  # tokens computed

    @property
    def samples(self) -> bool:
        """Whether the chunk ends at the sequence's newest token (its last row's logits choose the next token)."""
        return self.start + self.count == len(self.sequence.tokens)


@dataclasses.dataclass
class Plan:
    decode: list[Sequence]
    prefill: list[Chunk]
    decode_rows: int  # bucket
    prefill_blocks: int  # bucket
    convert: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (dense, packed) pages to pack first
    freed: list[int] = dataclasses.field(default_factory=list)  # dense pages to release after the step


def in_flight(row: int) -> int:
    """The placeholder token for row `row` of the step in flight (its sampled token, not yet read back)."""
    return -1 - row


def buckets(limit: int, factor: int = 2, first: int = 1) -> tuple[int, ...]:
    """0, first, first * factor, ... up to and including `limit`."""
    sizes, size = [0], first
    while size < limit:
        sizes.append(size)
        size *= factor
    return (*sizes, limit)


def bucket_for(count: int, sizes: tuple[int, ...]) -> int:
    return next(size for size in sizes if size >= count)


class Scheduler:
    """`pages` holds every new token's K/V; with `packed` (a compressed cache) a decoding sequence's full dense
    pages move into packed pages once `lag` newer tokens follow them (zipjax.serve.packed), and the prefix cache
    keeps packed pages only."""

    def __init__(self, pages: PageTable, *, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
                 decode_buckets: tuple[int, ...], prefill_buckets: tuple[int, ...], packed: PageTable | None = None,
                 lag: int = 0):
        self.pages, self.packed, self.lag = pages, packed, lag
        self.prefix = packed if packed is not None else pages
        self._convert: list[tuple[Sequence, int, int]] = []
        self.max_num_seqs, self.budget, self.block_size = max_num_seqs, max_num_batched_tokens, block_size
        self.decode_buckets, self.prefill_buckets = decode_buckets, prefill_buckets
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan | None:
        """The next step's plan, or None when nothing can run."""
        self._convert = []
        try:
            return self._plan()
        finally:
            self._convert = []  # planned conversions are the plan's now: a later release must not drop them

    def _plan(self) -> Plan | None:
        decode = self._decodes()
        budget = self.budget - len(decode)
        max_blocks = self.prefill_buckets[-1]
        prefill: list[Chunk] = []
        for sequence in [s for s in self.running if s.pending > 1 and s not in decode and not s.at_limit]:
            budget, max_blocks = self._chunk(sequence, budget, max_blocks, prefill)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0 and max_blocks > 0:
            sequence = self.waiting[0]
            if sequence.at_limit or not self._admit(sequence):
                break
            self.waiting.popleft()
            self.running.append(sequence)
            budget, max_blocks = self._chunk(sequence, budget, max_blocks, prefill)
        convert = [(d, p) for _, d, p in self._convert]  # only decoding sequences convert
        if not decode and not prefill:
            return None
        blocks = sum(-(-c.count // self.block_size) for c in prefill)
        return Plan(decode, prefill, bucket_for(len(decode), self.decode_buckets),
                    bucket_for(blocks, self.prefill_buckets), convert, [d for d, _ in convert])

    def _decodes(self) -> list[Sequence]:
        decode = []
        for sequence in list(self.running):
            if sequence not in self.running or sequence.pending != 1 or sequence.at_limit:
                continue  # preempted while making room for an earlier one, still in its prompt, or ending
            while not (self._pack(sequence) and self._reserve(sequence, sequence.num_computed + 1)):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is sequence:
                    break
            else:
                decode.append(sequence)
        return decode

    def _chunk(self, sequence: Sequence, budget: int, max_blocks: int, out: list[Chunk]) -> tuple[int, int]:
        count = min(sequence.pending, budget, max_blocks * self.block_size)
        count = min(count, (len(sequence.packed) + len(sequence.pages) + self.pages.available())
                    * self.pages.page_size - sequence.num_computed)
        if count <= 0 or not self._reserve(sequence, sequence.num_computed + count):
            return budget, max_blocks
        out.append(Chunk(sequence, sequence.num_computed, count))
        return budget - count, max_blocks - -(-count // self.block_size)

    def _reserve(self, sequence: Sequence, length: int) -> bool:
        """Pages for the sequence's first `length` tokens; False (nothing taken) when the pool cannot give them."""
        needed = -(-length // self.pages.page_size) - len(sequence.packed) - len(sequence.pages)
        if needed > self.pages.available():
            return False
        sequence.pages.extend(self.pages.allocate() for _ in range(max(needed, 0)))
        return True

    def _admit(self, sequence: Sequence) -> bool:
        """Take the cached pages of the sequence's prefix (leaving at least its last token to compute)."""
        size = self.pages.page_size
        keys, parent = [], b""
        for i in range((len(sequence.tokens) - 1) // size):
            parent = page_key(parent, sequence.tokens[i * size:(i + 1) * size], sequence.salt)
            keys.append(parent)
        matched = self.prefix.match(keys)
        if not sequence.started:
            self.prefix.query_tokens += sequence.prompt_len
            self.prefix.hit_tokens += len(matched) * size
            sequence.cached_tokens = len(matched) * size
        if self.packed is not None:
            sequence.packed, sequence.pages = matched, []
        else:
            sequence.pages = matched
        sequence.keys = keys[:len(matched)]
        sequence.num_computed = len(matched) * size
        if self.pages.available() == 0 and sequence.pending > 0:
            self.release(sequence)
            sequence.num_computed = 0
            return False
        return True

    def _pack(self, sequence: Sequence) -> bool:
        """Move the decoding sequence's due dense pages into packed pages (done by the engine before the step);
        False when the packed pool has no page for one."""
        size = self.pages.page_size
        while self.packed is not None and (len(sequence.packed) + 1) * size + self.lag <= sequence.num_computed:
            page = self.packed.allocate()
            if page is None:
                return False
            i = len(sequence.packed)
            if len(sequence.keys) == i:
                parent = sequence.keys[-1] if sequence.keys else b""
                sequence.keys.append(page_key(parent, sequence.tokens[i * size:(i + 1) * size], sequence.salt))
                self.packed.register(page, sequence.keys[i])
            self._convert.append((sequence, sequence.pages.pop(0), page))
            sequence.packed.append(page)
        return True

    def preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.release(sequence)
        sequence.num_computed = 0
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def release(self, sequence: Sequence) -> None:
        """Give back the sequence's pages; a conversion planned for it in the step being planned is dropped (its
        dense page is released, its packed page forgets its prefix key)."""
        self.pages.release(sequence.pages)
        if self.packed is not None:
            dropped = [(s, d, p) for s, d, p in self._convert if s is sequence]
            self._convert = [c for c in self._convert if c[0] is not sequence]
            self.pages.release([d for _, d, _ in dropped])
            for _, _, page in dropped:  # never written: not a prefix page
                self.packed.forget(page)
            self.packed.release(sequence.packed)
        sequence.pages, sequence.keys, sequence.packed = [], [], []

    def computed(self, sequence: Sequence, count: int) -> None:
        """`count` more tokens of the sequence are in its pages: record the full pages for the prefix cache."""
        sequence.num_computed += count
        size = self.pages.page_size
        if self.packed is not None:
            return  # a compressed cache shares packed pages only (keyed when packed)
        for i in range(len(sequence.keys), sequence.num_computed // size):
            parent = sequence.keys[-1] if sequence.keys else b""
            key = page_key(parent, sequence.tokens[i * size:(i + 1) * size], sequence.salt)
            sequence.keys.append(key)
            self.pages.register(sequence.pages[i], key)

    def finish(self, sequence: Sequence) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.release(sequence)


def page_rows(pages: list[list[int]], width: int, rows: int) -> np.ndarray:
    """int32 [rows, width] page tables, null-page padded."""
    table = np.full((rows, width), NULL_PAGE, np.int32)
    for i, row in enumerate(pages):
        table[i, :len(row)] = row
    return table
