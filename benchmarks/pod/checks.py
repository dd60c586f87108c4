"""The pod benchmark's checks of its own approximations (full plan only): held-out compiles against the fits (full
depth, a longer context, data parallelism, a deeper compressed cache), the argument bytes against the exact shard
arithmetic, and the bisected largest batch compiled for real at full depth."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from .capacity import Decode, chip_of
from .fit import Error, predict_all, relative_errors
from .plan import Plan, Program
from .points import Point, decode_point, zipar_point
from .run import Job, Progress
from .store import CompileCache


@dataclasses.dataclass(frozen=True)
class Check:
    """A held-out compile against the prediction of the same figures."""

    point: tuple[int, int, int] | str
    relative_error: dict[str, Error]


def validation_jobs(plan: Plan) -> list[Job]:
    """Held-out compiles that check the approximations (full plan only)."""
    if not plan.validate:
        return []
    base = Program("llama-3-8b", "v5e", 4, "dense")
    small = Program("llama-3-8b", "v5e", 2, "dense")
    zipcache = Program("llama-3-8b", "v5e", 4, "zipcache-4/2")
    return [
        ("check|full-depth|L32|b8|S8192", functools.partial(decode_point, base, 32, 8, 8192)),
        ("check|context|L2|b8|S32768", functools.partial(decode_point, base, 2, 8, 32768)),
        ("check|data-parallel|2x2|L2|b16|S8192", functools.partial(decode_point, small, 2, 16, 8192, 2)),
        ("check|zipcache|L4|b8|S8192", functools.partial(decode_point, zipcache, 4, 8, 8192)),
        ("check|zipar|v5e|m4|L2|r8", functools.partial(zipar_point, "v5e", 4, 2, 8)),
    ]


def argument_check(results: dict[str, Point]) -> int:
    """The largest difference between the compiler's argument bytes and the exact shard arithmetic."""
    return max((abs(r.argument_bytes - r.exact_argument_bytes) for r in results.values()
                if r.exact_argument_bytes is not None), default=0)


def validation(plan: Plan, results: dict[str, Point], models: dict[str, Decode]) -> dict[str, Any]:
    if not plan.validate:
        return {}
    out: dict[str, Any] = {}
    base = models["llama-3-8b|v5e|m4|dense"].fit
    for key, point in (("full-depth", (32, 8, 8192)), ("context", (2, 8, 32768))):
        compiled = results[f"check|{key}|L{point[0]}|b{point[1]}|S{point[2]}"]
        out[key] = Check(point, relative_errors(predict_all(base, *point), compiled))
    small = models["llama-3-8b|v5e|m2|dense"].fit
    out["data-parallel"] = Check("2x2 mesh, batch 16 vs the 1x2 program at batch 8", relative_errors(
        predict_all(small, 2, 8, 8192), results["check|data-parallel|2x2|L2|b16|S8192"]))
    quant = models["llama-3-8b|v5e|m4|zipcache-4/2"].fit
    out["zipcache"] = Check((4, 8, 8192), relative_errors(predict_all(quant, 4, 8, 8192),
                                                          results["check|zipcache|L4|b8|S8192"]))
    out["argument_bytes_max_difference"] = argument_check(results)
    return out


def confirm_largest_batch(models: dict[str, Decode], store: CompileCache, bar_desc: str) -> dict[str, Any]:
    """Compile LLaMA-3-8B on v5e (1x4, dense, 8k) at full depth at the bisected batch and one above it."""
    model = models["llama-3-8b|v5e|m4|dense"]
    best = model.largest_batch(8192)
    out: dict[str, Any] = {"program": model.prog.key, "context": 8192, "bisected_batch": best}
    bar = Progress(2, bar_desc)
    for batch in (best, best + 1):
        predicted = model.memory(batch, 8192).total_bytes
        try:
            compiled = store.get(f"check|largest|L32|b{batch}|S8192",
                                 functools.partial(decode_point, model.prog, 32, batch, 8192))
        except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program that does not fit the chip
            out[f"batch_{batch}"] = {"predicted_total_bytes": predicted, "fits": False,
                                     "compiler": str(e).strip().splitlines()[0][:300]}
        else:
            total = compiled.argument_bytes + compiled.temp_bytes + compiled.extra_bytes
            out[f"batch_{batch}"] = {"compiled_total_bytes": total, "predicted_total_bytes": predicted,
                                     "fits": total <= chip_of("v5e").hbm_bytes}
        bar.update(f"largest batch check b={batch}")
    bar.close()
    return out
