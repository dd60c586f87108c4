"""Compiled points of the pod benchmark by key in a JSON file, written after each compile, so an interrupted run
resumes; seeded from the tracked file of the same name, so a run into a fresh folder reuses the recorded compiles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax

from .points import Point


class CompileCache:
    """Points by "jax <version>|<key>": read from `seed` (if any) and `path`, written to `path` only."""

    def __init__(self, path: Path, seed: Path | None = None):
        self.path = path
        self.points: dict[str, Point] = {}
        for source in (seed, path):
            if source is not None and source.is_file():
                self.points.update({k: Point.from_json(v) for k, v in json.loads(source.read_text()).items()})
        self.compiled = 0

    def get(self, key: str, make: Callable[[], Point]) -> Point:
        key = f"jax {jax.__version__}|{key}"
        if key not in self.points:
            self.points[key] = make()
            self.compiled += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({k: p.to_json() for k, p in self.points.items()}, indent=1,
                                            sort_keys=True))
        return self.points[key]
