"""The pod benchmark's command line: the compiled part (plan, compiles, fits, checks, grid, JSON, plot, tables)
and the measured part (on this process's devices), each written under `--out` (default benchmarks/results/local/;
`--out benchmarks/results` updates the tracked results)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from zipjax import aot

from .. import report
from .checks import confirm_largest_batch, validation, validation_jobs
from .grid import grid, prefill_fits, zipar_curves
from .measure import Measured, measure
from .output import plot, print_grid, print_measured, print_zipar
from .plan import ICI, SHIPPED, Plan, full_plan, quick_plan
from .run import decode_models, jobs, run_compiles
from .store import CompileCache


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What `main` wrote: the compiled part's JSON document and the measured rows (None where skipped)."""

    compiled: dict[str, Any] | None
    measured: list[Measured] | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pod",
                                     description="The pod benchmark: compiled predictions for TPU pods, and measured "
                                                 "decoding on this process's devices.")
    parser.add_argument("--quick", action="store_true", help="a small grid (the shipped model's shape), for CI")
    parser.add_argument("--measure-only", action="store_true", help="skip the compiled predictions")
    parser.add_argument("--no-measure", action="store_true", help="skip the measured part")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED, help="what the measured part loads")
    parser.add_argument("--mesh", default=None, help="DATAxMODEL mesh for the measured part (default: one device)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (every host of a pod runs the same command)")
    parser.add_argument("--batches", default="1,8", help="measured batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    report.add_out_argument(parser)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="write a jax.profiler trace of the measured part to DIR")
    return parser.parse_args(argv)


def compiled_part(plan: Plan, out: Path, quick: bool) -> dict[str, Any]:
    """Compile (or read from the store) every point of `plan`, derive the fits, checks and grid; write the JSON and
    the plot, print the tables; the JSON document."""
    name = "pod_quick" if quick else "pod_tpu_aot"
    compiles = "pod_quick_compiles.json" if quick else "pod_compiles.json"
    store = CompileCache(out / compiles, seed=report.RESULTS / compiles)
    start = time.perf_counter()
    results = run_compiles(jobs(plan) + validation_jobs(plan), store)
    models = decode_models(plan, results)
    largest = {} if quick else confirm_largest_batch(models, store, "largest-batch check")
    prefills = prefill_fits(plan, results)
    rows = grid(plan, models, prefills)
    curves = zipar_curves(plan, results)
    compile_seconds = sum(p.compile_seconds for p in store.points.values())
    payload = {
        "what": "compiled ahead of time with libtpu for described TPU topologies; predictions, nothing ran",
        "jax": jax.__version__, "plan": dataclasses.asdict(plan),
        "chips": {g: dataclasses.asdict(aot.CHIPS[g]) for g in ("v5e", "v5p", "v6e")},
        "ici_bytes_per_s": ICI, "compiles": len(store.points), "compile_seconds_total": round(compile_seconds, 1),
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
        "fits": {key: {"fit": d.fit, "layers": d.layers} for key, d in models.items()},
        "validation": {**validation(plan, results, models), "largest_batch": largest},
        "prefill": {f"{m}|{g}": v for (m, g), v in prefills.items()}, "grid": rows, "zipar": curves,
        "points": store.points,
    }
    path = report.write_json(out / f"{name}.json", payload, indent=1)
    plot(rows, curves, out / f"{name}.png")
    for context in plan.contexts:
        print_grid(rows, context)
    print_zipar(curves)
    print(f"\n{len(store.points)} compiled points ({store.compiled} compiled in this run, "
          f"{compile_seconds / 60:.1f} min of compiling in all); {path}")
    return payload


def measured_part(args: argparse.Namespace) -> list[Measured]:
    """Time decoding on this process's devices (with a profiler trace if asked); process 0 writes the JSON."""
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
    batches = [int(b) for b in args.batches.split(",")]
    new_tokens = 16 if args.quick else args.new_tokens
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(args.profile)) if args.profile else contextlib.nullcontext():
        rows = measure(args.checkpoint, batches, new_tokens, args.prompt_tokens, mesh)
    print_measured(rows)
    if jax.process_index() == 0:
        name = f"pod_measured_{jax.default_backend()}{'_quick' if args.quick else ''}.json"
        report.write_json(args.out / name, {"what": "measured on this process's devices",
                                            "checkpoint": str(args.checkpoint), "rows": rows}, indent=1)
    return rows


def main(argv: Sequence[str] | None = None) -> Outcome:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    compiled = None
    if not args.measure_only:
        compiled = compiled_part(quick_plan() if args.quick else full_plan(), args.out, args.quick)
    return Outcome(compiled, None if args.no_measure else measured_part(args))
