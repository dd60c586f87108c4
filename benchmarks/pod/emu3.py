"""Emu3-Gen at 90x90 codes (720x720) on TPU v5e and v6e, compiled ahead of time: images in flight per chip and the
time of a ZipAR pass, with the dense cache against the compressed band caches (ZipCache 4/2, Uniform 4, KIVI-2,
KIVI-4; a cache the parallel decoders refuse is recorded with the library's own message). Nothing runs.

    python -m benchmarks.pod.emu3                            # 41 compiles, 1-4 min each on 2 busy CPU cores
    python -m benchmarks.pod.emu3 --out benchmarks/results   # update the tracked results

What is compiled: one pass of `zipar.FixedWindow(7, kv=...)` as the library runs it (zipjax.zipar.fixed.zipar_until's
body up to the logits: `Transformer.apply` over the cache placed at the pass's slots, the output head sliced to the
32,768 visual tokens from the parameters), with classifier-free guidance (2 sequences per image), a 64-token prompt
bucket and the decoder's own cache, its attention by the library's kernel policy (kernel=None: the Pallas kernel on
a TPU): the scatter cache of 8,320 slots for the dense cache (the ZipAR Pallas kernel, per KV-head shard of the
model axis: zipjax.sharding.scatter_per_shard); the band cache (zipjax.zipar.compressed: blocks of 90 slots
compressed, a ring of 1,098 full-precision entries as FixedWindow sizes it) for ZipCache and Uniform, its stores read
packed by the multi-query Pallas kernel (zipjax.kernels.quantized_multi_query, per KV-head shard) and merged with the
ring's softmax by log-sum-exp for ZipCache, dequantized in jax.numpy for Uniform (token-wise keys: no kernel); KIVI's
band cache (zipjax.zipar.kivi_band: a slot-addressed store, a ring of 1,137 entries) with its store read by the same
kernel and its ring in jax.numpy. The attention path ("kernel" / "jnp") is part of each compile's key, so a compile
of another path is never reused. The library's shardings on a (1, m) mesh of one host: v5e with m = 4 (Emu3-Gen's
17.0 GB of bf16 weights do not fit one 16 GiB chip), v6e with m = 1.

Per chip, at full depth (32 layers): weights and KV bytes are exact, from the abstract shapes and the shardings (a
cache is affine in the images, both in the layers). The compiler's temporaries, outputs not aliased to the donated
cache, FLOPs, bytes accessed and collective bytes are fitted as f = p0 + p1 n + L (q0 + q1 n) (n images, L layers)
from compiles at L in {1, 2} x n in {1, 4}, and checked against a held-out compile at L = 4, n = 8 (`checks` in
the JSON: ZipCache 4/2 on v6e). Images in flight per replica: the largest n whose weights + KV + temporaries +
outputs fit 90 % of the chip's HBM; per chip: that over m; beside it the KV-bound count (weights + KV alone). Pass
time: the roofline max(FLOPs / peak, bytes / bandwidth, collective bytes / ICI) on XLA's bytes accessed (the program
as compiled; a Pallas call counts what its cost estimate says) and, beside it, on the exact weights + KV read once
(`ideal`). An image takes 713 passes at s = 7 (the prefill counted), so a chip finishes n / m images every 713
passes.

Output under `--out` (default benchmarks/results/local/, untracked): pod_emu3_tpu_aot.json (per program: the fit,
the capacity, the pass times, the compiled points), a printed table; compiles cached in pod_emu3_compiles.json
there (seeded from the tracked one, so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zipjax import aot, kv, zipar
from zipjax.errors import ZipjaxError
from zipjax.platform import compiling_for, use_kernel
from zipjax.shapes import cache_length
from zipjax.sharding import logical_sharding, tree_shardings
from zipjax.transformer import Transformer, output_head
from zipjax.zipar.cache import ScatterRecipe
from zipjax.zipar.compressed import BandRecipe, band_margin
from zipjax.zipar.kivi_band import KIVIBandRecipe
from zipjax.zipar.schedule import band_length, fixed_window

from .. import report
from .capacity import roofline
from .fit import FITTED, Error, Figures, relative_errors
from .plan import GIB, ICI, config_of, host, model_config
from .points import Point, _shard_bytes, abstract_model, batch_array, compile_point
from .run import Progress
from .store import CompileCache

MODEL = "emu3-gen"
LAG, CODES, VISUAL, PROMPT_BUCKET = 7, 90, 32768, 64
HBM_SHARE = 0.9
GENS = {"v5e": 4, "v6e": 1}  # generation -> the model axis of its per-chip program
CACHES: dict[str, kv.Method | None] = {
    "dense": None,
    "zipcache-4/2": kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6, buffer_len=CODES),
    "uniform-4": kv.Uniform(bits=4, buffer_len=CODES),
    "kivi-2": kv.KIVI(bits=2),
    "kivi-4": kv.KIVI(bits=4),
}
FIT_POINTS = ((1, 1), (1, 4), (2, 1), (2, 4))  # (layers, images): a band-cache pass takes minutes to compile here
CHECK_POINT = (4, 8)  # held out in depth and in images
MAX_IMAGES = 1024


@functools.cache
def schedule():
    return fixed_window(CODES, CODES, LAG, eol=True)


def cache_len() -> int:
    """Slots of the decode's cache, as zipjax.zipar.fixed sizes it (+ 1: the padding queries' slot)."""
    return cache_length(PROMPT_BUCKET + schedule().num_tokens + 1)


@dataclasses.dataclass(frozen=True)
class ImageProgram:
    """One ZipAR pass of Emu3-Gen on an m-way model axis of one chip generation, over one cache."""

    gen: str
    m: int
    cache: str

    @property
    def key(self) -> str:
        """The compile cache's key: the attention path in it, so a compile of another path is never reused."""
        return f"emu3pass|{MODEL}|{self.gen}|m{self.m}|{self.cache}|{attention_kind(self.cache)}|s{LAG}"

    def config(self, layers: int):
        return config_of(MODEL, layers)


