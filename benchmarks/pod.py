"""The pod benchmark: LLaMA-3-8B, LLaMA-3-70B, Mistral-7B and Emu3-Gen on TPU pods, compiled ahead of time with
libtpu for real topologies (nothing runs), and measured on whatever devices this process has.

    python benchmarks/pod.py                          # compiled predictions (about 40 min on 2 CPU cores) + measured
    python benchmarks/pod.py --quick                  # a small grid in about a minute (CI, tests)
    python benchmarks/pod.py --measure-only           # only the measured part, on this process's devices
    python benchmarks/pod.py --profile DIR            # also write a jax.profiler trace of the measured part

Why: the value of a sharding rule or of KV compression at pod scale (how many sequences fit a chip, what a decode step
costs) is decided by the compiler's memory plan and the roofline, which need no pod to obtain: `zipjax.aot` compiles
the library's own programs (one decode step `Transformer.apply` on the cache, and the prefill `prompt_pass`) for the
described chips, with the library's logical-axis shardings. Per chip it records memory (arguments, temporaries,
outputs not aliased to the donated cache) and whether it fits the HBM, FLOPs and bytes accessed (XLA's cost
analysis), and the collectives with the bytes of their results. With the peak figures of `zipjax.aot.CHIPS` it
predicts TTFT, the decode step time, tok/s per chip and per pod, the largest batch that fits for each cache, and the
best (data x model) mesh per topology; for Emu3-Gen, the time of a ZipAR pass against the number of active rows.

Grid: models (zipjax.config.PUBLISHED) x topologies (v5e-4/16/64/256, v5p-8/32 in Google's core count, i.e. 4 and 16
chips, v6e-8) x caches (dense bf16, ZipCache 4/2 at 60 % salient, KIVI-2) x contexts (2k, 8k, 32k) x batch (1..256).
Compiling that grid is thousands of full-size compiles; on 2 CPU cores these approximations make it about 100
(each is recorded in the JSON, and checked where said):

1. Layers. Decoder layers are identical, so every per-chip figure is affine in the layer count. Programs are
   compiled with 2 and 4 layers and extrapolated (checked: one full-depth LLaMA-3-8B decode step; errors in the JSON
   under "validation").
2. Data parallelism. A (data d x model m) mesh keeps the weights replicated over "data" and splits the batch, and a
   decode step or a prefill has no collective over "data"; so a chip of a (d, m) mesh at global batch d*b runs the
   same program as a chip of a (1, m) mesh at batch b. Each "per-chip program" (model, chip generation, m, cache) is
   compiled once, on the smallest topology of that generation with m chips, and serves every topology and mesh with
   that m (checked: one 2x2 mesh against its 1x2 program).
3. Batch and context. Per program, a decode step is compiled at five (layers, batch, context) points and each
   figure f is fitted as f = p0 + p1*b + L*(q0 + q1*b + q2*b*S): per layer, the weights (q0), per-sequence
   activations (q1) and the cache (q2); outside the layers the embedding and head (p0) and the logits (p1). Checked
   against a held-out compile at 32k. Argument bytes are not fitted: they are exact, from the abstract shapes and
   the shardings (and equal the compiler's figure at every compiled point, recorded).
4. Compressed caches. A ZipCache / KIVI program is compiled at two points (2 layers, batch 8, contexts 2k and 32k)
   and modelled as the dense program of the same (model, generation, m) plus a difference that is per layer and per
   sequence, affine in the context (checked once with 4 layers). Their prompt is one block of S - 256 tokens, the
   decode step reads it and a partly filled full-precision window. The quantized decode attention runs the Pallas
   kernel over packed codes on every chip, per shard of the mesh (zipjax.sharding.states_per_shard: batch over
   "data", KV heads over "model", or the tokens with the shards' softmax states combined where the heads do not
   divide it). Points compiled before that (jnp path on more than one chip) say so in the JSON.
5. Prefill (TTFT, batch 1, dense cache): compiled for LLaMA-3-8B (1x4) and LLaMA-3-70B (1x16) at 2 and 4 layers
   and contexts 2k and 8k (a prefill compile takes about a minute here; the other models and 32k are left out of
   the time budget and show no TTFT); per-chip FLOPs and bytes on an m-way model axis are scaled by m_ref / m
   (tensor parallelism splits every matmul), v5p and v6e use the v5e compile (the same HLO) with their peaks.
   A prompt longer than 512 tokens goes through the model in chunks (a fori_loop whose body XLA's cost
   analysis counts once), so the body's figures are multiplied by the number of chunks; the flash kernel's own cost
   estimate charges each chunk the whole cache, so attention FLOPs of long prompts are overestimated (up to 2x).
6. Largest batch: bisection over b in [1, 256] on exact argument bytes + fitted temporaries and outputs <= HBM;
   the found batch of one program is compiled for real at full depth and one above it, to confirm.
7. Roofline: a step takes max(HBM bytes / bandwidth, FLOPs / bf16 peak, collective bytes / ICI bandwidth)
   (perfect overlap; collective bytes are each collective's result size per chip). FLOPs and collectives are the
   compiler's; the HBM bytes of a decode step are the exact weights + cache per chip, because XLA's TPU byte count
   includes its own prefetch copies of weights into VMEM (see the README) and its fit is the one that extrapolates
   worst in depth (validation: full-depth error in the JSON); the step from XLA's count is kept as xla_step_s.
   tok/s per chip = b / (m * step); per pod = that times the chips. TTFT and ZipAR passes use XLA's counts.
8. ZipAR (Emu3-Gen, 90x90 codes, guidance: 2 sequences): a pass with r active rows carries r queries per sequence
   over an 8,320-slot cache. Compiled at r = 1 and 90 (2 and 4 layers) on one program per generation; figures are
   affine in r between them (checked at r = 8). The pass stops being bandwidth-bound where FLOPs / peak overtakes
   bytes / bandwidth. The dense cache stands in for ZipAR's scatter cache (same reads, a different write).

Measured mode (`measure`): on this process's devices it loads a checkpoint (the shipped checkpoints/stdlib-llama on a
CPU; `--checkpoint` on a real chip or pod, where every host runs the same command after jax.distributed.initialize)
and times `zipjax.generate_stream`: TTFT, p50 / p99 time per output token, tok/s per chip, and MBU (ideal bytes of
a step / p50 / the chip's HBM bandwidth; none on a CPU, which has no figure in CHIPS), printed beside the roofline
of the same model on the same chip. Nothing in the compiled part is measured; nothing in the measured part is
predicted.

Output: benchmarks/results/pod_tpu_aot.json (the compiled points, fits, validation and the derived grid),
pod_measured_<backend>.json, pod_tpu_aot.png (Pillow; matplotlib is not in the environment), and a printed table.
Compiled points are cached in pod_compiles.json, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# isort: off
import zipjax  # before jax: it chooses the platform jax starts on
# isort: on
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from zipjax import aot, kv
from zipjax.config import PUBLISHED, ModelConfig
from zipjax.kv.methods import init_cache
from zipjax.sharding import logical_sharding, tree_shardings
from zipjax.transformer import PREFILL_CHUNK, Transformer, abstract_params, param_logical_axes, prompt_pass

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "checkpoints" / "stdlib-llama"
GIB = 1 << 30

MODELS = ("llama-3-8b", "llama-3-70b", "mistral-7b", "emu3-gen")
# name -> (topology string, chips); v5p names count TensorCores (2 per chip), v5e and v6e chips
TOPOLOGIES = {"v5e-4": "v5e:2x2", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
              "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4", "v6e-8": "v6e:2x4"}
# the smallest topology of a generation with m chips: where an m-way per-chip program is compiled
HOSTS = {"v5e": {1: "v5e:1x1", 2: "v5e:1x2", 4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4"},
         "v5p": {1: "v5p:1x1x1", 2: "v5p:1x2x1", 4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"},
         "v6e": {1: "v6e:1x1", 2: "v6e:1x2", 4: "v6e:2x2", 8: "v6e:2x4", 16: "v6e:4x4"}}
CACHES: dict[str, kv.Method | None] = {"dense": None,  # methods by their names in zipjax.kv.METHODS
                                       "zipcache-4/2": kv.method_from_name("zipcache", high_bits=4, low_bits=2),
                                       "kivi-2": kv.method_from_name("kivi", bits=2)}
CONTEXTS = (2048, 8192, 32768)
MAX_BATCH = 256
DECODE_ROOM = 256  # slots after the prompt block of a compressed cache (its full-precision window and a block)
ZIPAR_ROWS, ZIPAR_SLOTS = 90, 8320  # Emu3-Gen 90x90 codes (+ EOL tokens and the prompt), guidance: 2 sequences
# interchip interconnect per chip, bytes/s (vendor spec sheets: v5e 1,600 Gbps, v5p 4,800 Gbps, v6e 3,584 Gbps)
ICI = {"v5e": 200e9, "v5p": 600e9, "v6e": 448e9}


# ------------------------------------------------------------------ plans: what is compiled


@dataclasses.dataclass(frozen=True)
class Program:
    """A per-chip program: one model on an m-way "model" axis of one chip generation, with one cache."""

    model: str
    gen: str
    m: int
    cache: str

    @property
    def key(self) -> str:
        return f"{self.model}|{self.gen}|m{self.m}|{self.cache}"


@dataclasses.dataclass(frozen=True)
class Plan:
    decode: tuple[Program, ...]  # every cache kind listed is compiled; compressed ones need their dense program
    prefill: tuple[tuple[str, str, int], ...]  # (model, gen, m) compiled at every context
    zipar: tuple[tuple[str, int], ...]  # (gen, m) for Emu3-Gen
    contexts: tuple[int, ...]
    topologies: tuple[str, ...]
    validate: bool
    prefill_contexts: tuple[int, ...] = CONTEXTS


def full_plan() -> Plan:
    dense = [("llama-3-8b", "v5e", m) for m in (2, 4, 8)] + [
        ("mistral-7b", "v5e", 4), ("emu3-gen", "v5e", 4), ("llama-3-70b", "v5e", 16),
        ("llama-3-8b", "v5p", 1), ("llama-3-8b", "v5p", 4), ("llama-3-70b", "v5p", 4),
        ("llama-3-8b", "v6e", 1), ("llama-3-8b", "v6e", 2), ("llama-3-70b", "v6e", 8)]
    quant = [("llama-3-8b", "v5e", 4), ("llama-3-70b", "v5e", 16), ("llama-3-8b", "v5p", 1)]
    programs = [Program(*p, "dense") for p in dense]
    programs += [Program(*p, c) for p in quant for c in ("zipcache-4/2", "kivi-2")]
    prefill = (("llama-3-8b", "v5e", 4), ("llama-3-70b", "v5e", 16))
    return Plan(tuple(programs), prefill, (("v5e", 4), ("v5p", 1), ("v6e", 1)), CONTEXTS, tuple(TOPOLOGIES), True,
                (2048, 8192))


def quick_plan() -> Plan:
    """The shipped model's shape (6 layers, width 192) on v5e, dense cache, contexts 512 and 1024: the code paths of
    the full run (compiles, fits, bisection, roofline, table, plot) in under a minute (a compressed cache's compile
    alone takes 10-50 s, so it is left out here; tests/test_pod.py checks its fit arithmetic)."""
    programs = (Program("stdlib-llama", "v5e", 2, "dense"),)
    return Plan(programs, (("stdlib-llama", "v5e", 2),), (), (512, 1024), ("v5e-4",), False, (1024,))


# ------------------------------------------------------------------ compiling one point


@functools.cache
def model_config(model: str) -> ModelConfig:
    """A published config, or "stdlib-llama": the shipped checkpoint's shape in bfloat16 (the quick mode's model)."""
    if model == "stdlib-llama":
        from zipjax.checkpoint import read_config

        return read_config(SHIPPED)[0].replace(dtype="bfloat16")
    return PUBLISHED[model]


def config_of(model: str, layers: int) -> ModelConfig:
    return model_config(model).replace(num_layers=layers)


@functools.cache
def host(gen: str, m: int) -> aot.Target:
    return aot.target(HOSTS[gen][m])


def _shard_bytes(tree, shardings) -> int:
    """Bytes one chip holds of `tree` (ShapeDtypeStructs) under `shardings`: exact, no compile."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, specs, strict=True))


