"""The pod benchmark's printed tables (compiled predictions per context, the measured rows, ZipAR) and its plot
(Pillow: sequences per chip against context, ZipAR pass time against active rows)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from ..report import print_table, save_plot
from .grid import GridRow, ZiparCheck, ZiparCurve
from .measure import Measured
from .plan import GIB

GRID_HEADER = ("model", "topology", "cache", "mesh", "batch", "GiB", "step ms", "bound", "tok/s/chip", "tok/s/pod",
               "TTFT ms")
GRID_SPECS = ("<12", "<8", "<13", ">5", ">5", ">6", ">8", ">10", ">10", ">10", ">8")
MEASURED_HEADER = ("batch", "device", "TTFT ms", "p50 ms", "p99 ms", "tok/s/chip", "roofline ms", "MBU")
MEASURED_SPECS = (">5", ">12", ">9", ">8", ">8", ">11", ">11", ">6")


def print_grid(rows: list[GridRow], context: int) -> None:
    print_table(GRID_HEADER, [_grid_cells(row) for row in rows if row.context == context], specs=GRID_SPECS,
                title=f"compiled predictions, context {context}: best mesh per topology and cache (per chip; roofline)")


def _grid_cells(row: GridRow) -> list[str]:
    best = row.best
    if best is None or best.step is None:
        tried = ", ".join(o.mesh for o in row.meshes)
        why = f"does not fit on any compiled mesh ({tried})" if tried else "not compiled for this topology"
        return [row.model, row.topology, row.cache, why]
    step = best.step
    ttft = f"{best.ttft.ttft_s * 1e3:.3g}" if best.ttft else "-"
    return [row.model, row.topology, row.cache, best.mesh, str(best.largest_batch_per_replica),
            f"{step.total_bytes / GIB:.2f}", f"{step.step_s * 1e3:.2f}", step.bound, f"{best.tok_s_per_chip:.0f}",
            f"{best.tok_s_per_pod:.0f}", ttft]


def print_measured(rows: Iterable[Measured]) -> None:
    cells = []
    for r in rows:
        roof = f"{r.roofline_step_s * 1e3:.3f}" if r.roofline_step_s else "n/a"
        mbu = f"{r.mbu:.2f}" if r.mbu is not None else "n/a"
        cells.append([r.batch, r.device[:12], f"{r.ttft_s * 1e3:.2f}", f"{r.p50_s * 1e3:.3f}", f"{r.p99_s * 1e3:.3f}",
                      f"{r.tok_s_per_chip:.1f}", roof, mbu])
    print_table(MEASURED_HEADER, cells, specs=MEASURED_SPECS, title="measured (this process's devices)")


def print_zipar(curves: list[ZiparCurve | ZiparCheck]) -> None:
    for c in curves:
        if isinstance(c, ZiparCurve):
            print(f"ZipAR pass, Emu3-Gen 90x90 + guidance, {c.gen} (model axis {c.m}): "
                  f"{c.pass_s_rows_1 * 1e3:.2f} ms at 1 row, {c.pass_s_rows_90 * 1e3:.2f} ms at 90 rows; "
                  f"compute-bound from {c.first_compute_bound_rows or 'more than 90'} active rows")


COLORS = {"dense": (31, 119, 180), "zipcache-4/2": (214, 39, 40), "kivi-2": (44, 160, 44),
          "v5e": (31, 119, 180), "v5p": (214, 39, 40), "v6e": (44, 160, 44)}
Series = dict[str, list[tuple[float, float]]]


def plot(rows: list[GridRow], curves: list[ZiparCurve | ZiparCheck], path: Path) -> None:
    """Two panels drawn with Pillow: sequences per chip that fit against context, per cache, for each model's
    best-covered topology; ZipAR pass time against active rows per chip generation."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1200, 520), "white")
    draw = ImageDraw.Draw(image)
    series: Series = {}
    for row in rows:
        if row.topology not in ("v5e-16", "v5e-4") or not row.meshes:
            continue
        best = max(o.sequences_per_chip for o in row.meshes)
        series.setdefault(f"{row.model} {row.topology} {row.cache}", []).append((math.log2(row.context), best))
    _panel(draw, (60, 40, 560, 440), series, "log2 context", "sequences per chip that fit (best mesh)")
    zipar = {f"ZipAR {c.gen}": [(p.rows, p.step_s * 1e3) for p in c.curve] for c in curves
             if isinstance(c, ZiparCurve)}
    _panel(draw, (680, 40, 1180, 440), zipar, "active rows", "predicted pass ms (Emu3-Gen)")
    save_plot(image, path)


def _panel(draw, box: tuple[int, int, int, int], series: Series, xlabel: str, ylabel: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    draw.text((x0, y1 + 8), xlabel, fill="black")
    draw.text((x0, y0 - 16), ylabel, fill="black")
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((x0 + 10, y0 + 10), "nothing compiled for this panel", fill="black")
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lo_x, hi_x, hi_y = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, max(max(ys), 1e-9) * 1.1
    scale = lambda x, y: (x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - y / hi_y * (y1 - y0))
    draw.text((x0 - 50, y0), f"{hi_y:.3g}", fill="black")
    draw.text((x0 - 20, y1 - 10), "0", fill="black")
    draw.text((x1 - 30, y1 + 8), f"{hi_x:.3g}", fill="black")
    for i, (name, values) in enumerate(sorted(series.items())):
        color = next((c for key, c in COLORS.items() if name.endswith(key) or f" {key}" in name), (100, 100, 100))
        shade = tuple(min(255, c + 40 * (i % 3)) for c in color)
        draw.line([scale(x, y) for x, y in sorted(values)], fill=shade, width=2)
        draw.text((x0 + 8, y0 + 8 + 14 * i), name, fill=shade)
