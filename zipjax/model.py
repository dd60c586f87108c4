"""`Model`: a loaded checkpoint (config + parameter pytree + optional mesh) with jitted entry points.

The numerics live in zipjax.transformer as a pure function; this class only binds parameters to it so users can
write `model.logits(tokens)` and `zipjax.generate(model, ...)`.

A model may also carry a `DeltaSource` (`model.deltas`): per-sequence weight variants chosen by name with `expert=`
(`model.logits(tokens, expert="c")`, `zipjax.generate(model, prompts, n, expert=[...])`). `zipjax.experts.attach`
builds one from an ME-Switch bank; `batch_inputs` is all that generate and this class ask of it, so neither knows
what an expert is.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.deltas import WeightDeltas
from zipjax.errors import ZipjaxError
from zipjax.sharding import mesh_context, place, to_host
from zipjax.tokenizer import Tokenizer
from zipjax.transformer import Params, Transformer


@functools.partial(jax.jit, static_argnames=("config", "last_only"))
def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Cache | None, *,
            config: ModelConfig, last_only: bool = False,
            deltas: WeightDeltas | None = None) -> tuple[jax.Array, Cache | None]:
    """Jitted `Transformer(config).apply`: logits float32 [batch, seq or 1, vocab] and the updated cache.
    deltas: per-sequence weight deltas (zipjax.deltas), or None."""
    return Transformer(config).apply({"params": params}, tokens, positions, cache, last_only=last_only,
                                     deltas=deltas)


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str = "token ids") -> None:
    """Out-of-range ids would be clamped silently by the embedding gather: refuse them instead."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ZipjaxError(f"{what} must lie in [0, {vocab_size}); got {bad[:5].tolist()}")


class DeltaSource(Protocol):
    """Weight variants a `Model` serves per sequence (`model.deltas`), chosen by `expert=`: a name, None (the
    model alone), one of those per sequence, or whatever else the source accepts (ME-Switch: "auto")."""

    def batch_inputs(self, model: Model, expert, batch: int,
                     prompts: list[np.ndarray] | None = None) -> tuple[Params, WeightDeltas | None]:
        """The parameters and the traced deltas a batch of `batch` sequences runs with (`prompts`: their token ids,
        for a source that picks by content; None where there are none)."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    params: Params
    mesh: Mesh | None = None
    path: Path | None = None
    deltas: DeltaSource | None = None  # per-sequence weight variants (zipjax.experts.attach), chosen by `expert=`

    def batch_inputs(self, expert, batch: int,
                     prompts: list[np.ndarray] | None = None) -> tuple[Params, WeightDeltas | None]:
        """The parameters and weight deltas that `batch` sequences served by `expert` run with."""
        if self.deltas is None:
            if expert is not None:
                raise ZipjaxError("expert= needs a model with experts: zipjax.experts.attach(base, bank)")
            return self.params, None
        return self.deltas.batch_inputs(self, expert, batch, prompts)

    def apply(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *,
              last_only: bool = False, expert=None) -> tuple[jax.Array, Cache | None]:
        """`apply(params, tokens, positions, cache) -> (logits, cache)` with this model's parameters bound.
        expert: with `deltas`, each sequence's variant (a name or one per sequence; None: the model alone)."""
        params, deltas = self.batch_inputs(expert, tokens.shape[0])
        with mesh_context(self.mesh):
            return forward(params, tokens, positions, cache, config=self.config, last_only=last_only, deltas=deltas)

    def logits(self, tokens, expert=None) -> jax.Array:
        """float32 [batch, seq, vocab] for int tokens [batch, seq], plain causal attention and no cache; with
        `deltas`, each sequence on its `expert`."""
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
        logits = self.apply(place(tokens.astype(np.int32), self.mesh, batch), place(positions, self.mesh, batch),
                            expert=expert)[0]
        return logits if logits.is_fully_addressable else to_host(logits)  # a multi-host mesh: gathered

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        if self.path is None:
            raise ZipjaxError("this model was not loaded from a checkpoint folder, so it has no tokenizer")
        return Tokenizer(self.path)