def _method(cache: str, chips: int):
    return CACHES[cache]


def attention_path(cache: str, chips: int) -> str:
    if CACHES[cache] is None:
        return "flash kernel per shard"
    return "Pallas kernel over packed codes" + (" per shard" if chips > 1 else "")


def abstract_cache(config: ModelConfig, cache: str, batch: int, context: int, mesh, chips: int):
    """(abstract cache with shardings, its shardings): the state of a decode step with `context` slots."""
    method = _method(cache, chips)
    prefill = 0 if method is None else context - DECODE_ROOM
    shapes = jax.eval_shape(lambda: init_cache(method, config, batch, context, prefill))
    shardings = tree_shardings(shapes, shapes.logical_axes(), mesh)
    return aot.abstract(shapes, shardings), shardings


def abstract_model(config: ModelConfig, mesh):
    params = abstract_params(config)
    shardings = tree_shardings(params, param_logical_axes(config), mesh)
    return aot.abstract(params, shardings), shardings


def batch_array(shape: tuple[int, ...], mesh) -> jax.ShapeDtypeStruct:
    """int32 tokens [batch, n], split over "data" by the library's rule."""
    return aot.array(shape, jnp.int32, logical_sharding(PartitionSpec("batch"), shape, mesh))


_HLO_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([0-9,]*)\]")
_COLLECTIVE_LINE = re.compile(
    r"=\s*(.+?)\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of each kind of collective per chip: the size of each op's result (of an async start, its output, the
    last element of its tuple), summed by kind."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if not match:
            continue
        sizes = [_array_bytes(dtype, dims) for dtype, dims in _HLO_SHAPE.findall(match.group(1))]
        if sizes:
            out[match.group(2)] = out.get(match.group(2), 0) + (sizes[-1] if match.group(3) else sum(sizes))
    return out


