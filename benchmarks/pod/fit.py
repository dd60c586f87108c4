"""The pod benchmark's affine fits: per-chip figures of a decode step as f = p0 + p1 b + L (q0 + q1 b + q2 b S) from
five compiled points (a compressed cache: the dense fit plus L b (c0 + c1 S) from two), and their errors against
held-out compiles."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

FITTED = ("temp_bytes", "extra_bytes", "flops", "bytes_accessed", "collective_total")
Coefficients = tuple[float, ...]  # (p0, p1, q0, q1, q2)
PointKey = tuple[int, int, int]  # (layers, batch, context)


@dataclasses.dataclass(frozen=True)
class Figures:
    """The fitted per-chip figures of one program at one point (bytes, FLOPs)."""

    temp_bytes: float
    extra_bytes: float  # outputs not aliased to the donated cache
    flops: float
    bytes_accessed: float
    collective_total: float

    @classmethod
    def combine(cls, fn: Callable[..., float], *figures: Figures) -> Figures:
        """Figure by figure, fn of the same figure of each of `figures`."""
        return cls(**{n: fn(*(getattr(f, n) for f in figures)) for n in FITTED})

    @classmethod
    def of(cls, source: object) -> Figures:
        """The fitted figures of anything that has them as attributes (a compiled point)."""
        return cls(**{n: getattr(source, n) for n in FITTED})


@dataclasses.dataclass(frozen=True)
class Fit:
    """Per figure, the coefficients (p0, p1, q0, q1, q2) of the affine model."""

    temp_bytes: Coefficients
    extra_bytes: Coefficients
    flops: Coefficients
    bytes_accessed: Coefficients
    collective_total: Coefficients


@dataclasses.dataclass(frozen=True)
class Error:
    """A prediction against a compile: (predicted - compiled) / compiled (None where compiled is 0)."""

    predicted: float
    compiled: float
    relative: float | None


def _row(layers: int, batch: int, context: int) -> list[float]:
    return [1.0, batch, layers, layers * batch, layers * batch * context]


def fit_dense(points: Mapping[PointKey, Figures]) -> Fit:
    """Per figure, (p0, p1, q0, q1, q2) of f = p0 + p1 b + L (q0 + q1 b + q2 b S), by least squares."""
    keys = sorted(points)
    design = np.array([_row(*k) for k in keys])
    return Fit(**{name: tuple(np.linalg.lstsq(design, np.array([getattr(points[k], name) for k in keys]),
                                              rcond=None)[0].tolist()) for name in FITTED})


def fit_quantized(dense: Fit, points: Mapping[PointKey, Figures]) -> Fit:
    """A compressed cache: the dense fit plus L b (c0 + c1 S), from points at two contexts."""
    (k1, k2) = sorted(points)
    out = {}
    for name in FITTED:
        deltas = [(getattr(points[k], name) - predict(dense, name, *k)) / (k[0] * k[1]) for k in (k1, k2)]
        c1 = (deltas[1] - deltas[0]) / (k2[2] - k1[2])
        c0 = deltas[0] - c1 * k1[2]
        p0, p1, q0, q1, q2 = getattr(dense, name)
        out[name] = (p0, p1, q0, q1 + c0, q2 + c1)
    return Fit(**out)


def predict(fit: Fit, name: str, layers: int, batch: int, context: int) -> float:
    return float(np.dot(getattr(fit, name), _row(layers, batch, context)))


def predict_all(fit: Fit, layers: int, batch: int, context: int) -> Figures:
    return Figures(**{n: predict(fit, n, layers, batch, context) for n in FITTED})


def relative_errors(predicted: Figures, compiled: object) -> dict[str, Error]:
    """Per figure: predicted, compiled (a compiled point's figure of the same name), and the relative error."""
    ratio = lambda p, c: round((p - c) / c, 4) if c else None
    out = {}
    for name in FITTED:
        p, c = getattr(predicted, name), getattr(compiled, name)
        out[name] = Error(p, c, ratio(p, c))
    return out


def at_full_depth(two: Figures, four: Figures, layers: int) -> Figures:
    """Figures at `layers` layers from compiles at 2 and 4 (identical layers: affine in depth)."""
    return Figures.combine(lambda a, b: a + (layers - 2) * (b - a) / 2, two, four)
