"""The pod benchmark's derived grid: per model x topology x cache x context, every (data x model) mesh the compiled
programs cover, with the largest batch that fits, the roofline step, tok/s per chip and pod, and TTFT; the best mesh
of each; and ZipAR's pass time against the number of active rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from .capacity import Decode, Roofline, Step, roofline
from .fit import Error, Figures, at_full_depth, relative_errors
from .plan import CACHES, MODELS, ZIPAR_ROWS, Plan, chips_of, gen_of, model_config
from .points import Point, attention_path


@dataclasses.dataclass(frozen=True)
class PrefillFit:
    """A prefill's full-depth figures per context, compiled on a reference m-way model axis."""

    m: int
    contexts: dict[int, dict[str, float]]  # context -> flops, bytes_accessed, collective_total, temp_bytes


@dataclasses.dataclass(frozen=True)
class Ttft:
    ttft_s: float
    bound: str
    reference_m: int


@dataclasses.dataclass(frozen=True)
class MeshOption:
    """One (data x model) mesh for a grid row: the largest batch per replica that fits and, where one does, its
    step and throughput."""

    mesh: str
    data: int
    model: int
    largest_batch_per_replica: int
    sequences_per_chip: float
    global_batch: int
    attention: str
    step: Step | None = None
    tok_s_per_chip: float = 0.0
    tok_s_per_pod: float = 0.0
    ideal_tok_s_per_chip: float = 0.0
    batch1_step_s: float = 0.0
    ttft: Ttft | None = None

    def to_json(self) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(self)]
        return {n: getattr(self, n) for n in (names if self.step is not None else names[:names.index("step")])}


@dataclasses.dataclass(frozen=True)
class GridRow:
    model: str
    topology: str
    chips: int
    cache: str
    context: int
    meshes: tuple[MeshOption, ...]
    best_mesh: str | None

    @property
    def best(self) -> MeshOption | None:
        return next((o for o in self.meshes if o.mesh == self.best_mesh), None)


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    rows: int
    compute_s: float
    memory_s: float
    collective_s: float
    step_s: float
    bound: str


@dataclasses.dataclass(frozen=True)
class ZiparCurve:
    """A ZipAR pass of Emu3-Gen on one chip generation, per number of active rows."""

    gen: str
    m: int
    curve: tuple[CurvePoint, ...]
    first_compute_bound_rows: int | None
    pass_s_rows_1: float
    pass_s_rows_90: float


@dataclasses.dataclass(frozen=True)
class ZiparCheck:
    """The held-out ZipAR pass against the affine prediction in rows."""

    check: str
    relative_error: dict[str, Error]


