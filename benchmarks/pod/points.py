"""Compiling one point of the pod benchmark for a described TPU topology (nothing runs): a decode step, a prefill
or a ZipAR pass, from abstract weights and caches with the library's shardings, summarised per chip as a `Point`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from zipjax import aot
from zipjax.config import ModelConfig
from zipjax.kv.methods import init_cache
from zipjax.sharding import logical_sharding, tree_shardings
from zipjax.transformer import PREFILL_CHUNK, Transformer, abstract_params, param_logical_axes, prompt_pass

from .fit import Figures
from .plan import CACHES, DECODE_ROOM, ZIPAR_SLOTS, Program, config_of, host

_OPTIONAL = ("hlo", "exact_argument_bytes", "chunks")


@dataclasses.dataclass(frozen=True)
class Point:
    """One compiled program, per chip: the compiler's memory plan and cost analysis, and its collectives."""

    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    extra_bytes: int  # outputs not aliased to the donated cache
    flops: float
    bytes_accessed: float
    collectives: Mapping[str, int]  # op kind -> count
    collective_bytes: Mapping[str, float]  # op kind -> bytes of its results
    collective_total: float
    compile_seconds: float
    hlo: str | None = dataclasses.field(default=None, repr=False)  # the compiled HLO text, where asked for
    exact_argument_bytes: int | None = None  # decode points: from shapes and shardings, no compile
    chunks: int | None = None  # prefill points: the prompt's chunks (a loop body the cost analysis counts once)

    @property
    def figures(self) -> Figures:
        return Figures.of(self)

    def to_json(self) -> dict[str, Any]:
        fields = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: value for name, value in fields if not (name in _OPTIONAL and value is None)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Point:
        return cls(**data)


def _shard_bytes(tree, shardings) -> int:
    """Bytes one chip holds of `tree` (ShapeDtypeStructs) under `shardings`: exact, no compile."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, specs, strict=True))


def attention_path(cache: str, chips: int) -> str:
    if CACHES[cache] is None:
        return "flash kernel per shard"
    return "Pallas kernel over packed codes" + (" per shard" if chips > 1 else "")


def abstract_cache(config: ModelConfig, cache: str, batch: int, context: int, mesh):
    """(abstract cache with shardings, its shardings): the state of a decode step with `context` slots."""
    method = CACHES[cache]
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
                  **jit_kwargs) -> Point:
    """Compile `fn(*args)` for `target` and summarise per chip: the Report's figures plus collective bytes by kind
    (and the compiled HLO text if asked). `scale` multiplies what a loop body counts once (FLOPs, bytes accessed,
    collective bytes)."""
    with jax.set_mesh(mesh):
        compiled, report = aot.compile(fn, *args, target=target, **jit_kwargs)
    coll = {k: v * scale for k, v in collective_bytes(compiled.as_text()).items()}
    return Point(argument_bytes=report.argument_bytes, temp_bytes=report.temp_bytes,
                 output_bytes=report.output_bytes, alias_bytes=report.alias_bytes,
                 extra_bytes=report.output_bytes - report.alias_bytes,
                 flops=(report.flops or 0.0) * scale, bytes_accessed=(report.bytes_accessed or 0.0) * scale,
                 collectives=report.collectives, collective_bytes=coll, collective_total=float(sum(coll.values())),
                 compile_seconds=round(report.compile_seconds, 2), hlo=compiled.as_text() if hlo else None)


def decode_point(prog: Program, layers: int, batch: int, context: int, data: int = 1, hlo: bool = False) -> Point:
    """One decode step of `prog` with `layers` layers, `batch` sequences in all, `context` cache slots, on a
    (data, m) mesh of the program's host topology (data > 1 only for the data-parallel check); `hlo`: keep the
    compiled HLO text."""
    config = config_of(prog.model, layers)
    target = host(prog.gen, prog.m * data) if data > 1 else host(prog.gen, prog.m)
    mesh = aot.mesh(target, data, prog.m)
    params, param_sh = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, prog.cache, batch, context, mesh)
    tokens = batch_array((batch, 1), mesh)
    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (batch, 1, config.vocab_size), mesh)

    def step(params, tokens, cache):
        return Transformer(config).apply({"params": params}, tokens, jnp.zeros_like(tokens), cache, last_only=True)

    out = compile_point(step, (params, tokens, cache), target, mesh, hlo=hlo, donate_argnames=("cache",),
                        out_shardings=(logits_sh, cache_sh))
    exact = _shard_bytes(params, param_sh) + _shard_bytes(cache, cache_sh) + _shard_bytes(tokens, tokens.sharding)
    return dataclasses.replace(out, exact_argument_bytes=exact)


def prefill_point(model: str, gen: str, m: int, layers: int, context: int) -> Point:
    """The prompt (batch 1, `context` tokens) through `prompt_pass` into a dense cache of context + 128 slots."""
    config = config_of(model, layers)
    target = host(gen, m)
    mesh = aot.mesh(target, 1, m)
    params, _ = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, "dense", 1, context + 128, mesh)
    ids = batch_array((1, context), mesh)
    chunks = context // PREFILL_CHUNK if context > PREFILL_CHUNK and context % PREFILL_CHUNK == 0 else 1

    def prefill(params, ids, cache):
        positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), ids.shape)
        return prompt_pass(params, config, ids, positions, cache)

    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (1, 1, config.vocab_size), mesh)
    out = compile_point(prefill, (params, ids, cache), target, mesh, scale=chunks, donate_argnames=("cache",),
                        out_shardings=(logits_sh, cache_sh))
    return dataclasses.replace(out, chunks=chunks)


def zipar_point(gen: str, m: int, layers: int, rows: int) -> Point:
    """One ZipAR pass of Emu3-Gen: `rows` queries for each of 2 sequences (guidance), an 8,320-slot cache, logits
    over the 32,768 visual tokens only (Emu3 samples image codes from that slice)."""
    config = config_of("emu3-gen", layers)
    target = host(gen, m)
    mesh = aot.mesh(target, 1, m)
    params, _ = abstract_model(config, mesh)
    cache, cache_sh = abstract_cache(config, "dense", 2, ZIPAR_SLOTS, mesh)
    tokens = batch_array((2, rows), mesh)
    head = aot.array((config.hidden_size, 32768), config.jnp_dtype,
                     logical_sharding(PartitionSpec("embed", "vocab"), (config.hidden_size, 32768), mesh))

    def one_pass(params, tokens, cache, head):
        return Transformer(config).apply({"params": params}, tokens, jnp.zeros_like(tokens), cache, head=head)

    logits_sh = logical_sharding(PartitionSpec("batch", None, "vocab"), (2, rows, 32768), mesh)
    return compile_point(one_pass, (params, tokens, cache, head), target, mesh, donate_argnames=("cache",),
                         out_shardings=(logits_sh, cache_sh))
