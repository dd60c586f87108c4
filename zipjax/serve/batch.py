"""A step's plan (zipjax.serve.scheduler) as the arrays the device step takes (zipjax.serve.step.StepBatch).

Flat token order: the decode rows (padded to the plan's decode bucket), then the prefill blocks of `block_size`
tokens (padded to its prefill bucket). A padding token writes the null page and sees nothing; a padding row is
greedy and its token is ignored. A token still in flight (a placeholder, zipjax.serve.scheduler.in_flight) is 0
in `tokens` and its row of the step in flight in `source`: the step reads it on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zipjax.serve.paged import StepLayout
from zipjax.serve.scheduler import Plan, Scheduler, page_rows
from zipjax.serve.step import StepBatch


def build_batch(plan: Plan, scheduler: Scheduler, table_width: int) -> tuple[StepBatch, list[str | None]]:
    """The step's arrays and the expert of each of its flat tokens (None: the base model, or padding). With a
    compressed cache the layout also carries each row's packed pages and where its dense pages start."""
    block, page_size = scheduler.block_size, scheduler.pages.page_size
    d, n = plan.decode_rows, plan.prefill_blocks
    total = d + n * block
    tokens, positions = np.zeros((total,), np.int32), np.zeros((total,), np.int32)
    slots = np.zeros((total,), np.int32)  # the null page's first slot
    source = np.full((total,), -1, np.int32)
    experts: list[str | None] = [None] * total
    decode_positions = np.full((d,), -1, np.int32)
    prefill_positions = np.full((n, block), -1, np.int32)
    rows = np.zeros((d + n,), np.int32)
    owners: list = [None] * (d + n)  # the sequence whose settings each sampled row uses

    def place(index: int, sequence, position: int) -> None:
        token = sequence.tokens[position]
        if token < 0:  # in flight: row -1 - token of the previous step
            source[index], token = -1 - token, 0
        tokens[index], positions[index] = token, position
        page = sequence.pages[position // page_size - len(sequence.packed)]
        slots[index] = page * page_size + position % page_size
        experts[index] = sequence.request.expert

    for i, sequence in enumerate(plan.decode):
        place(i, sequence, sequence.num_computed)
        decode_positions[i], rows[i], owners[i] = sequence.num_computed, i, sequence
    prefill_sequences, b = [], 0
    for chunk in plan.prefill:
        for first in range(chunk.start, chunk.start + chunk.count, block):
            count = min(block, chunk.start + chunk.count - first)
            for j in range(count):
                place(d + b * block + j, chunk.sequence, first + j)
            prefill_positions[b, :count] = np.arange(first, first + count)
            rows[d + b], owners[d + b] = d + b * block + count - 1, chunk.sequence
            prefill_sequences.append(chunk.sequence)
            b += 1
    for b_pad in range(b, n):
        rows[d + b_pad] = d + b_pad * block
    layout = StepLayout(slots, page_rows([s.pages for s in plan.decode], table_width, d), decode_positions,
                        page_rows([s.pages for s in prefill_sequences], table_width, n), prefill_positions)
    if scheduler.packed is not None:
        layout = dataclasses.replace(layout, **_packed_tables("decode", plan.decode, table_width, d),
                                     **_packed_tables("prefill", prefill_sequences, table_width, n))
    batch = _with_sampling(tokens, positions, layout, rows, owners)
    return dataclasses.replace(batch, source=source), experts


def _packed_tables(segment: str, sequences: list, width: int, rows: int) -> dict[str, np.ndarray]:
    first = np.zeros((rows,), np.int32)
    first[:len(sequences)] = [len(s.packed) for s in sequences]
    return {f"{segment}_packed": page_rows([s.packed for s in sequences], width, rows), f"{segment}_first": first}


def _with_sampling(tokens, positions, layout: StepLayout, rows: np.ndarray, owners: list) -> StepBatch:
    """Each sampled row's settings from its sequence's request (a padding row: greedy, unseeded)."""
    count = len(rows)
    temperature, top_p = np.zeros((count,), np.float32), np.ones((count,), np.float32)
    top_k, counters = np.zeros((count,), np.int32), np.zeros((count,), np.int32)
    seeds = np.zeros((count,), np.uint32)
    want = False
    for i, sequence in enumerate(owners):
        if sequence is None:
            continue
        params = sequence.request.params
        temperature[i] = params.temperature
        top_k[i] = params.top_k or 0
        top_p[i] = 1.0 if params.top_p is None else params.top_p
        seeds[i], counters[i] = sequence.seed, sequence.generated
        want |= params.logprobs is not None
    return StepBatch(tokens, positions, layout, rows, temperature, top_k, top_p, seeds, counters, np.bool_(want))