def _array_bytes(dtype: str, dims: str) -> int:
    bits = 16 if dtype == "bf16" else 8 if dtype == "pred" else int(dtype[1:])
    return bits // 8 * int(np.prod([int(d) for d in dims.split(",") if d]))


def compile_point(fn: Callable, args: Sequence, target: aot.Target, mesh, scale: int = 1, hlo: bool = False,
                  **jit_kwargs) -> dict[str, Any]:
    """Compile `fn(*args)` for `target` and summarise per chip: the Report's figures plus collective bytes by kind
    (and the compiled HLO text under "hlo" if asked). `scale` multiplies what a loop body counts once (FLOPs, bytes
    accessed, collective bytes)."""
    with jax.set_mesh(mesh):
        compiled, report = aot.compile(fn, *args, target=target, **jit_kwargs)
    coll = {k: v * scale for k, v in collective_bytes(compiled.as_text()).items()}
    return {"argument_bytes": report.argument_bytes, "temp_bytes": report.temp_bytes,
            "output_bytes": report.output_bytes, "alias_bytes": report.alias_bytes,
            "extra_bytes": report.output_bytes - report.alias_bytes,
            "flops": (report.flops or 0.0) * scale, "bytes_accessed": (report.bytes_accessed or 0.0) * scale,
            "collectives": report.collectives, "collective_bytes": coll,
            "collective_total": float(sum(coll.values())), "compile_seconds": round(report.compile_seconds, 2),
            **({"hlo": compiled.as_text()} if hlo else {})}


def decode_point(prog: Program, layers: int, batch: int, context: int, data: int = 1, hlo: bool = False
                 ) -> dict[str, Any]:
    """One decode step of `prog` with `layers` layers, `batch` sequences in all, `context` cache slots, on a
    (data, m) mesh of the program's host topology (data > 1 only for the data-parallel check); `hlo`: keep the
    compiled HLO text."""
    config = config_of(prog.model, layers)
    target = host(prog.gen, prog.m * data) if data > 1 else host(prog.gen, prog.m)
    mesh = aot.mesh(target, data, prog.m)
    params, param_sh = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, prog.cache, batch, context, mesh, prog.m * data)
    tokens = batch_array((batch, 1), mesh)
    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (batch, 1, config.vocab_size), mesh)

    def step(params, tokens, cache):
        return Transformer(config).apply({"params": params}, tokens, jnp.zeros_like(tokens), cache, last_only=True)

    out = compile_point(step, (params, tokens, cache), target, mesh, hlo=hlo, donate_argnames=("cache",),
                        out_shardings=(logits_sh, cache_sh))
    out["exact_argument_bytes"] = (_shard_bytes(params, param_sh) + _shard_bytes(cache, cache_sh)
                                   + _shard_bytes(tokens, tokens.sharding))
    return out


