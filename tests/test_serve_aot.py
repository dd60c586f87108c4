"""The serving step compiles ahead of time for a TPU pod slice and an H100 at LLaMA-3-8B shapes (bf16, 64 decode
rows plus 8 prefill blocks of 64 tokens, 8k-token page tables) with a pool of eight full-length sequences, and the
compiler's memory plan fits the chip: the CPU proves nothing about XLA:TPU or XLA:GPU. On a TPU the dense pages are
read by jax's ragged paged attention kernel (zipjax.serve.ragged), one Mosaic call per layer and KV-head shard. The
capacity table (the pool sized to fill each chip) is benchmarks/serve_aot.py's."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.serve_aot import MESHES, Shape, compile_programs, compile_step
from zipjax import aot
from zipjax.config import PUBLISHED
from zipjax.serve.packed import PackedPool
from zipjax.serve.paged import Pool

CONFIG = dataclasses.replace(PUBLISHED["llama-3-8b"], dtype="bfloat16")


def mosaic_calls(compiled) -> int:
    """Calls of jax's ragged paged attention kernel in a compiled program."""
    lines = compiled.as_text().splitlines()
    return sum("tpu_custom_call" in line and "ragged_paged_attention" in line for line in lines)


@pytest.mark.parametrize("target", ["v5e:2x2", "h100"])
def test_the_serving_step_compiles_with_eight_full_length_sequences(target):
    shape = Shape()
    num_pages = 8 * shape.table_width + 1
    (compiled, report), = compile_programs(CONFIG, aot.target(target), MESHES[target], shape, num_pages)[0]
    assert report.fits
    assert mosaic_calls(compiled) == (CONFIG.num_layers if target.startswith("v") else 0)  # the TPU kernel
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


def test_the_ragged_kernel_runs_per_kv_head_shard_with_fewer_temporaries_than_jnp():
    """One of LLaMA-3-8B's layers at the full geometry: on v5e:2x2 (8 KV heads over 4 chips: the kernel in a
    shard_map over "model") the kernel's step moves nothing the jnp path's step does not (the same collectives), holds
    the same donated pool, and needs fewer temporaries (at 4 layers: 33 MiB against 111); on v6e:1x1 it compiles as
    is. benchmarks/serve_aot.py --dense-attention kernel jnp gives the full-depth figures."""
    config = dataclasses.replace(CONFIG, num_layers=1)
    shape = Shape()
    num_pages = 8 * shape.table_width + 1
    (kernel, with_kernel), = compile_programs(config, aot.target("v5e:2x2"), 4, shape, num_pages)[0]
    (jnp_step, without), = compile_programs(config, aot.target("v5e:2x2"), 4, dataclasses.replace(shape, kernel=False),
                                            num_pages)[0]
    assert mosaic_calls(kernel) == 1 and mosaic_calls(jnp_step) == 0
    assert with_kernel.collectives == without.collectives
    assert with_kernel.alias_bytes == without.alias_bytes
    assert with_kernel.temp_bytes < without.temp_bytes
    (single, report), = compile_programs(config, aot.target("v6e:1x1"), 1, shape, num_pages)[0]
    assert mosaic_calls(single) == 1 and report.fits