def attention_kind(cache: str) -> str:
    """"kernel" or "jnp": how a pass over `cache` attends on a TPU by the library's kernel policy (kernel=None: the
    Pallas kernel where the platform traced for is a TPU; the band cache's stores only for a method with a
    packed-code kernel, Uniform's token-wise keys have none)."""
    method = CACHES[cache]
    with compiling_for("tpu"):
        kernel = use_kernel(None if method is None else method.kernel)
    return "kernel" if kernel and (method is None or method.has_kernel) else "jnp"


def refusal(cache: str) -> str | None:
    """The library's own message where the parallel decoder does not take this cache (None: it does)."""
    try:
        zipar.FixedWindow(LAG, kv=CACHES[cache])
    except ZipjaxError as error:
        return str(error)
    return None


def abstract_pass_cache(config, cache: str, images: int, mesh):
    """(abstract cache with shardings, its shardings): the decoder's cache between passes, for `images` images with
    guidance (2 sequences each)."""
    method, batch, slots = CACHES[cache], 2 * images, cache_len()
    if method is None:
        recipe = ScatterRecipe(config, batch, slots)  # kernel=None: the ZipAR kernel per KV-head shard on a TPU
    else:  # as zipjax.zipar.cache.band_recipe sizes it for FixedWindow(LAG, kv=method)
        align, behind = band_margin(method)
        band = band_length(schedule(), align) + behind
        if isinstance(method, kv.KIVI):
            recipe = KIVIBandRecipe(config, method, batch, slots, PROMPT_BUCKET, min(band, slots), method.kernel)
        else:
            recipe = BandRecipe(config, method, batch, slots, PROMPT_BUCKET + schedule().num_tokens + 1,
                                PROMPT_BUCKET, max(1, min(band, slots - PROMPT_BUCKET)), kernel=method.kernel)
    shapes = jax.eval_shape(recipe, jnp.zeros((batch,), jnp.int32))
    if method is not None:
        shapes = dataclasses.replace(shapes, prompt=False)  # between passes: the prompt is compressed already
    shardings = tree_shardings(shapes, shapes.logical_axes(), mesh)
    return aot.abstract(shapes, shardings), shardings


