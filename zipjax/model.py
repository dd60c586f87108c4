"""`Model`: a loaded checkpoint (config + parameter pytree + optional mesh) with jitted entry points.

The numerics live in zipjax.transformer as a pure function; this class only binds parameters to it so users can
write `model.logits(tokens)` and `zipjax.generate(model, ...)`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.sharding import mesh_context, place, to_host
from zipjax.tokenizer import Tokenizer
from zipjax.transformer import Params, Transformer


@functools.partial(jax.jit, static_argnames=("config", "last_only"))
def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None, *,
            config: ModelConfig, last_only: bool = False, experts=None) -> tuple[jax.Array, Cache | None]:
    """Jitted `Transformer(config).apply`: logits float32 [batch, seq or 1, vocab] and the updated cache.
    experts: per-sequence expert deltas (zipjax.experts), or None."""
    return Transformer(config).apply({"params": params}, tokens, positions, cache, last_only=last_only,
                                     experts=experts)


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str = "token ids") -> None:
    """Out-of-range ids would be clamped silently by the embedding gather: refuse them instead."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ZipjaxError(f"{what} must lie in [0, {vocab_size}); got {bad[:5].tolist()}")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    params: Params
    mesh: Mesh | None = None
    path: Path | None = None

    def apply(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *,
              last_only: bool = False) -> tuple[jax.Array, Cache | None]:
        """`apply(params, tokens, positions, cache) -> (logits, cache)` with this model's parameters bound."""
        with mesh_context(self.mesh):
            return forward(self.params, tokens, positions, cache, config=self.config, last_only=last_only)

    def logits(self, tokens) -> jax.Array:
        """float32 [batch, seq, vocab] for int tokens [batch, seq], plain causal attention and no cache."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ZipjaxError(f"tokens must be a non-empty integer array [batch, seq], got shape {tokens.shape}")
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise ZipjaxError(
                f"{tokens.shape[1]} tokens exceed the model's maximum of {self.config.max_position_embeddings}"
            )
        check_token_ids(tokens, self.config.vocab_size)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        batch = PartitionSpec("data", None)
        logits = self.apply(place(tokens.astype(np.int32), self.mesh, batch), place(positions, self.mesh, batch))[0]
        return logits if logits.is_fully_addressable else to_host(logits)  # a multi-host mesh: gathered

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        if self.path is None:
            raise ZipjaxError("this model was not loaded from a checkpoint folder, so it has no tokenizer")
        return Tokenizer(self.path)
