"""What a per-chip program holds and costs at full depth: the exact argument bytes (weights, cache), the memory
plan against the chip's HBM, the largest batch that fits, and the roofline time of a step."""

from __future__ import annotations

import dataclasses
import functools

from zipjax import aot

from .fit import FITTED, Figures, Fit, predict
from .plan import ICI, MAX_BATCH, Program, config_of, host, model_config
from .points import _shard_bytes, abstract_cache, abstract_model


@functools.cache
def exact_arguments(model: str, gen: str, m: int, cache: str, batch: int, context: int) -> tuple[int, int]:
    """(weights, cache) bytes one chip holds at full depth on a (1, m) mesh: exact, from shapes and shardings. Both
    are affine in the layer count with identical layers, so two shallow evaluations give the full depth."""
    full = model_config(model).num_layers
    mesh = aot.mesh(host(gen, m), 1, m)
    weights, caches = [], []
    for layers in (1, 2):
        config = config_of(model, layers)
        params, param_sh = abstract_model(config, mesh)
        shapes, shardings = abstract_cache(config, cache, batch, context, mesh)
        weights.append(_shard_bytes(params, param_sh))
        caches.append(_shard_bytes(shapes, shardings))
    return (weights[0] + (full - 1) * (weights[1] - weights[0]), caches[0] + (full - 1) * (caches[1] - caches[0]))


def chip_of(gen: str) -> aot.Chip:
    return aot.CHIPS[gen]


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Seconds of a step bound by each resource, and the step: the largest (they overlap perfectly)."""

    compute_s: float
    memory_s: float
    collective_s: float
    step_s: float
    bound: str  # "compute", "memory" or "collective"


def roofline(flops: float, bytes_accessed: float, collective: float, gen: str) -> Roofline:
    chip = chip_of(gen)
    times = {"compute_s": flops / chip.bf16_flops, "memory_s": bytes_accessed / chip.hbm_bandwidth,
             "collective_s": collective / ICI[gen]}
    bound = max(times, key=times.get)
    return Roofline(**times, step_s=times[bound], bound=bound.removesuffix("_s"))


@dataclasses.dataclass(frozen=True)
class Memory:
    """A chip's memory plan at one (batch, context): exact arguments plus fitted temporaries, against its HBM."""

    weights_bytes: int
    cache_bytes: int
    temp_bytes: float
    total_bytes: float
    fits: bool


@dataclasses.dataclass(frozen=True)
class Step:
    """A decode step at one (batch, context): the roofline on exact HBM bytes, the fitted figures, the memory plan,
    and the roofline on XLA's own byte count beside it (xla_*)."""

    compute_s: float
    memory_s: float
    collective_s: float
    step_s: float
    bound: str
    temp_bytes: float
    extra_bytes: float
    flops: float
    bytes_accessed: float
    collective_total: float
    weights_bytes: int
    cache_bytes: int
    total_bytes: float
    fits: bool
    ideal_step_s: float
    xla_step_s: float
    xla_bound: str


@dataclasses.dataclass(frozen=True)
class Decode:
    """Fitted figures of a per-chip program at full depth."""

    prog: Program
    fit: Fit

    @property
    def layers(self) -> int:
        return model_config(self.prog.model).num_layers

    def figures(self, batch: int, context: int) -> Figures:
        return Figures(**{n: max(0.0, predict(self.fit, n, self.layers, batch, context)) for n in FITTED})

    def memory(self, batch: int, context: int) -> Memory:
        weights, cache = exact_arguments(*dataclasses.astuple(self.prog), batch, context)
        f = self.figures(batch, context)
        total = weights + cache + batch * 4 + f.temp_bytes + f.extra_bytes
        return Memory(weights, cache, f.temp_bytes, total, total <= chip_of(self.prog.gen).hbm_bytes)

    def step(self, batch: int, context: int) -> Step:
        """The roofline step: FLOPs and collective bytes as compiled (fitted), HBM bytes the exact weights + cache
        per chip (XLA's byte count, whose fit extrapolates worst in depth, is kept beside it as xla_step_s)."""
        f = self.figures(batch, context)
        memory = self.memory(batch, context)
        out = roofline(f.flops, memory.weights_bytes + memory.cache_bytes, f.collective_total, self.prog.gen)
        xla = roofline(f.flops, f.bytes_accessed, f.collective_total, self.prog.gen)
        return Step(**dataclasses.asdict(out), **dataclasses.asdict(f), weights_bytes=memory.weights_bytes,
                    cache_bytes=memory.cache_bytes, total_bytes=memory.total_bytes, fits=memory.fits,
                    ideal_step_s=out.step_s, xla_step_s=xla.step_s, xla_bound=xla.bound)

    def largest_batch(self, context: int, limit: int = MAX_BATCH) -> int:
        """Bisection on the memory model: the largest batch in [1, limit] that fits (0: none)."""
        if not self.memory(1, context).fits:
            return 0
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.memory(mid, context).fits else (lo, mid - 1)
        return lo
