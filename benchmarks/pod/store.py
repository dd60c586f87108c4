"""Compiled points of the pod benchmark by key in a JSON file, written after each compile, so an interrupted run
resumes; seeded from the tracked file of the same name, so a run into a fresh folder reuses the recorded compiles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax

from .points import Point


class CompileCache:
    """Points by "jax <version>|<key>": those of this jax version in `seed` (if any), and all of `path`; written to
    `path` only."""

    def __init__(self, path: Path, seed: Path | None = None):
        self.path = path
        self.points: dict[str, Point] = {}
        if seed is not None and seed.resolve() != path.resolve():
            self.points.update({k: p for k, p in _read(seed).items() if k.startswith(_prefix())})
        self.points.update(_read(path))
        self.compiled = 0

    def get(self, key: str, make: Callable[[], Point]) -> Point:
        key = f"{_prefix()}{key}"
        if key not in self.points:
            self.points[key] = make()
            self.compiled += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({k: p.to_json() for k, p in self.points.items()}, indent=1,
                                            sort_keys=True))
        return self.points[key]


def _prefix() -> str:
    return f"jax {jax.__version__}|"


def _read(path: Path) -> dict[str, Point]:
    return {k: Point.from_json(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
