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
from zipjax.serve.packed import PackedPool
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


def test_the_packed_step_and_the_pack_step_compile_for_a_tpu_slice(method="zipcache"):
    """Packed pages (zipjax.serve.packed) beside the dense tail pool, split by KV head over v5e:2x2, donated. Four
    of LLaMA-3-8B's layers at its per-layer shapes, and a shorter geometry than above (16 decode rows, 2 prefill
    blocks, 2k-token tables), keep the compile to a minute on 2 cores; benchmarks/serve_aot.py --kv compiles all 32
    layers at full size, KIVI's pages too."""
    config = dataclasses.replace(CONFIG, num_layers=4)
    shape = Shape(max_num_seqs=16, prefill_blocks=2, page_size=64, max_model_len=2048, kv=method)
    spec = shape.spec(config)
    num_pages = 32 * shape.table_width + 1
    report = compile_step(config, aot.target("v5e:2x2"), MESHES["v5e:2x2"], shape, num_pages)
    assert report.fits
    packed_per_chip = num_pages * PackedPool.page_bytes(config, spec) / MESHES["v5e:2x2"]
    assert report.alias_bytes >= packed_per_chip  # split over the chips and donated
    assert packed_per_chip < 0.35 * num_pages * Pool.page_bytes(config, 64) / MESHES["v5e:2x2"]