def meshes(topology: str, model: str, cache: str, models: dict[str, Decode]) -> list[tuple[int, int, Decode]]:
    """(data, model, program) for every compiled per-chip program whose m divides the topology's chips."""
    gen, chips = gen_of(topology), chips_of(topology)
    found = [(chips // d.prog.m, d.prog.m, d) for d in models.values()
             if d.prog.model == model and d.prog.gen == gen and d.prog.cache == cache and chips % d.prog.m == 0]
    return sorted(found, key=lambda x: x[1])


def prefill_fits(plan: Plan, results: dict[str, Point]) -> dict[tuple[str, str], PrefillFit]:
    """Per (model, gen): the reference m and, per context, full-depth figures (affine in layers)."""
    out = {}
    for model, gen, m in plan.prefill:
        full = model_config(model).num_layers
        per_context = {}
        for context in plan.prefill_contexts:
            two, four = (results[f"prefill|{model}|{gen}|m{m}|L{layers}|S{context}"].figures for layers in (2, 4))
            f = at_full_depth(two, four, full)
            per_context[context] = {name: getattr(f, name)
                                    for name in ("flops", "bytes_accessed", "collective_total", "temp_bytes")}
        out[(model, gen)] = PrefillFit(m, per_context)
    return out


def ttft(prefills: dict[tuple[str, str], PrefillFit], model: str, gen: str, m: int, context: int) -> Ttft | None:
    """Roofline TTFT on an m-way model axis of `gen`: the reference program's per-chip FLOPs and bytes scaled by
    m_ref / m (collective bytes kept), from the v5e compile where that generation has none (same HLO)."""
    ref = prefills.get((model, gen)) or prefills.get((model, "v5e"))
    if ref is None or context not in ref.contexts:
        return None
    f, scale = ref.contexts[context], ref.m / m
    out = roofline(f["flops"] * scale, f["bytes_accessed"] * scale, f["collective_total"], gen)
    return Ttft(out.step_s, out.bound, ref.m)


def mesh_option(program: Decode, data: int, m: int, chips: int, context: int, ttft_: Ttft | None) -> MeshOption:
    best = program.largest_batch(context)
    option = MeshOption(f"{data}x{m}", data, m, best, best / m, best * data, attention_path(program.prog.cache, m))
    if not best:
        return option
    step = program.step(best, context)
    per_chip = best / (m * step.step_s)
    return dataclasses.replace(option, step=step, tok_s_per_chip=per_chip, tok_s_per_pod=per_chip * chips,
                               ideal_tok_s_per_chip=best / (m * step.ideal_step_s),
                               batch1_step_s=program.step(1, context).step_s, ttft=ttft_)


def grid(plan: Plan, models: dict[str, Decode], prefills: dict[tuple[str, str], PrefillFit]) -> list[GridRow]:
    rows = []
    names = sorted({p.model for p in plan.decode}, key=lambda n: MODELS.index(n) if n in MODELS else -1)
    for model in names:
        for topology in plan.topologies:
            gen, chips = gen_of(topology), chips_of(topology)
            for cache in CACHES:
                for context in plan.contexts:
                    options = tuple(mesh_option(program, data, m, chips, context,
                                                ttft(prefills, model, gen, m, context))
                                    for data, m, program in meshes(topology, model, cache, models))
                    fitting = [o for o in options if o.largest_batch_per_replica]
                    best_mesh = max(fitting, key=lambda o: (o.tok_s_per_chip, -o.model), default=None)
                    rows.append(GridRow(model, topology, chips, cache, context, options,
                                        best_mesh.mesh if best_mesh else None))
    return rows


def zipar_curves(plan: Plan, results: dict[str, Point]) -> list[ZiparCurve | ZiparCheck]:
    """Per generation: pass time against active rows (1..90) at full depth, and where it stops being
    bandwidth-bound; with the full plan, the check of affinity in rows at r = 8."""
    out: list[ZiparCurve | ZiparCheck] = []
    full = model_config("emu3-gen").num_layers
    for gen, m in plan.zipar:
        at = {rows: at_full_depth(*(results[f"zipar|{gen}|m{m}|L{layers}|r{rows}"].figures for layers in (2, 4)),
                                  full) for rows in (1, ZIPAR_ROWS)}
        slope = Figures.combine(lambda hi, lo: (hi - lo) / (ZIPAR_ROWS - 1), at[ZIPAR_ROWS], at[1])
        curve = []
        for rows in range(1, ZIPAR_ROWS + 1):
            f = Figures.combine(lambda a, s, r=rows: a + s * (r - 1), at[1], slope)
            curve.append(_curve_point(rows, roofline(f.flops, f.bytes_accessed, f.collective_total, gen)))
        compute_bound = next((c.rows for c in curve if c.bound == "compute"), None)
        out.append(ZiparCurve(gen, m, tuple(curve), compute_bound, curve[0].step_s, curve[-1].step_s))
    if plan.validate:
        two_1, two_90 = results["zipar|v5e|m4|L2|r1"].figures, results["zipar|v5e|m4|L2|r90"].figures
        predicted = Figures.combine(lambda a, b: a + (b - a) * 7 / 89, two_1, two_90)
        out.append(ZiparCheck("affine in rows at r=8 (v5e, m4, 2 layers)",
                         relative_errors(predicted, results["check|zipar|v5e|m4|L2|r8"])))
    return out


def _curve_point(rows: int, time: Roofline) -> CurvePoint:
    return CurvePoint(rows, **dataclasses.asdict(time))

