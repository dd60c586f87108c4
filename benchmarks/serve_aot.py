"""The serving step compiled ahead of time for TPU and H100 at real model shapes, and how many tokens of KV each
chip's page pool holds by the compiler's own memory plan.

    python -m benchmarks.serve_aot [--targets v5e:2x2 v6e:1x1 h100] [--model llama-3-8b] [--kv dense zipcache kivi]
                                   [--dense-attention policy kernel jnp] [--layers 2 4] [--out DIR]
    python -m benchmarks.serve_aot --model llama-3-70b --targets v5e:4x4 --kv dense zipcache --layers 4 8

For each target: the step (zipjax.serve.step.serve_step: paged attention over a page pool, chunked prefill and
decode rows in one flat batch, each row's sampling; dense pages on a TPU through jax's ragged paged attention
kernel, once per KV-head shard, on an H100 / H200 through zipjax's Triton paged dense attention kernel
(zipjax.serve.gpu_paged), by the library's policy: `--dense-attention kernel jnp` forces either) is compiled
for its busiest shape (max_num_seqs decode rows and a full prefill token budget) with parameters placed by the
library's sharding rules and the pool as the engine places it on a mesh (zipjax.serve.paged.pool_shardings: pages
split by KV head over the "model" axis; where the axis does not divide the KV heads, as LLaMA-3-70B's 8 on v5e:4x4's
16 chips, KV heads over 8 and head_dim (packed pages: pages) over the remaining 2, so each chip holds 1/16 of every
pool). A first compile with a small pool measures what the program needs besides the pool (parameters, temporaries);
the pool is then sized to fill the rest of HBM (`--hbm-share` of it) and compiled again: its `fits` and the page
count give the capacity row. With `--layers A B` (LLaMA-3-70B: 80 layers do not compile in minutes on 2 cores) the
model is compiled with A and B layers at its per-layer shapes instead, what the program needs besides the pool is
extrapolated affinely in the layer count to the full depth (the parameters are exactly affine; temporaries, which
XLA reuses across layers, are overestimated), a page costs what the memory plan grows by per page at B layers,
scaled to the full depth, and the row's `fits` is that prediction (`extrapolated_from_layers` in the JSON). Use B =
8 for LLaMA-3-70B: at 4 layers XLA keeps a relayout copy of the whole pool among the temporaries (a page then costs
2x its bytes), at 8 layers it does not (1.07x). With a compressed cache (`--kv zipcache | kivi | uniform`,
zipjax.serve.packed) the pool is packed pages of 64 tokens plus the engine's default dense pool (each sequence's
unpacked tail and one prompt being computed); the packed pool is what is sized, and the pack step
(zipjax.serve.step.pack_pages) is compiled too.
Nothing runs; no accelerator is needed (zipjax.aot). serve_aot.json goes to `--out DIR` (benchmarks/report.py:
default the untracked benchmarks/results/local/; `--out benchmarks/results` refreshes the tracked table).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import report
from benchmarks.pod.points import _COLLECTIVE_LINE, _HLO_SHAPE, _array_bytes, abstract_model
from zipjax import aot, kv
from zipjax.config import PUBLISHED, ModelConfig
from zipjax.serve.cli import SERVED_KV
from zipjax.serve.engine import PACK_PAGES
from zipjax.serve.packed import PackedPool, PageCodec, page_codec
from zipjax.serve.paged import PagedCache, Pool, StepLayout, page_shards, pool_shardings
from zipjax.serve.step import StepBatch, StepOutput, choose, pack_pages, serve_step
from zipjax.transformer import Transformer

MESHES = {"v5e:2x2": 4, "v6e:1x1": 1, "v5e:4x4": 16, "h100": 1, "h200": 1}
PROBE_PAGES = 1024


@dataclasses.dataclass(frozen=True)
class Shape:
    """The serving geometry a step is compiled for."""

    max_num_seqs: int = 64
    block_size: int = 64
    prefill_blocks: int = 8
    page_size: int = 16
    block_pages: int = 8
    max_model_len: int = 8192
    kv: str = "dense"
    kernel: bool | None = None  # dense pages: the platform's paged kernel (TPU: jax's ragged paged attention; GPU:
    # zipjax's Triton kernel; None: the library's policy) or jnp

    @property
    def table_width(self) -> int:
        width = -(-self.max_model_len // self.page_size)
        return -(-width // self.block_pages) * self.block_pages


    def spec(self, config: ModelConfig) -> PageCodec | None:
        return None if self.kv == "dense" else page_codec(kv.method_from_name(self.kv), config, self.page_size)

    def dense_pages(self, spec: PageCodec) -> int:
        """The engine's default dense pool beside packed pages (zipjax.serve.engine.Engine._dense_pages)."""
        return self.max_num_seqs * (-(-spec.lag // self.page_size) + 2) + self.table_width + 1


def abstract_batch(shape: Shape, mesh, packed: bool) -> StepBatch:
    d, n, q = shape.max_num_seqs, shape.prefill_blocks, shape.block_size
    total, rows = d + n * q, d + n
    rep = NamedSharding(mesh, PartitionSpec())
    arr = lambda dims, dtype=jnp.int32: aot.array(dims, dtype, rep)
    layout = StepLayout(arr((total,)), arr((d, shape.table_width)), arr((d,)), arr((n, shape.table_width)),
                        arr((n, q)))
    if packed:
        layout = dataclasses.replace(layout, decode_packed=arr((d, shape.table_width)), decode_first=arr((d,)),
                                     prefill_packed=arr((n, shape.table_width)), prefill_first=arr((n,)))
    return StepBatch(arr((total,)), arr((total,)), layout, arr((rows,)), arr((rows,), jnp.float32), arr((rows,)),
                     arr((rows,), jnp.float32), arr((rows,), jnp.uint32), arr((rows,)), arr((), jnp.bool_))


def abstract_pool(config: ModelConfig, mesh, shape: Shape, num_pages: int):
    """The pool with `num_pages` pages (packed pages beside the default dense pool with a compressed cache), placed
    as the engine places it on `mesh`; page counts rounded up to whole shards of the page axis, as the engine does."""
    spec = shape.spec(config)
    whole = lambda n: -(-n // page_shards(mesh, config.num_kv_heads)) * page_shards(mesh, config.num_kv_heads)
    if spec is None:
        pool = jax.eval_shape(lambda: Pool.init(config, whole(num_pages), shape.page_size))
    else:
        pool = jax.eval_shape(lambda: Pool.init(config, whole(shape.dense_pages(spec)), shape.page_size, spec=spec,
                                                num_packed=whole(num_pages)))
    return aot.abstract(pool, pool_shardings(pool, mesh))


def compile_programs(config: ModelConfig, target: aot.Target, model_axis: int, shape: Shape, num_pages: int
                     ) -> tuple[list[tuple[jax.stages.Compiled, aot.Report]], Pool]:
    """The step with `num_pages` pages (packed pages with a compressed cache) and, with a compressed cache, the pack
    step: each compiled program with its report, and the abstract pool they were compiled for."""
    mesh = aot.mesh(target, 1, model_axis)
    params, _ = abstract_model(config, mesh)
    spec = shape.spec(config)
    pool = abstract_pool(config, mesh, shape, num_pages)
    step = functools.partial(served_step, config=config, block_pages=shape.block_pages, spec=spec,
                             kernel=shape.kernel)
    shardings = jax.tree.map(lambda x: x.sharding, pool)
    with jax.set_mesh(mesh):
        programs = [aot.compile(step, params, pool, abstract_batch(shape, mesh, spec is not None), target=target,
                                donate_argnums=(1,), out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())))]
        if spec is not None:
            ids = aot.array((PACK_PAGES,), jnp.int32, NamedSharding(mesh, PartitionSpec()))
            programs.append(aot.compile(lambda pool, a, b: pack_pages(pool, a, b, spec=spec), pool, ids, ids,
                                        target=target, donate_argnums=(0,), out_shardings=shardings))
    return programs, pool


def served_step(params, pool: Pool, batch: StepBatch, *, config: ModelConfig, block_pages: int,
                spec: PageCodec | None, kernel: bool | None) -> tuple[Pool, StepOutput]:
    """zipjax.serve.step.serve_step, with the dense pool's attention chosen by `kernel` (PagedCache.kernel) where it
    is not None (the engine's step leaves it to the library's policy)."""
    if kernel is None:
        return serve_step(params, pool, batch, None, config=config, block_pages=block_pages, spec=spec)
    cache = PagedCache(pool, batch.layout, block_pages, spec, kernel)
    logits, cache = Transformer(config).apply({"params": params}, batch.tokens[:, None], batch.positions[:, None],
                                              cache, rows=batch.rows)
    return cache.pool, choose(logits[:, 0], batch)


def compile_step(config: ModelConfig, target: aot.Target, model_axis: int, shape: Shape, num_pages: int
                 ) -> aot.Report:
    """The step's report (with a compressed cache, the pack step must compile too)."""
    return compile_programs(config, target, model_axis, shape, num_pages)[0][0][1]


def pool_bytes(pool) -> int:
    """Bytes of a whole (abstract) pool, over all chips."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(pool))


def collective_sizes(compiled: jax.stages.Compiled) -> list[int]:
    """Bytes of every array a collective of the compiled program produces, per chip (an async start: its output)."""
    sizes = []
    for line in compiled.as_text().splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if match:
            arrays = [_array_bytes(dtype, dims) for dtype, dims in _HLO_SHAPE.findall(match.group(1))]
            sizes += arrays[-1:] if match.group(3) else arrays
    return sizes


def page_bytes_per_chip(config: ModelConfig, shape: Shape, chips: int) -> float:
    spec = shape.spec(config)
    whole = Pool.page_bytes(config, shape.page_size) if spec is None else PackedPool.page_bytes(config, spec)
    return whole / chips  # every page split over every chip (pool_shardings)


def capacity(config: ModelConfig, target_name: str, shape: Shape, hbm_share: float,
             layers: tuple[int, int] | None = None) -> dict:
    """Compile twice (small pool, then the pool that fills the HBM left) and report the second; with `layers`,
    extrapolate from three small compiles instead (`by_layers`)."""
    target = aot.target(target_name)
    model_axis = MESHES[target_name]
    start = time.perf_counter()
    shards = page_shards(aot.mesh(target, 1, model_axis), config.num_kv_heads)
    if layers is None:
        probe = compile_step(config, target, model_axis, shape, PROBE_PAGES)
        page_bytes = page_bytes_per_chip(config, shape, model_axis)
        other = probe.total_bytes - PROBE_PAGES * page_bytes
        num_pages = int((hbm_share * target.chip.hbm_bytes - other) // page_bytes) // shards * shards
        row = {"report": compile_step(config, target, model_axis, shape, num_pages).as_dict()}
    else:
        other, page_bytes, probes = by_layers(config, target, model_axis, shape, layers)
        num_pages = int((hbm_share * target.chip.hbm_bytes - other) // page_bytes) // shards * shards
        total = other + num_pages * page_bytes
        row = {"report": {**probes[-1].as_dict(), "total_bytes": int(total), "fits": total <= target.chip.hbm_bytes},
               "extrapolated_from_layers": list(layers), "probe_reports": [r.as_dict() for r in probes],
               "plan_bytes_per_page_per_chip": page_bytes}
        page_bytes = page_bytes_per_chip(config, shape, model_axis)  # the pool's own bytes, for pool_gib_per_chip
    return {"target": target_name, "kv": shape.kv, "chips": len(target.devices), "model_axis": model_axis,
            "shape": dataclasses.asdict(shape), "num_pages": num_pages, "tokens": (num_pages - 1) * shape.page_size,
            "sequences_at_max_len": (num_pages - 1) // (shape.table_width or 1),
            "pool_gib_per_chip": num_pages * page_bytes / aot.GIB, **row, "seconds": time.perf_counter() - start}


def by_layers(config: ModelConfig, target: aot.Target, model_axis: int, shape: Shape, layers: tuple[int, int]
              ) -> tuple[float, float, list[aot.Report]]:
    """What the full-depth step needs per chip besides its pool, and per page of pool, from three compiles: A and B
    layers with PROBE_PAGES pages, B layers with twice as many. Per page: the memory plan's own growth between the
    last two (layouts pad a chip's small arrays, so it exceeds the pool's bytes / chips), scaled to the full depth;
    the rest: affine in the layer count through the first two, less their pools."""
    a, b = layers
    depth = lambda n: dataclasses.replace(config, num_layers=n)
    probes = [compile_step(depth(a), target, model_axis, shape, PROBE_PAGES),
              compile_step(depth(b), target, model_axis, shape, PROBE_PAGES),
              compile_step(depth(b), target, model_axis, shape, 2 * PROBE_PAGES)]
    per_layer_page = (probes[2].total_bytes - probes[1].total_bytes) / PROBE_PAGES / b
    rest = [p.total_bytes - n * PROBE_PAGES * per_layer_page for p, n in zip(probes[:2], layers, strict=True)]
    other = rest[1] + (rest[1] - rest[0]) / (b - a) * (config.num_layers - b)
    return other, per_layer_page * config.num_layers, probes


ATTENTION = {"policy": None, "kernel": True, "jnp": False}  # --dense-attention -> Shape.kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["v5e:2x2", "v6e:1x1", "h100"], choices=sorted(MESHES))
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(PUBLISHED))
    parser.add_argument("--hbm-share", type=float, default=0.9)
    parser.add_argument("--kv", nargs="+", default=["dense"], choices=["dense", *SERVED_KV],
                        help="page formats: dense pages of 16 tokens, or packed pages of 64")
    parser.add_argument("--dense-attention", nargs="+", default=["policy"], choices=sorted(ATTENTION),
                        help="dense pages: the library's policy (jax's ragged paged attention kernel on a TPU, "
                             "zipjax's Triton paged kernel on a GPU, where it fits, else jnp), or either forced")
    parser.add_argument("--layers", nargs=2, type=int, default=None, metavar=("A", "B"),
                        help="compile A and B layers and extrapolate to the model's depth (default: all layers)")
    report.add_out_argument(parser)
    args = parser.parse_args(argv)
    config = dataclasses.replace(PUBLISHED[args.model], dtype="bfloat16")
    rows = []
    runs = [(name, method, attention) for method in args.kv
            for attention in (args.dense_attention if method == "dense" else [None]) for name in args.targets]
    for i, (name, method, attention) in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] compiling the serving step for {name}, {method} pages"
              f"{f' ({attention} attention)' if attention else ''} ...", file=sys.stderr)
        shape = Shape(kernel=ATTENTION[attention]) if method == "dense" else Shape(page_size=64, kv=method)
        layers = None if args.layers is None else tuple(args.layers)
        extra = {} if attention is None else {"attention": attention}
        rows.append({"model": args.model, **extra, **capacity(config, name, shape, args.hbm_share, layers)})
    path = args.out / "serve_aot.json"
    rows = merged(report.previous_results(path)[0], rows)
    report.print_table(
        ["model", "target", "kv", "attention", "chips", "pages", "KV tokens", "8k seqs", "pool GiB/chip",
         "total GiB/chip", "fits"],
        [[r["model"], r["target"], r["kv"], r.get("attention", "-"), r["chips"], r["num_pages"], r["tokens"],
          r["sequences_at_max_len"], f"{r['pool_gib_per_chip']:.2f}", f"{r['report']['total_bytes'] / aot.GIB:.2f}",
          f"{r['report']['fits']}{' (extrapolated)' if 'extrapolated_from_layers' in r else ''}"]
         for r in rows], title="serving step, bf16")
    path = report.write_json(path, {"dtype": "bfloat16", "jax": jax.__version__, "rows": rows})
    print(f"wrote {report.repo_path(path)}", file=sys.stderr)
    return 0


def merged(previous: dict, rows: list[dict]) -> list[dict]:
    """This run's rows, then the earlier rows of other (model, target, kv, attention) points (a row without a model
    is from the file's top-level model: the first version wrote one model per file; a dense row without an attention
    predates the TPU kernel: its step ran the jnp path)."""
    attention = lambda r: r.get("attention", "jnp" if r["kv"] == "dense" else None)
    key = lambda r: (r.get("model", previous.get("model")), r["target"], r["kv"], attention(r))
    fresh = {key(r) for r in rows}
    kept = [{"model": key(r)[0], **r, **({"attention": attention(r)} if attention(r) else {})}
            for r in previous.get("rows", []) if key(r) not in fresh]
    return kept + rows


if __name__ == "__main__":
    sys.exit(main())

