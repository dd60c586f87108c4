"""Running a pod benchmark plan: every compile as a keyed job (through the compile store, with progress on
stderr), and the per-chip programs' fits from the compiled points."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence

from .capacity import Decode
from .fit import PointKey, fit_dense, fit_quantized
from .plan import ZIPAR_ROWS, Plan
from .points import Point, decode_point, prefill_point, zipar_point
from .store import CompileCache

Job = tuple[str, Callable[[], Point]]


class Progress:
    """tqdm where it is installed, else a counter on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="compile", file=sys.stderr)
        except ImportError:
            self.bar, self.total, self.done, self.desc = None, total, 0, desc

    def update(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60])
            self.bar.update(1)
            return
        self.done += 1
        print(f"[{self.desc} {self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def dense_points(contexts: Sequence[int]) -> tuple[PointKey, ...]:
    c0, c1 = contexts[0], contexts[min(1, len(contexts) - 1)]
    return ((2, 1, c0), (2, 8, c0), (2, 8, c1), (4, 1, c0), (4, 8, c1))


def quant_points(contexts: Sequence[int]) -> tuple[PointKey, ...]:
    return ((2, 8, contexts[0]), (2, 8, contexts[-1]))


def jobs(plan: Plan) -> list[Job]:
    """Every compile of the plan as (key, thunk), in order."""
    out: list[Job] = []
    for prog in plan.decode:
        points = dense_points(plan.contexts) if prog.cache == "dense" else quant_points(plan.contexts)
        for layers, batch, context in points:
            out.append((f"decode|{prog.key}|L{layers}|b{batch}|S{context}",
                        functools.partial(decode_point, prog, layers, batch, context)))
    for model, gen, m in plan.prefill:
        for context in plan.prefill_contexts:
            for layers in (2, 4):
                out.append((f"prefill|{model}|{gen}|m{m}|L{layers}|S{context}",
                            functools.partial(prefill_point, model, gen, m, layers, context)))
    for gen, m in plan.zipar:
        for layers, rows in ((2, 1), (4, 1), (2, ZIPAR_ROWS), (4, ZIPAR_ROWS)):
            out.append((f"zipar|{gen}|m{m}|L{layers}|r{rows}", functools.partial(zipar_point, gen, m, layers, rows)))
    return out


def run_compiles(todo: Sequence[Job], store: CompileCache) -> dict[str, Point]:
    bar = Progress(len(todo), "compiling")
    results = {}
    for key, thunk in todo:
        results[key] = store.get(key, thunk)
        bar.update(f"{key} {results[key].compile_seconds:.0f}s")
    bar.close()
    return results


def decode_models(plan: Plan, results: dict[str, Point]) -> dict[str, Decode]:
    """Per program key, its fit at full depth (a compressed cache's on top of its dense program's)."""
    fits = {}
    for prog in sorted(plan.decode, key=lambda p: p.cache != "dense"):
        keys = dense_points(plan.contexts) if prog.cache == "dense" else quant_points(plan.contexts)
        points = {p: results[f"decode|{prog.key}|L{p[0]}|b{p[1]}|S{p[2]}"].figures for p in keys}
        if prog.cache == "dense":
            fits[prog.key] = fit_dense(points)
        else:
            fits[prog.key] = fit_quantized(fits[dataclasses.replace(prog, cache="dense").key], points)
    return {prog.key: Decode(prog, fits[prog.key]) for prog in plan.decode}