def pass_point(prog: ImageProgram, layers: int, images: int, hlo: bool = False) -> Point:
    """Compile one ZipAR pass of `prog` with `layers` layers and `images` images; its per-chip figures, with the
    exact argument bytes from shapes and shardings beside the compiler's (`hlo`: keep the compiled HLO text)."""
    config = prog.config(layers)
    target = host(prog.gen, prog.m)
    mesh = aot.mesh(target, 1, prog.m)
    params, param_sh = abstract_model(config, mesh)
    cache, cache_sh = abstract_pass_cache(config, prog.cache, images, mesh)
    queries = schedule().queries_per_pass
    tokens = batch_array((2 * images, queries), mesh)
    whole = NamedSharding(mesh, PartitionSpec())
    slots, valid = aot.array((queries,), jnp.int32, whole), aot.array((queries,), jnp.bool_, whole)
    vocab_range = (config.vocab_size - VISUAL, VISUAL)

    def one_pass(params, tokens, slots, valid, cache):
        positions = jnp.maximum(slots[None, :] - cache.starts[:, None], 0)
        head = output_head(params, config, vocab_range)
        return Transformer(config).apply({"params": params}, tokens, positions, cache.at(slots, valid), head=head)

    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (2 * images, queries, VISUAL), mesh)
    out = compile_point(one_pass, (params, tokens, slots, valid, cache), target, mesh, hlo=hlo,
                        donate_argnames=("cache",), out_shardings=(logits_sh, cache_sh))
    exact = (_shard_bytes(params, param_sh) + _shard_bytes(cache, cache_sh) + _shard_bytes(tokens, tokens.sharding)
             + 5 * queries)
    return dataclasses.replace(out, exact_argument_bytes=exact)


@functools.cache
def exact_bytes(prog: ImageProgram, images: int) -> tuple[int, int]:
    """(weights, KV cache) bytes one chip holds at full depth: exact, from shapes and shardings (affine in the
    layer count: evaluated at 1 and 2 layers)."""
    full = model_config(MODEL).num_layers
    mesh = aot.mesh(host(prog.gen, prog.m), 1, prog.m)
    weights, caches = [], []
    for layers in (1, 2):
        params, param_sh = abstract_model(prog.config(layers), mesh)
        cache, cache_sh = abstract_pass_cache(prog.config(layers), prog.cache, images, mesh)
        weights.append(_shard_bytes(params, param_sh))
        caches.append(_shard_bytes(cache, cache_sh))
    return (weights[0] + (full - 1) * (weights[1] - weights[0]), caches[0] + (full - 1) * (caches[1] - caches[0]))


Coefficients = tuple[float, float, float, float]  # (p0, p1, q0, q1) of f = p0 + p1 n + L (q0 + q1 n)


def _row(layers: int, images: int) -> list[float]:
    return [1.0, images, layers, layers * images]


def fit(points: dict[tuple[int, int], Figures]) -> dict[str, Coefficients]:
    """Per figure, (p0, p1, q0, q1) by least squares over the compiled (layers, images) points."""
    keys = sorted(points)
    design = np.array([_row(*k) for k in keys])
    return {name: tuple(np.linalg.lstsq(design, np.array([getattr(points[k], name) for k in keys]),
                                        rcond=None)[0].tolist()) for name in FITTED}


def predict(coefficients: dict[str, Coefficients], layers: int, images: int) -> Figures:
    return Figures(**{n: max(0.0, float(np.dot(coefficients[n], _row(layers, images)))) for n in FITTED})


@dataclasses.dataclass(frozen=True)
class PassTime:
    """A ZipAR pass at n images per replica: the roofline on XLA's bytes and on the exact weights + KV."""

    images: int
    step_s: float
    bound: str
    ideal_step_s: float
    ideal_bound: str
    flops: float
    bytes_accessed: float
    collective_total: float