def prefill_point(model: str, gen: str, m: int, layers: int, context: int) -> dict[str, Any]:
    """The prompt (batch 1, `context` tokens) through `prompt_pass` into a dense cache of context + 128 slots."""
    config = config_of(model, layers)
    target = host(gen, m)
    mesh = aot.mesh(target, 1, m)
    params, _ = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, "dense", 1, context + 128, mesh, m)
    ids = batch_array((1, context), mesh)
    chunks = context // PREFILL_CHUNK if context > PREFILL_CHUNK and context % PREFILL_CHUNK == 0 else 1

    def prefill(params, ids, cache):
        positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), ids.shape)
        return prompt_pass(params, config, ids, positions, cache)

    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (1, 1, config.vocab_size), mesh)
    out = compile_point(prefill, (params, ids, cache), target, mesh, scale=chunks, donate_argnames=("cache",),
                        out_shardings=(logits_sh, cache_sh))
    out["chunks"] = chunks
    return out


def zipar_point(gen: str, m: int, layers: int, rows: int) -> dict[str, Any]:
    """One ZipAR pass of Emu3-Gen: `rows` queries for each of 2 sequences (guidance), an 8,320-slot cache, logits
    over the 32,768 visual tokens only (Emu3 samples image codes from that slice)."""
    config = config_of("emu3-gen", layers)
    target = host(gen, m)
    mesh = aot.mesh(target, 1, m)
    params, _ = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, "dense", 2, ZIPAR_SLOTS, mesh, m)
    tokens = batch_array((2, rows), mesh)
    head = aot.array((config.hidden_size, 32768), config.jnp_dtype,
                     logical_sharding(PartitionSpec("embed", "vocab"), (config.hidden_size, 32768), mesh))

    def one_pass(params, tokens, cache, head):
        return Transformer(config).apply({"params": params}, tokens, jnp.zeros_like(tokens), cache, head=head)

    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (2, rows, 32768), mesh)
    return compile_point(one_pass, (params, tokens, cache, head), target, mesh, donate_argnames=("cache",),
                         out_shardings=(logits_sh, cache_sh))


class CompileCache:
    """Compiled points by key in a JSON file, written after each compile, so an interrupted run resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.points: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.compiled = 0

    def get(self, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = f"jax {jax.__version__}|{key}"
        if key not in self.points:
            self.points[key] = make()
            self.compiled += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.points, indent=1, sort_keys=True))
        return self.points[key]


# ------------------------------------------------------------------ fits


FITTED = ("temp_bytes", "extra_bytes", "flops", "bytes_accessed", "collective_total")


def _row(layers: int, batch: int, context: int) -> list[float]:
    return [1.0, batch, layers, layers * batch, layers * batch * context]


def fit_dense(points: dict[tuple[int, int, int], dict]) -> dict[str, list[float]]:
    """Per figure, (p0, p1, q0, q1, q2) of f = p0 + p1 b + L (q0 + q1 b + q2 b S), by least squares."""
    keys = sorted(points)
    design = np.array([_row(*k) for k in keys])
    return {name: np.linalg.lstsq(design, np.array([points[k][name] for k in keys]), rcond=None)[0].tolist()
            for name in FITTED}


def fit_quantized(dense: dict[str, list[float]], points: dict[tuple[int, int, int], dict]) -> dict[str, list[float]]:
    """A compressed cache: the dense fit plus L b (c0 + c1 S), from points at two contexts."""
    (k1, k2) = sorted(points)
    out = {}
    for name in FITTED:
        deltas = [(points[k][name] - predict(dense, name, *k)) / (k[0] * k[1]) for k in (k1, k2)]
        c1 = (deltas[1] - deltas[0]) / (k2[2] - k1[2])
        c0 = deltas[0] - c1 * k1[2]
        p0, p1, q0, q1, q2 = dense[name]
        out[name] = [p0, p1, q0, q1 + c0, q2 + c1]
    return out


def predict(fit: dict[str, list[float]], name: str, layers: int, batch: int, context: int) -> float:
    return float(np.dot(fit[name], _row(layers, batch, context)))


def relative_errors(predicted: dict[str, float], compiled: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per figure: predicted, compiled, and (predicted - compiled) / compiled (None where compiled is 0)."""
    ratio = lambda p, c: round((p - c) / c, 4) if c else None
    return {name: {"predicted": predicted[name], "compiled": compiled[name],
                   "relative": ratio(predicted[name], compiled[name])} for name in predicted}


# ------------------------------------------------------------------ exact memory


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
        shapes, shardings = abstract_cache(config, cache, batch, context, mesh, m)
        weights.append(_shard_bytes(params, param_sh))
        caches.append(_shard_bytes(shapes, shardings))
    return (weights[0] + (full - 1) * (weights[1] - weights[0]), caches[0] + (full - 1) * (caches[1] - caches[0]))


# ------------------------------------------------------------------ roofline


def chip_of(gen: str) -> aot.Chip:
    return aot.CHIPS[gen]


def roofline(flops: float, bytes_accessed: float, collective: float, gen: str) -> dict[str, float]:
    """Seconds of a step bound by each resource, and the step: the largest (they overlap perfectly)."""
    chip = chip_of(gen)
    times = {"compute_s": flops / chip.bf16_flops, "memory_s": bytes_accessed / chip.hbm_bandwidth,
             "collective_s": collective / ICI[gen]}
    bound = max(times, key=times.get)
    return {**times, "step_s": times[bound], "bound": bound.removesuffix("_s")}


