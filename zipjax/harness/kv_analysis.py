"""Harness: the per-layer queries, keys and values a prompt produces, for saliency studies, tests and
benchmarks (un-jitted; nothing in the library uses this). Imports: the transformer and the dense cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zipjax.kv.dense import KVCache
from zipjax.transformer import Transformer


class _Recorder:
    """A dense cache that also keeps each layer's queries and keys (un-jitted analysis runs only)."""

    accepts_chunks = False

    def __init__(self, cache):
        self.cache, self.seen = cache, {}

    def check_fits(self, shape):
        self.cache.check_fits(shape)

    def attend(self, layer, q, k_new, v_new, sliding_window):
        self.seen[layer] = (q, k_new, v_new)
        out, self.cache = self.cache.attend(layer, q, k_new, v_new, sliding_window)
        return out, self

    def advance(self, num_tokens):
        self.cache = self.cache.advance(num_tokens)
        return self


def prompt_queries_keys(model, ids) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer, the RoPE'd queries [batch, length, heads, head_dim] and keys [batch, length, kv_heads, head_dim]
    of int prompts [batch, length] (no padding): what saliency is computed from, for analysis and tests."""
    return [(q, k) for q, k, _ in prompt_states(model, ids)]


def prompt_states(model, ids) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Per layer, (queries, keys, values) of int prompts [batch, length] as `prompt_queries_keys`."""
    ids = jnp.asarray(ids, jnp.int32)
    recorder = _Recorder(KVCache.init(model.config, ids.shape[0], ids.shape[1]))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    Transformer(model.config).apply({"params": model.params}, ids, positions, recorder)
    return [recorder.seen[i] for i in range(model.config.num_layers)]