@dataclasses.dataclass(frozen=True)
class Capacity:
    """One program at full depth: what a chip holds, how many images fit 90 % of its HBM, what a pass costs."""

    prog: ImageProgram
    coefficients: dict[str, Coefficients]

    @property
    def layers(self) -> int:
        return model_config(MODEL).num_layers

    def total_bytes(self, images: int, plan: bool = True) -> float:
        """Arguments (exact) + temporaries and unaliased outputs (fitted) per chip, for `images` per replica;
        `plan=False`: weights and KV only (the bound a pass that holds no temporaries would reach)."""
        weights, cache = exact_bytes(self.prog, images)
        if not plan:
            return weights + cache
        f = predict(self.coefficients, self.layers, images)
        return weights + cache + 2 * images * schedule().queries_per_pass * 4 + f.temp_bytes + f.extra_bytes

    def budget(self) -> float:
        return HBM_SHARE * aot.CHIPS[self.prog.gen].hbm_bytes

    def images_in_flight(self, limit: int = MAX_IMAGES, plan: bool = True) -> int:
        """Bisection: the largest n in [1, limit] images per replica that fits the budget (0: none); `plan=False`:
        by weights and KV alone."""
        if self.total_bytes(1, plan) > self.budget():
            return 0
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.total_bytes(mid, plan) <= self.budget() else (lo, mid - 1)
        return lo

    def pass_time(self, images: int) -> PassTime:
        f = predict(self.coefficients, self.layers, images)
        weights, cache = exact_bytes(self.prog, images)
        xla = roofline(f.flops, f.bytes_accessed, f.collective_total, self.prog.gen)
        ideal = roofline(f.flops, weights + cache, f.collective_total, self.prog.gen)
        return PassTime(images, xla.step_s, xla.bound, ideal.step_s, ideal.bound, f.flops, f.bytes_accessed,
                        f.collective_total)


def attention_path(prog: ImageProgram) -> str:
    """The attention the compiled pass runs, in words."""
    method, shards = CACHES[prog.cache], " per KV-head shard" if prog.m > 1 else ""
    if method is None:
        return f"the ZipAR Pallas kernel (zipjax.kernels.zipar_attention){shards}"
    if isinstance(method, kv.KIVI):
        return (f"the store by the packed-code multi-query Pallas kernel (zipjax.kernels.quantized_multi_query)"
                f"{shards}, the ring in jax.numpy, merged by log-sum-exp (zipjax.zipar.kivi_band)")
    if attention_kind(prog.cache) == "kernel":
        return (f"each store by the packed-code multi-query Pallas kernel (zipjax.kernels.quantized_multi_query)"
                f"{shards}, the band in jax.numpy, merged by log-sum-exp (zipjax.zipar.compressed)")
    return "jax.numpy over every block dequantized, and the band (zipjax.zipar.compressed; no kernel for Uniform)"


def summary(cap: Capacity) -> dict[str, Any]:
    """The table row of one program: bytes per chip, images in flight, the pass at 1 image and at capacity."""
    prog, n = cap.prog, cap.images_in_flight()
    weights, one = exact_bytes(prog, 1)
    kv_per_image = exact_bytes(prog, 2)[1] - one
    out = {"gen": prog.gen, "mesh": f"1x{prog.m}", "cache": prog.cache, "attention": attention_path(prog),
           "weights_bytes_per_chip": weights,
           "kv_bytes_per_image_per_chip": kv_per_image, "hbm_budget_bytes": cap.budget(),
           "images_per_replica": n, "images_per_chip": n / prog.m, "passes_per_image": schedule().num_passes,
           "kv_bound_images_per_chip": cap.images_in_flight(plan=False) / prog.m,
           "pass_1_image": cap.pass_time(1)}
    if n:
        at = cap.pass_time(n)
        out.update(total_bytes_at_capacity=cap.total_bytes(n), pass_at_capacity=at,
                   images_per_s_per_chip=n / prog.m / (schedule().num_passes * at.step_s),
                   ideal_images_per_s_per_chip=n / prog.m / (schedule().num_passes * at.ideal_step_s))
    return out


def jobs(programs: Sequence[ImageProgram], check: ImageProgram | None):
    """(key, thunk) of every compile: the fit's points of each program and the held-out check."""
    out = [(f"{p.key}|L{layers}|n{images}", functools.partial(pass_point, p, layers, images))
           for p in programs for layers, images in FIT_POINTS]
    if check is not None:
        layers, images = CHECK_POINT
        out.append((f"check|{check.key}|L{layers}|n{images}", functools.partial(pass_point, check, layers, images)))
    return out


