"""The weight-delta contract: what the model calls to add per-sequence weight deltas, like zipjax.cache for caches.

    logits, cache = Transformer(config).apply({"params": params}, tokens, positions, cache, deltas=deltas)

A `WeightDeltas` is a pytree passed into the model (traced, so a new choice of deltas per sequence never
recompiles). The model calls it at three kinds of places, each named as in the parameter tree:

    linear(site, x)     every projection, site "layer_i/attn/q" ... "layer_i/mlp/down", "embed" (a tied output head)
                        or "lm_head": x [batch, seq, in] (the weight seen as [in, out]) -> float32 [batch, seq, out],
                        added to x @ W
    embedding(tokens)   tokens int32 [batch, seq] -> float32 [batch, seq, embed], added to the embedded tokens
    norm(name)          name "layer_i/attn_norm", "layer_i/mlp_norm" or "final_norm" -> float32 [batch, 1, embed],
                        added to the norm's scale
    take(rows)          the same deltas for a subset of the batch rows (the model computes some rows' logits only)

One implementation ships: ME-Switch's compressed expert deltas (zipjax.experts.delta.ExpertDeltas), built by
`zipjax.experts.attach`; the model itself knows nothing of experts.

A leaf: imports jax only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class WeightDeltas(Protocol):
    """What `zipjax.transformer.Transformer` calls on its `deltas` argument (see the module docstring)."""

    def linear(self, site: str, x: jax.Array) -> jax.Array:
        """x [batch, seq, in] -> float32 [batch, seq, out]: the delta term of projection `site`."""
        ...

    def embedding(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [batch, seq] -> float32 [batch, seq, embed]: the delta rows of the embedding."""
        ...

    def norm(self, name: str) -> jax.Array:
        """float32 [batch, 1, embed]: the delta of norm `name`'s scale, per sequence."""
        ...

    def take(self, rows: jax.Array) -> WeightDeltas:
        """The deltas of batch rows `rows` (int32 [r]) only, in that order (the output head of selected rows)."""
        ...
