"""What every benchmark shares for its output: where results go (`--out`), a printed table, JSON and plots.

Results go to an untracked folder, benchmarks/results/local/ (in .gitignore), unless `--out DIR` names another. The
tracked results in benchmarks/results/ change only when a run asks for them by name (`--out benchmarks/results`, as
the documented commands in docs/ do), so a casual run never rewrites them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # tracked: written only when asked for with --out benchmarks/results
LOCAL = RESULTS / "local"  # untracked: every benchmark's default


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """`--out DIR`, the folder a benchmark writes its JSON and plots to (default: the untracked LOCAL)."""
    parser.add_argument("--out", type=Path, default=LOCAL, metavar="DIR",
                        help=f"folder for the JSON and plots (default: {LOCAL.relative_to(ROOT)}, untracked; "
                             f"{RESULTS.relative_to(ROOT)} updates the tracked results)")


def previous_results(path: Path) -> tuple[dict[str, Any], Path]:
    """An earlier run's results for `path` and where they were read: the file itself, else the tracked file of the
    same name (so a run into a fresh folder still keeps the sections it skips); ({}, path) where neither exists."""
    for candidate in (path, RESULTS / path.name):
        if candidate.is_file():
            return json.loads(candidate.read_text()), candidate
    return {}, path


def write_json(path: Path, payload: Any, *, indent: int = 2) -> Path:
    """`payload` as JSON at `path` (folders made). Records (dataclasses) are written by their `to_json()` where they
    have one, else field by field; numpy scalars and arrays as numbers and lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}  # shallow: nested to_json counts
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return float(value)


def repo_path(path: Path) -> str:
    """`path` relative to the repository root where it lies inside it (as results record their plots), else whole."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save_plot(figure: Any, path: Path, *, dpi: int = 120) -> Path:
    """A matplotlib figure (saved, then closed) or a Pillow image at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(figure, "savefig"):
        import matplotlib.pyplot as plt

        figure.savefig(path, dpi=dpi)
        plt.close(figure)
    else:
        figure.save(path)
    return path


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                 specs: Sequence[str] | None = None) -> list[str]:
    """The lines of a table: Markdown (`| a | b |`), or fixed-width columns where `specs` gives each column's format
    spec (e.g. "<12", ">8"; header and cells alike, cells formatted by the caller). A fixed-width row with fewer cells
    than columns ends with its last cell unpadded (a note spanning the rest)."""
    lines = [] if title is None else [title]
    if specs is None:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        return lines
    return lines + [_fixed(header, specs)] + [_fixed(row, specs) for row in rows]


def _fixed(cells: Sequence[Any], specs: Sequence[str]) -> str:
    padded = [format(str(cell), spec) for cell, spec in zip(cells, specs, strict=False)]
    if len(cells) < len(specs):
        padded[-1] = str(cells[-1])
    return " ".join(padded)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                specs: Sequence[str] | None = None) -> None:
    """A blank line, the title if any, then the table (see `format_table`) on stdout."""
    print()
    for line in format_table(header, rows, title=title, specs=specs):
        print(line)
