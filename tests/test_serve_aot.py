"""The serving step compiles ahead of time for a TPU pod slice and an H100 at LLaMA-3-8B shapes (bf16, 64 decode
rows plus 8 prefill blocks of 64 tokens, 8k-token page tables) with a pool of eight full-length sequences, and the
compiler's memory plan fits the chip: the CPU proves nothing about XLA:TPU or XLA:GPU. On a TPU the dense pages are
read by jax's ragged paged attention kernel (zipjax.serve.ragged), one Mosaic call per layer and KV-head shard. The
capacity table (the pool sized to fill each chip) is benchmarks/serve_aot.py's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.pod.points import abstract_model
from benchmarks.serve_aot import MESHES, Shape, abstract_batch, abstract_pool, compile_programs, compile_step
from zipjax import aot
from zipjax.config import PUBLISHED, ModelConfig
from zipjax.serve.packed import PackedPool
from zipjax.serve.paged import PagedCache, Pool
from zipjax.transformer import Transformer

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


def compile_forward(config: ModelConfig, target: str, model_axis: int, shape: Shape, num_pages: int
                    ) -> tuple[jax.stages.Compiled, aot.Report]:
    """The serving step up to its greedy tokens (benchmarks.serve_aot.served_step, the dense pool's attention by
    `shape.kernel`, less the sampling): the same placed parameters, donated pool and flat batch."""
    target = aot.target(target)
    mesh = aot.mesh(target, 1, model_axis)
    params, _ = abstract_model(config, mesh)
    pool = abstract_pool(config, mesh, shape, num_pages)

    def forward(params, pool: Pool, batch):
        cache = PagedCache(pool, batch.layout, shape.block_pages, None, shape.kernel)
        logits, cache = Transformer(config).apply({"params": params}, batch.tokens[:, None],
                                                  batch.positions[:, None], cache, rows=batch.rows)
        return cache.pool, jnp.argmax(logits[:, 0], axis=-1)  # [rows]

    out = (jax.tree.map(lambda x: x.sharding, pool), NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        return aot.compile(forward, params, pool, abstract_batch(shape, mesh, False), target=target,
                           donate_argnums=(1,), out_shardings=out)


def test_the_ragged_kernel_runs_per_kv_head_shard_with_fewer_temporaries_than_jnp():
    """One of LLaMA-3-8B's layers, the step up to its greedy tokens (the sampling, the same code on either path and
    most of an XLA:TPU compile's time, is left out; the eight-sequence test above compiles the whole step with the
    kernel at the full geometry). On v5e:2x2 (8 KV heads over 4 chips: the kernel in a shard_map over "model"), at
    the packed test's short geometry, the kernel's step moves nothing the jnp path's step does not (the same
    collectives), holds the same donated pool, and needs fewer temporaries (the whole step at 4 layers and the full
    geometry: 33 MiB against 111); on v6e:1x1 it compiles as is at the full geometry (64 rows of 8k-token page
    tables). benchmarks/serve_aot.py --dense-attention kernel jnp gives the full-depth figures of the whole step."""
    config = dataclasses.replace(CONFIG, num_layers=1)
    short = Shape(max_num_seqs=16, prefill_blocks=2, max_model_len=2048)
    num_pages = 8 * short.table_width + 1
    kernel, with_kernel = compile_forward(config, "v5e:2x2", 4, short, num_pages)  # the policy: the kernel
    jnp_step, without = compile_forward(config, "v5e:2x2", 4, dataclasses.replace(short, kernel=False), num_pages)
    assert mosaic_calls(kernel) == 1 and mosaic_calls(jnp_step) == 0
    assert with_kernel.collectives == without.collectives
    assert with_kernel.alias_bytes == without.alias_bytes
    assert with_kernel.temp_bytes < without.temp_bytes
    shape = Shape()
    single, report = compile_forward(config, "v6e:1x1", 1, shape, 8 * shape.table_width + 1)
    assert mosaic_calls(single) == 1 and report.fits