@dataclasses.dataclass
class Decode:
    """Fitted figures of a per-chip program at full depth."""

    prog: Program
    fit: dict[str, list[float]]

    @property
    def layers(self) -> int:
        return model_config(self.prog.model).num_layers

    def figures(self, batch: int, context: int) -> dict[str, float]:
        return {name: max(0.0, predict(self.fit, name, self.layers, batch, context)) for name in FITTED}

    def memory(self, batch: int, context: int) -> dict[str, float]:
        weights, cache = exact_arguments(*dataclasses.astuple(self.prog), batch, context)
        f = self.figures(batch, context)
        total = weights + cache + batch * 4 + f["temp_bytes"] + f["extra_bytes"]
        return {"weights_bytes": weights, "cache_bytes": cache, "temp_bytes": f["temp_bytes"],
                "total_bytes": total, "fits": total <= chip_of(self.prog.gen).hbm_bytes}

    def step(self, batch: int, context: int) -> dict[str, Any]:
        """The roofline step: FLOPs and collective bytes as compiled (fitted), HBM bytes the exact weights + cache
        per chip (XLA's byte count, whose fit extrapolates worst in depth, is kept beside it as xla_step_s)."""
        f = self.figures(batch, context)
        memory = self.memory(batch, context)
        ideal_bytes = memory["weights_bytes"] + memory["cache_bytes"]
        out = roofline(f["flops"], ideal_bytes, f["collective_total"], self.prog.gen)
        xla = roofline(f["flops"], f["bytes_accessed"], f["collective_total"], self.prog.gen)
        return {**out, **f, **memory, "ideal_step_s": out["step_s"], "xla_step_s": xla["step_s"],
                "xla_bound": xla["bound"]}

    def largest_batch(self, context: int, limit: int = MAX_BATCH) -> int:
        """Bisection on the memory model: the largest batch in [1, limit] that fits (0: none)."""
        if not self.memory(1, context)["fits"]:
            return 0
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.memory(mid, context)["fits"] else (lo, mid - 1)
        return lo


# ------------------------------------------------------------------ running the plan


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


