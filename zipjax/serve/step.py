"""One engine step on the device: the model over a flat batch of tokens through the paged cache, then each sampled
row's next token chosen by that row's own settings and random stream.

    pool, out = serve_step(params, pool, batch, deltas, prev, config=..., block_pages=...)

Rows are the tokens whose logits are needed: every decode row, and the last token of each prefill block (the host
keeps those that end a prompt). A row's random key is `fold_in(key(seed), index)`, index counting the request's
generated tokens, so a seeded request draws the same tokens alone, under load and after a preemption.
Which rows sample, filter (top-k, top-p) or want log-probabilities is data, not a compile-time switch: the step
compiles once per (decode rows, prefill blocks) bucket, and the sort that top-k / top-p need runs only when some row
asks for it (`lax.cond`).

Async scheduling: the engine dispatches a step before it has read the previous step's tokens. A token whose value
is the previous step's output has `batch.source` >= 0, its row in `prev` (the previous step's `carry`: its sampled
tokens padded to a fixed length), and is taken from there on the device; the step's own `carry` feeds the next one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from zipjax.config import ModelConfig
from zipjax.deltas import WeightDeltas
from zipjax.sampling import filter_logits
from zipjax.serve.packed import PackedPool, PageCodec, compress_layer
from zipjax.serve.paged import PagedCache, Pool, StepLayout
from zipjax.serve.requests import MAX_TOP_LOGPROBS
from zipjax.transformer import Params, Transformer


@struct.dataclass
class StepBatch:
    """A step's host-built inputs: T flat tokens (decode rows first, then prefill blocks) and R sampled rows."""

    tokens: jax.Array  # int32 [T]
    positions: jax.Array  # int32 [T]: RoPE positions (0 for padding)
    layout: StepLayout
    rows: jax.Array  # int32 [R]: index into the T tokens of each sampled row
    temperature: jax.Array  # float32 [R]: 0 greedy
    top_k: jax.Array  # int32 [R]: 0 off
    top_p: jax.Array  # float32 [R]: 1 off
    seeds: jax.Array  # uint32 [R]
    counters: jax.Array  # int32 [R]: tokens the row's request has generated so far
    want_logprobs: jax.Array  # bool []: some row asks for log-probabilities
    source: jax.Array | None = None  # int32 [T]: the row of `prev` holding the token (-1: `tokens` holds it)


@struct.dataclass
class StepOutput:
    tokens: jax.Array  # int32 [R]
    logprobs: jax.Array  # float32 [R]: log-probability of the chosen token (0 unless want_logprobs)
    top_ids: jax.Array  # int32 [R, MAX_TOP_LOGPROBS]: the most likely tokens (0 unless want_logprobs)
    top_logprobs: jax.Array  # float32 [R, MAX_TOP_LOGPROBS]
    carry: jax.Array | None = None  # int32 [C]: `tokens` padded to prev's length C, the next step's prev


@functools.partial(jax.jit, static_argnames=("config", "block_pages", "spec"), donate_argnames=("pool",))
def serve_step(params: Params, pool: Pool, batch: StepBatch, deltas: WeightDeltas | None,
               prev: jax.Array | None = None, *, config: ModelConfig, block_pages: int,
               spec: PageCodec | None = None) -> tuple[Pool, StepOutput]:
    """The model over the step's tokens ([T, 1]: each token its own row), the chosen tokens of the sampled rows.
    `prev` int32 [C] (C >= R): the previous step's carry, read where `batch.source` points into it."""
    tokens = batch.tokens
    if prev is not None and batch.source is not None:
        tokens = jnp.where(batch.source >= 0, prev[jnp.maximum(batch.source, 0)], tokens)
    cache = PagedCache(pool, batch.layout, block_pages, spec)
    logits, cache = Transformer(config).apply({"params": params}, tokens[:, None], batch.positions[:, None],
                                              cache, deltas=deltas, rows=batch.rows)
    out = choose(logits[:, 0], batch)  # logits [R, vocab]
    if prev is not None:
        out = out.replace(carry=jnp.zeros_like(prev).at[:out.tokens.shape[0]].set(out.tokens))
    return cache.pool, out


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def pack_pages(pool: Pool, dense_ids: jax.Array, packed_ids: jax.Array, *, spec: PageCodec) -> Pool:
    """Every layer's dense pages dense_ids int32 [C] packed into packed_ids int32 [C] (zipjax.serve.packed); the
    engine runs it before a step that reads them packed."""
    stores, scales = [], []
    for layer in range(len(pool.k)):
        mass = None if pool.mass is None else pool.mass[layer]
        v_scale = None if pool.packed.v_scale is None else pool.packed.v_scale[layer]
        layer_stores, scale = compress_layer(spec, pool.k[layer], pool.v[layer], mass, pool.packed.stores[layer],
                                             v_scale, dense_ids, packed_ids)
        stores.append(layer_stores)
        scales.append(scale)
    packed = PackedPool(tuple(stores), None if pool.packed.v_scale is None else tuple(scales))
    return dataclasses.replace(pool, packed=packed)


def choose(logits: jax.Array, batch: StepBatch) -> StepOutput:
    """Next tokens of logits float32 [R, vocab] by each row's settings, and their log-probabilities when asked."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(jnp.any(batch.temperature > 0), _sample, lambda *_: greedy, logits, batch)
    tokens = jnp.where(batch.temperature > 0, sampled, greedy)
    return jax.lax.cond(batch.want_logprobs, _with_logprobs, _without_logprobs, logits, tokens)


def _sample(logits: jax.Array, batch: StepBatch) -> jax.Array:
    scaled = logits / jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    filtering = jnp.any((batch.top_k > 0) | (batch.top_p < 1))
    scaled = jax.lax.cond(filtering, _filter_rows, lambda x, *_: x, scaled, batch.top_k, batch.top_p)
    keys = jax.vmap(lambda seed, index: jax.random.fold_in(jax.random.key(seed), index))(batch.seeds, batch.counters)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _filter_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Each row's top-k then top-p filter (zipjax.sampling's order and tie rules); k 0 and p 1 leave a row as is."""

    def one(row, k, p):
        filtered = filter_logits(row[None], jnp.where(k > 0, k, row.shape[-1]), p)[0]
        return jnp.where((k > 0) | (p < 1), filtered, row)

    return jax.vmap(one)(logits, top_k, top_p)


def _with_logprobs(logits: jax.Array, tokens: jax.Array) -> StepOutput:
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return StepOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def _without_logprobs(logits: jax.Array, tokens: jax.Array) -> StepOutput:
    rows, top = tokens.shape[0], min(MAX_TOP_LOGPROBS, logits.shape[-1])
    return StepOutput(tokens, jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, top), jnp.int32),
                      jnp.zeros((rows, top), jnp.float32))
