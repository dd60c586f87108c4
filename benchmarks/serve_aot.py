"""The serving step compiled ahead of time for TPU and H100 at real model shapes, and how many tokens of KV each
chip's page pool holds by the compiler's own memory plan.

    python -m benchmarks.serve_aot [--targets v5e:2x2 v6e:1x1 h100] [--model llama-3-8b] [--kv dense zipcache kivi]
                                   [--out DIR]

For each target: the step (zipjax.serve.step.serve_step: paged attention over a page pool, chunked prefill and
decode rows in one flat batch, each row's sampling) is compiled for its busiest shape (max_num_seqs decode rows and
a full prefill token budget) with parameters and pool placed by the library's sharding rules (pool pages split by
KV head over the "model" axis, by head_dim where the axis does not divide the KV heads). A first compile with a
small pool measures what the program needs besides the pool (parameters, temporaries); the pool is then sized to
fill the rest of HBM (`--hbm-share` of it) and compiled again: its `fits` and the page count give the capacity row.
With a compressed cache (`--kv zipcache | kivi | uniform`, zipjax.serve.packed) the pool is packed pages of 64
tokens plus the engine's default dense pool (each sequence's unpacked tail and one prompt being computed); the
packed pool is what is sized, and the pack step (zipjax.serve.step.pack_pages) is compiled too.
Nothing runs; no accelerator is needed (zipjax.aot). serve_aot.json goes to `--out DIR` (benchmarks/report.py:
default the untracked benchmarks/results/local/; `--out benchmarks/results` refreshes the tracked table).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import report
from benchmarks.pod.points import abstract_model
from zipjax import aot, kv
from zipjax.config import PUBLISHED, ModelConfig
from zipjax.serve.cli import SERVED_KV
from zipjax.serve.engine import PACK_PAGES
from zipjax.serve.packed import PackedPool, PageCodec, page_codec
from zipjax.serve.paged import Pool, StepLayout
from zipjax.serve.step import StepBatch, pack_pages, serve_step
from zipjax.sharding import tree_shardings

MESHES = {"v5e:2x2": 4, "v6e:1x1": 1, "v5e:4x4": 16, "h100": 1, "h200": 1}


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


def compile_step(config: ModelConfig, target: aot.Target, model_axis: int, shape: Shape, num_pages: int
                 ) -> aot.Report:
    """The step with `num_pages` pages (packed pages with a compressed cache); with one, the pack step must
    compile too."""
    mesh = aot.mesh(target, 1, model_axis)
    params, _ = abstract_model(config, mesh)
    spec = shape.spec(config)
    if spec is None:
        pool = jax.eval_shape(lambda: Pool.init(config, num_pages, shape.page_size))
    else:
        pool = jax.eval_shape(lambda: Pool.init(config, shape.dense_pages(spec), shape.page_size, spec=spec,
                                                num_packed=num_pages))
    pool = aot.abstract(pool, tree_shardings(pool, pool.logical_axes(), mesh))
    step = lambda p, pool, batch: serve_step(p, pool, batch, None, config=config, block_pages=shape.block_pages,
                                             spec=spec)
    with jax.set_mesh(mesh):
        _, report = aot.compile(step, params, pool, abstract_batch(shape, mesh, spec is not None), target=target,
                                donate_argnums=(1,))
        if spec is not None:
            ids = aot.array((PACK_PAGES,), jnp.int32, NamedSharding(mesh, PartitionSpec()))
            aot.compile(lambda pool, a, b: pack_pages(pool, a, b, spec=spec), pool, ids, ids, target=target,
                        donate_argnums=(0,))
    return report


def capacity(config: ModelConfig, target_name: str, shape: Shape, hbm_share: float) -> dict:
    """Compile twice (small pool, then the pool that fills the HBM left) and report the second."""
    target = aot.target(target_name)
    model_axis = MESHES[target_name]
    probe_pages = 1024
    start = time.perf_counter()
    probe = compile_step(config, target, model_axis, shape, probe_pages)
    spec = shape.spec(config)
    page_bytes = (Pool.page_bytes(config, shape.page_size) if spec is None
                  else PackedPool.page_bytes(config, spec)) / model_axis  # per chip: pages split over "model"
    pool_bytes = probe_pages * page_bytes
    room = hbm_share * target.chip.hbm_bytes - (probe.total_bytes - pool_bytes)
    num_pages = int(room // page_bytes)
    report = compile_step(config, target, model_axis, shape, num_pages)
    return {"target": target_name, "kv": shape.kv, "chips": len(target.devices), "model_axis": model_axis,
            "shape": dataclasses.asdict(shape), "num_pages": num_pages, "tokens": (num_pages - 1) * shape.page_size,
            "sequences_at_max_len": (num_pages - 1) // (shape.table_width or 1),
            "pool_gib_per_chip": num_pages * page_bytes / aot.GIB, "report": report.as_dict(),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["v5e:2x2", "v6e:1x1", "h100"], choices=sorted(MESHES))
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(PUBLISHED))
    parser.add_argument("--hbm-share", type=float, default=0.9)
    parser.add_argument("--kv", nargs="+", default=["dense"], choices=["dense", *SERVED_KV],
                        help="page formats: dense pages of 16 tokens, or packed pages of 64")
    report.add_out_argument(parser)
    args = parser.parse_args(argv)
    config = dataclasses.replace(PUBLISHED[args.model], dtype="bfloat16")
    rows = []
    runs = [(name, method) for method in args.kv for name in args.targets]
    for i, (name, method) in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] compiling the serving step for {name}, {method} pages ...", file=sys.stderr)
        shape = Shape() if method == "dense" else Shape(page_size=64, kv=method)
        rows.append(capacity(config, name, shape, args.hbm_share))
    report.print_table(
        ["target", "kv", "chips", "pages", "KV tokens", "8k seqs", "pool GiB/chip", "total GiB/chip", "fits"],
        [[r["target"], r["kv"], r["chips"], r["num_pages"], r["tokens"], r["sequences_at_max_len"],
          f"{r['pool_gib_per_chip']:.2f}", f"{r['report']['total_bytes'] / aot.GIB:.2f}", r["report"]["fits"]]
         for r in rows], title=f"serving step, {args.model} bf16")
    path = report.write_json(args.out / "serve_aot.json", {"model": args.model, "dtype": "bfloat16",
                                                           "jax": jax.__version__, "rows": rows})
    print(f"wrote {report.repo_path(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