def dense_points(contexts: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    c0, c1 = contexts[0], contexts[min(1, len(contexts) - 1)]
    return ((2, 1, c0), (2, 8, c0), (2, 8, c1), (4, 1, c0), (4, 8, c1))


def quant_points(contexts: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    return ((2, 8, contexts[0]), (2, 8, contexts[-1]))


def jobs(plan: Plan) -> list[tuple[str, Callable[[], dict]]]:
    """Every compile of the plan as (key, thunk), in order."""
    out: list[tuple[str, Callable[[], dict]]] = []
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


def validation_jobs(plan: Plan) -> list[tuple[str, Callable[[], dict]]]:
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


def run_compiles(plan: Plan, store: CompileCache) -> dict[str, dict]:
    todo = jobs(plan) + validation_jobs(plan)
    bar = Progress(len(todo), "compiling")
    results = {}
    for key, thunk in todo:
        results[key] = store.get(key, thunk)
        bar.update(f"{key} {results[key]['compile_seconds']:.0f}s")
    bar.close()
    return results


def decode_models(plan: Plan, results: dict[str, dict]) -> dict[str, Decode]:
    fits: dict[str, dict] = {}
    for prog in sorted(plan.decode, key=lambda p: p.cache != "dense"):
        if prog.cache == "dense":
            points = {p: results[f"decode|{prog.key}|L{p[0]}|b{p[1]}|S{p[2]}"] for p in dense_points(plan.contexts)}
            fits[prog.key] = fit_dense(points)
        else:
            dense_key = dataclasses.replace(prog, cache="dense").key
            points = {p: results[f"decode|{prog.key}|L{p[0]}|b{p[1]}|S{p[2]}"] for p in quant_points(plan.contexts)}
            fits[prog.key] = fit_quantized(fits[dense_key], points)
    return {prog.key: Decode(prog, fits[prog.key]) for prog in plan.decode}


def argument_check(plan: Plan, results: dict[str, dict]) -> int:
    """The largest difference between the compiler's argument bytes and the exact shard arithmetic."""
    return max((abs(r["argument_bytes"] - r["exact_argument_bytes"]) for k, r in results.items()
                if "exact_argument_bytes" in r), default=0)


def validation(plan: Plan, results: dict[str, dict], models: dict[str, Decode]) -> dict[str, Any]:
    if not plan.validate:
        return {}
    out: dict[str, Any] = {}
    base = models["llama-3-8b|v5e|m4|dense"].fit
    for key, point in (("full-depth", (32, 8, 8192)), ("context", (2, 8, 32768))):
        compiled = results[f"check|{key}|L{point[0]}|b{point[1]}|S{point[2]}"]
        out[key] = {"point": point, "relative_error": relative_errors(
            {n: predict(base, n, *point) for n in FITTED}, compiled)}
    small = models["llama-3-8b|v5e|m2|dense"].fit
    compiled = results["check|data-parallel|2x2|L2|b16|S8192"]
    out["data-parallel"] = {"point": "2x2 mesh, batch 16 vs the 1x2 program at batch 8", "relative_error":
                            relative_errors({n: predict(small, n, 2, 8, 8192) for n in FITTED}, compiled)}
    quant = models["llama-3-8b|v5e|m4|zipcache-4/2"].fit
    out["zipcache"] = {"point": (4, 8, 8192), "relative_error": relative_errors(
        {n: predict(quant, n, 4, 8, 8192) for n in FITTED}, results["check|zipcache|L4|b8|S8192"])}
    out["argument_bytes_max_difference"] = argument_check(plan, results)
    return out


def confirm_largest_batch(models: dict[str, Decode], store: CompileCache, bar_desc: str) -> dict[str, Any]:
    """Compile LLaMA-3-8B on v5e (1x4, dense, 8k) at full depth at the bisected batch and one above it."""
    model = models["llama-3-8b|v5e|m4|dense"]
    best = model.largest_batch(8192)
    out = {"program": model.prog.key, "context": 8192, "bisected_batch": best}
    bar = Progress(2, bar_desc)
    for batch in (best, best + 1):
        predicted = model.memory(batch, 8192)["total_bytes"]
        try:
            compiled = store.get(f"check|largest|L32|b{batch}|S8192",
                                 functools.partial(decode_point, model.prog, 32, batch, 8192))
        except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program that does not fit the chip
            out[f"batch_{batch}"] = {"predicted_total_bytes": predicted, "fits": False,
                                     "compiler": str(e).strip().splitlines()[0][:300]}
        else:
            total = compiled["argument_bytes"] + compiled["temp_bytes"] + compiled["extra_bytes"]
            out[f"batch_{batch}"] = {"compiled_total_bytes": total, "predicted_total_bytes": predicted,
                                     "fits": total <= chip_of("v5e").hbm_bytes}
        bar.update(f"largest batch check b={batch}")
    bar.close()
    return out


# ------------------------------------------------------------------ the grid


def meshes(topology: str, model: str, cache: str, models: dict[str, Decode]) -> list[tuple[int, int, Decode]]:
    """(data, model, program) for every compiled per-chip program whose m divides the topology's chips."""
    gen, chips = TOPOLOGIES[topology].split(":")[0], len(aot.target(TOPOLOGIES[topology]).devices)
    found = [(chips // d.prog.m, d.prog.m, d) for d in models.values()
             if d.prog.model == model and d.prog.gen == gen and d.prog.cache == cache and chips % d.prog.m == 0]
    return sorted(found, key=lambda x: x[1])


@functools.cache
def chips_of(topology: str) -> int:
    return len(aot.target(TOPOLOGIES[topology]).devices)


def prefill_fits(plan: Plan, results: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """Per (model, gen): the reference m and, per context, full-depth figures (affine in layers)."""
    out = {}
    for model, gen, m in plan.prefill:
        full = model_config(model).num_layers
        per_context = {}
        for context in plan.prefill_contexts:
            two = results[f"prefill|{model}|{gen}|m{m}|L2|S{context}"]
            four = results[f"prefill|{model}|{gen}|m{m}|L4|S{context}"]
            per_context[context] = {name: two[name] + (full - 2) * (four[name] - two[name]) / 2
                                    for name in ("flops", "bytes_accessed", "collective_total", "temp_bytes")}
        out[(model, gen)] = {"m": m, "contexts": per_context}
    return out


def ttft(prefills: dict, model: str, gen: str, m: int, context: int) -> dict[str, Any] | None:
    """Roofline TTFT on an m-way model axis of `gen`: the reference program's per-chip FLOPs and bytes scaled by
    m_ref / m (collective bytes kept), from the v5e compile where that generation has none (same HLO)."""
    ref = prefills.get((model, gen)) or prefills.get((model, "v5e"))
    if ref is None or context not in ref["contexts"]:
        return None
    f, scale = ref["contexts"][context], ref["m"] / m
    out = roofline(f["flops"] * scale, f["bytes_accessed"] * scale, f["collective_total"], gen)
    return {"ttft_s": out["step_s"], "bound": out["bound"], "reference_m": ref["m"]}


def grid(plan: Plan, models: dict[str, Decode], prefills: dict) -> list[dict[str, Any]]:
    rows = []
    names = sorted({p.model for p in plan.decode}, key=lambda n: MODELS.index(n) if n in MODELS else -1)
    for model in names:
        for topology in plan.topologies:
            gen, chips = TOPOLOGIES[topology].split(":")[0], chips_of(topology)
            for cache in CACHES:
                for context in plan.contexts:
                    options = []
                    for data, m, program in meshes(topology, model, cache, models):
                        best = program.largest_batch(context)
                        option = {"mesh": f"{data}x{m}", "data": data, "model": m, "largest_batch_per_replica": best,
                                  "sequences_per_chip": best / m, "global_batch": best * data,
                                  "attention": attention_path(cache, m)}
                        if best:
                            step = program.step(best, context)
                            per_chip = best / (m * step["step_s"])
                            option.update({"step": step, "tok_s_per_chip": per_chip, "tok_s_per_pod": per_chip * chips,
                                           "ideal_tok_s_per_chip": best / (m * step["ideal_step_s"]),
                                           "batch1_step_s": program.step(1, context)["step_s"],
                                           "ttft": ttft(prefills, model, gen, m, context)})
                        options.append(option)
                    fitting = [o for o in options if o["largest_batch_per_replica"]]
                    best_mesh = max(fitting, key=lambda o: (o["tok_s_per_chip"], -o["model"]), default=None)
                    rows.append({"model": model, "topology": topology, "chips": chips, "cache": cache,
                                 "context": context, "meshes": options,
                                 "best_mesh": best_mesh["mesh"] if best_mesh else None})
    return rows


def zipar_curves(plan: Plan, results: dict[str, dict]) -> list[dict[str, Any]]:
    """Per generation: pass time against active rows (1..90) at full depth, and where it stops being
    bandwidth-bound."""
    out = []
    full = model_config("emu3-gen").num_layers
    for gen, m in plan.zipar:
        at = {}
        for rows in (1, ZIPAR_ROWS):
            two, four = (results[f"zipar|{gen}|m{m}|L{layers}|r{rows}"] for layers in (2, 4))
            at[rows] = {n: two[n] + (full - 2) * (four[n] - two[n]) / 2 for n in FITTED}
        slope = {n: (at[ZIPAR_ROWS][n] - at[1][n]) / (ZIPAR_ROWS - 1) for n in FITTED}
        curve = []
        for rows in range(1, ZIPAR_ROWS + 1):
            f = {n: at[1][n] + slope[n] * (rows - 1) for n in FITTED}
            curve.append({"rows": rows, **roofline(f["flops"], f["bytes_accessed"], f["collective_total"], gen)})
        compute_bound = next((c["rows"] for c in curve if c["bound"] == "compute"), None)
        out.append({"gen": gen, "m": m, "curve": curve, "first_compute_bound_rows": compute_bound,
                    "pass_s_rows_1": curve[0]["step_s"], "pass_s_rows_90": curve[-1]["step_s"]})
    if plan.validate:
        two_1, two_90 = results["zipar|v5e|m4|L2|r1"], results["zipar|v5e|m4|L2|r90"]
        check = results["check|zipar|v5e|m4|L2|r8"]
        predicted = {n: two_1[n] + (two_90[n] - two_1[n]) * 7 / 89 for n in FITTED}
        out.append({"check": "affine in rows at r=8 (v5e, m4, 2 layers)",
                    "relative_error": relative_errors(predicted, check)})
    return out




# ------------------------------------------------------------------ measured


def chip_for_device(device: jax.Device) -> str | None:
    """The CHIPS entry of a real device, or None (a CPU has no peak figures)."""
    kind = device.device_kind.lower()
    for gen, needle in (("v5e", "v5 lite"), ("v6e", "v6 lite"), ("v5p", "v5"), ("h200", "h200"), ("h100", "h100")):
        if needle in kind:
            return gen
    return None


def measure(checkpoint: Path, batches: Sequence[int], new_tokens: int, prompt_len: int,
            mesh_shape: tuple[int, int] | None) -> list[dict[str, Any]]:
    """Time `zipjax.generate_stream` on this process's devices: TTFT, p50/p99 per output token, tok/s per chip and
    MBU, with the bandwidth roofline of the same step beside them (where the chip has peak figures)."""
    mesh = zipjax.make_mesh(*mesh_shape) if mesh_shape else None
    model = zipjax.load(checkpoint, mesh=mesh)
    chips = mesh.devices.size if mesh is not None else 1
    gen = chip_for_device(jax.devices()[0])
    config = model.config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    text = "def read_config(path):\n    " * (1 + prompt_len // 4)
    ids = model.tokenizer.encode(text)[:prompt_len]
    rows = []
    for batch in batches:
        prompts = [ids] * batch
        list(zipjax.generate_stream(model, prompts, new_tokens, stop_tokens=()))  # compile
        start = time.perf_counter()
        stamps = []
        for _ in zipjax.generate_stream(model, prompts, new_tokens, stop_tokens=()):
            stamps.append(time.perf_counter())
        per_token = np.diff(np.array(stamps))  # seconds per output token after the first
        p50, p99 = float(np.percentile(per_token, 50)), float(np.percentile(per_token, 99))
        live = prompt_len + new_tokens // 2
        kv_bytes = 2 * config.num_layers * batch * config.num_kv_heads * live * config.head_dim * 2
        ideal = (weight_bytes + kv_bytes) / chips  # per chip, bf16 cache
        row = {"batch": batch, "chips": chips, "device": jax.devices()[0].device_kind, "prompt_tokens": len(ids),
               "new_tokens": new_tokens, "ttft_s": stamps[0] - start, "p50_s": p50, "p99_s": p99,
               "tok_s_per_chip": batch / p50 / chips, "ideal_bytes_per_chip": ideal, "mbu": None,
               "roofline_step_s": None}
        if gen is not None:
            bandwidth = aot.CHIPS[gen].hbm_bandwidth
            row.update(mbu=ideal / p50 / bandwidth, roofline_step_s=ideal / bandwidth)
        rows.append(row)
    return rows


def print_measured(rows: Iterable[dict]) -> None:
    print("\nmeasured (this process's devices)")
    print(f"{'batch':>5} {'device':>12} {'TTFT ms':>9} {'p50 ms':>8} {'p99 ms':>8} {'tok/s/chip':>11} "
          f"{'roofline ms':>11} {'MBU':>6}")
    for r in rows:
        roof = f"{r['roofline_step_s'] * 1e3:.3f}" if r["roofline_step_s"] else "n/a"
        mbu = f"{r['mbu']:.2f}" if r["mbu"] is not None else "n/a"
        print(f"{r['batch']:>5} {r['device'][:12]:>12} {r['ttft_s'] * 1e3:>9.2f} {r['p50_s'] * 1e3:>8.3f} "
              f"{r['p99_s'] * 1e3:>8.3f} {r['tok_s_per_chip']:>11.1f} {roof:>11} {mbu:>6}")


# ------------------------------------------------------------------ output


def print_table(rows: list[dict], context: int) -> None:
    print(f"\ncompiled predictions, context {context}: best mesh per topology and cache (per chip; roofline)")
    print(f"{'model':<12} {'topology':<8} {'cache':<13} {'mesh':>5} {'batch':>5} {'GiB':>6} {'step ms':>8} "
          f"{'bound':>10} {'tok/s/chip':>10} {'tok/s/pod':>10} {'TTFT ms':>8}")
    for row in rows:
        if row["context"] != context:
            continue
        best = next((o for o in row["meshes"] if o["mesh"] == row["best_mesh"]), None)
        if best is None:
            tried = ", ".join(o["mesh"] for o in row["meshes"])
            why = f"does not fit on any compiled mesh ({tried})" if tried else "not compiled for this topology"
            print(f"{row['model']:<12} {row['topology']:<8} {row['cache']:<13} {why}")
            continue
        step, ttft_ = best["step"], best["ttft"]
        ttft_text = f"{ttft_['ttft_s'] * 1e3:.3g}" if ttft_ else "-"
        print(f"{row['model']:<12} {row['topology']:<8} {row['cache']:<13} {best['mesh']:>5} "
              f"{best['largest_batch_per_replica']:>5} {step['total_bytes'] / GIB:>6.2f} {step['step_s'] * 1e3:>8.2f} "
              f"{step['bound']:>10} {best['tok_s_per_chip']:>10.0f} {best['tok_s_per_pod']:>10.0f} {ttft_text:>8}")


def print_zipar(curves: list[dict]) -> None:
    for c in curves:
        if "curve" in c:
            print(f"ZipAR pass, Emu3-Gen 90x90 + guidance, {c['gen']} (model axis {c['m']}): "
                  f"{c['pass_s_rows_1'] * 1e3:.2f} ms at 1 row, {c['pass_s_rows_90'] * 1e3:.2f} ms at 90 rows; "
                  f"compute-bound from {c['first_compute_bound_rows'] or 'more than 90'} active rows")


COLORS = {"dense": (31, 119, 180), "zipcache-4/2": (214, 39, 40), "kivi-2": (44, 160, 44),
          "v5e": (31, 119, 180), "v5p": (214, 39, 40), "v6e": (44, 160, 44)}


def plot(rows: list[dict], curves: list[dict], path: Path) -> None:
    """Two panels drawn with Pillow: sequences per chip that fit against context, per cache, for each model's
    best-covered topology; ZipAR pass time against active rows per chip generation."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1200, 520), "white")
    draw = ImageDraw.Draw(image)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["topology"] not in ("v5e-16", "v5e-4") or not row["meshes"]:
            continue
        best = max(o["sequences_per_chip"] for o in row["meshes"])
        series.setdefault(f"{row['model']} {row['topology']} {row['cache']}", []).append(
            (math.log2(row["context"]), best))
    _panel(draw, (60, 40, 560, 440), series, "log2 context", "sequences per chip that fit (best mesh)")
    zipar = {f"ZipAR {c['gen']}": [(p["rows"], p["step_s"] * 1e3) for p in c["curve"]] for c in curves
             if "curve" in c}
    _panel(draw, (680, 40, 1180, 440), zipar, "active rows", "predicted pass ms (Emu3-Gen)")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _panel(draw, box: tuple[int, int, int, int], series: dict[str, list[tuple[float, float]]], xlabel: str,
           ylabel: str) -> None:
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


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (the shipped model's shape), for CI")
    parser.add_argument("--measure-only", action="store_true", help="skip the compiled predictions")
    parser.add_argument("--no-measure", action="store_true", help="skip the measured part")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED, help="what the measured part loads")
    parser.add_argument("--mesh", default=None, help="DATAxMODEL mesh for the measured part (default: one device)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (every host of a pod runs the same command)")
    parser.add_argument("--batches", default="1,8", help="measured batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="write a jax.profiler trace of the measured part to DIR")
    return parser.parse_args(argv)


def compiled_part(plan: Plan, out: Path, quick: bool) -> dict[str, Any]:
    store = CompileCache(out / ("pod_quick_compiles.json" if quick else "pod_compiles.json"))
    start = time.perf_counter()
    results = run_compiles(plan, store)
    models = decode_models(plan, results)
    largest = {} if quick else confirm_largest_batch(models, store, "largest-batch check")
    prefills = prefill_fits(plan, results)
    rows = grid(plan, models, prefills)
    curves = zipar_curves(plan, results)
    compile_seconds = sum(r["compile_seconds"] for r in store.points.values())
    payload = {
        "what": "compiled ahead of time with libtpu for described TPU topologies; predictions, nothing ran",
        "jax": jax.__version__, "plan": dataclasses.asdict(plan), "chips": {g: dataclasses.asdict(aot.CHIPS[g])
                                                                            for g in ("v5e", "v5p", "v6e")},
        "ici_bytes_per_s": ICI, "compiles": len(store.points), "compile_seconds_total": round(compile_seconds, 1),
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
        "fits": {key: {"fit": d.fit, "layers": d.layers} for key, d in models.items()},
        "validation": {**validation(plan, results, models), "largest_batch": largest},
        "prefill": {f"{m}|{g}": v for (m, g), v in prefills.items()}, "grid": rows, "zipar": curves,
        "points": store.points,
    }
    name = "pod_quick.json" if quick else "pod_tpu_aot.json"
    write_json(out / name, payload)
    plot(rows, curves, out / ("pod_quick.png" if quick else "pod_tpu_aot.png"))
    for context in plan.contexts:
        print_table(rows, context)
    print_zipar(curves)
    print(f"\n{len(store.points)} compiled points ({store.compiled} compiled in this run, "
          f"{compile_seconds / 60:.1f} min of compiling in all); {out / name}")
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    out: dict[str, Any] = {}
    if not args.measure_only:
        out["compiled"] = compiled_part(quick_plan() if args.quick else full_plan(), args.out, args.quick)
    if not args.no_measure:
        mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
        batches = [int(b) for b in args.batches.split(",")]
        new_tokens = 16 if args.quick else args.new_tokens
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(args.profile)) if args.profile else contextlib.nullcontext():
            rows = measure(args.checkpoint, batches, new_tokens, args.prompt_tokens, mesh)
        print_measured(rows)
        if jax.process_index() == 0:
            name = f"pod_measured_{jax.default_backend()}{'_quick' if args.quick else ''}.json"
            write_json(args.out / name, {"what": "measured on this process's devices", "checkpoint":
                                         str(args.checkpoint), "rows": rows})
        out["measured"] = rows
    return out


if __name__ == "__main__":
    main()
