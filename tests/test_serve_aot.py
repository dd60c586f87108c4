"""The serving step compiles ahead of time for a TPU pod slice and an H100 at LLaMA-3-8B shapes (bf16, 64 decode
rows plus 8 prefill blocks of 64 tokens, 8k-token page tables) with a pool of eight full-length sequences, and the
compiler's memory plan fits the chip: the CPU proves nothing about XLA:TPU or XLA:GPU. The capacity table (the pool
sized to fill each chip) is benchmarks/serve_aot.py's."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.serve_aot import MESHES, Shape, compile_step
from zipjax import aot
from zipjax.config import PUBLISHED
from zipjax.serve.paged import Pool

CONFIG = dataclasses.replace(PUBLISHED["llama-3-8b"], dtype="bfloat16")


@pytest.mark.parametrize("target", ["v5e:2x2", "h100"])
def test_the_serving_step_compiles_with_eight_full_length_sequences(target):
    shape = Shape()
    num_pages = 8 * shape.table_width + 1
    report = compile_step(CONFIG, aot.target(target), MESHES[target], shape, num_pages)
    assert report.fits
    pool_per_chip = num_pages * Pool.page_bytes(CONFIG, shape.page_size) / MESHES[target]
    assert report.argument_bytes > pool_per_chip  # the pool is split over the chips, not replicated
    assert report.alias_bytes >= pool_per_chip  # and donated: updated in place
    if MESHES[target] > 1:
        assert report.collectives.get("all-reduce", 0) > 0