def run(programs: Sequence[ImageProgram], store: CompileCache, check: ImageProgram | None = None):
    """Compile (or read) every point; per program its Capacity, and the held-out check's errors."""
    bar = Progress(len(jobs(programs, check)), "compiling")
    points = {}
    for key, thunk in jobs(programs, check):
        points[key] = store.get(key, thunk)
        bar.update(f"{key} {points[key].compile_seconds:.0f}s")
    bar.close()
    caps = {p.key: Capacity(p, fit({k: points[f"{p.key}|L{k[0]}|n{k[1]}"].figures for k in FIT_POINTS}))
            for p in programs}
    checks: dict[str, dict[str, Error]] = {}
    if check is not None:
        layers, images = CHECK_POINT
        predicted = predict(caps[check.key].coefficients, layers, images)
        checks[f"{check.key}|L{layers}|n{images}"] = relative_errors(predicted,
                                                                     points[f"check|{check.key}|L{layers}|n{images}"])
    return caps, checks, points


def print_rows(rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        if "refused" in r:
            cells.append((r["gen"], r["cache"], "refused", "", "", "", "", ""))
            continue
        at = r.get("pass_at_capacity")
        cells.append((r["gen"], r["cache"], f"{r['kv_bytes_per_image_per_chip'] / GIB:.3f}",
                      f"{r['images_per_chip']:g} ({r['kv_bound_images_per_chip']:g})",
                      f"{r['pass_1_image'].step_s * 1e3:.1f}",
                      f"{at.step_s * 1e3:.1f} ({at.bound})" if at else "-",
                      f"{at.ideal_step_s * 1e3:.1f}" if at else "-",
                      f"{r['images_per_s_per_chip']:.3f}" if at else "-"))
    report.print_table(("chip", "cache", "KV GiB/image/chip", "images/chip (KV-bound)", "pass ms, 1 image",
                        "pass ms at capacity", "ideal ms", "images/s/chip"), cells,
                       title=f"Emu3-Gen 90x90, ZipAR s={LAG}, guidance; {HBM_SHARE:.0%} HBM (compiled, predicted)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pod.emu3", description=__doc__.split("\n")[0])
    parser.add_argument("--no-check", action="store_true", help="skip the held-out compile (L 4, 8 images)")
    report.add_out_argument(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    refused = {c: why for c in CACHES if (why := refusal(c))}
    programs = [ImageProgram(gen, m, c) for gen, m in GENS.items() for c in CACHES if c not in refused]
    store = CompileCache(args.out / "pod_emu3_compiles.json", seed=report.RESULTS / "pod_emu3_compiles.json")
    check = None if args.no_check else ImageProgram("v6e", 1, "zipcache-4/2")
    caps, checks, points = run(programs, store, check)
    rows = [summary(caps[p.key]) for p in programs]
    rows += [{"gen": g, "cache": c, "refused": why} for g in GENS for c, why in refused.items()]
    payload = {"what": "compiled ahead of time with libtpu for described TPU chips; predictions, nothing ran",
               "jax": jax.__version__, "model": MODEL, "codes": [CODES, CODES], "lag": LAG,
               "queries_per_pass": schedule().queries_per_pass, "passes_per_image": schedule().num_passes,
               "cache_slots": cache_len(), "hbm_share": HBM_SHARE, "fit_points": FIT_POINTS,
               "chips": {g: dataclasses.asdict(aot.CHIPS[g]) for g in GENS}, "ici_bytes_per_s": ICI,
               "rows": rows, "checks": checks, "fits": {k: c.coefficients for k, c in caps.items()},
               "compile_seconds_total": round(sum(p.compile_seconds for p in points.values()), 1),
               "wall_seconds_this_run": round(time.perf_counter() - start, 1), "points": points}
    path = report.write_json(args.out / "pod_emu3_tpu_aot.json", payload, indent=1)
    print_rows(rows)
    print(f"\n{len(points)} compiled points ({store.compiled} compiled in this run); {path}")
    return payload


if __name__ == "__main__":
    main()
