"""The cache contract: what the model needs from any KV cache, and the input checks the caches share.

The model is `apply(params, tokens, positions, cache) -> (logits, cache)`; a cache is a pytree passed in and returned,
so every compression is a pure transform of it. Each layer calls `attend` (store its new K/V, attend over what the
cache holds); once all layers have written, the model calls `advance`. Five caches implement `Cache`: the dense one
(zipjax.kv.dense), the quantized and merged ones (zipjax.kv.quantized, zipjax.kv.minicache), and ZipAR's scatter cache
(zipjax.zipar.cache). `AppendCache` adds the shared write cursor that token-by-token generation reads.

This module is a leaf of the cache subsystem: it imports only jax and zipjax.errors.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, Self, runtime_checkable

import jax

from zipjax.errors import ZipjaxError

# Logical axis names of a per-layer K/V array [batch, kv_heads, seq, head_dim], mapped to mesh axes by
# zipjax.sharding.
KV_AXES = ("batch", "kv_heads", "seq", "head_dim")


@runtime_checkable
class Cache(Protocol):
    """What `zipjax.transformer.Transformer` calls on a cache."""

    # whether a prompt may arrive in several chunks (each a call with the cursor advanced); compressed caches take
    # the prompt as one block
    accepts_chunks: ClassVar[bool]

    @property
    def batch(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        """Raise ZipjaxError before any compute if a [batch, num_tokens] input cannot go into this cache."""

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, Self]:
        """Store layer `layer`'s new K/V and attend over everything the query may see.

        q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]. Returns the attention
        output [batch, q_len, heads, head_dim] and the updated cache."""

    def advance(self, num_tokens: int) -> Self:
        """The cache after every layer has written `num_tokens` tokens."""

    def nbytes(self) -> int:
        """Bytes held by the cache's arrays."""

    def logical_axes(self) -> Self:
        """The same pytree with a PartitionSpec of logical axis names per leaf (for zipjax.sharding)."""


@runtime_checkable
class AppendCache(Cache, Protocol):
    """A cache written at one cursor shared by the batch (what `zipjax.generate` decodes with)."""

    cursor: jax.Array  # int32 []: the next slot to write
    starts: jax.Array  # int32 [batch]: the first slot holding a real token of each sequence


def replace_at(items: tuple, index: int, value) -> tuple:
    """`items` with entry `index` replaced (per-layer tuples of a cache)."""
    return (*items[:index], value, *items[index + 1:])


def check_batch(got: int, expected: int) -> None:
    if got != expected:
        raise ZipjaxError(f"the input holds {got} sequences but the KV cache was made for {expected}")


def check_room(cursor: jax.Array, num_tokens: int, max_len: int) -> None:
    """Raise if `num_tokens` written at `cursor` would run past `max_len` (when the cursor is a concrete value)."""
    if isinstance(cursor, jax.core.Tracer):
        return
    cursor = int(cursor)
    if cursor + num_tokens > max_len:
        raise ZipjaxError(f"the KV cache holds {max_len} slots; {cursor} are used and {num_tokens} more do not fit")


def check_prompt_then_tokens(tokens_shape: tuple[int, int], kind: str, batch: int, prefill_len: int,
                             cursor: jax.Array, max_len: int) -> None:
    """The input contract of the compressed caches (quantized, merged): the prompt as one block of `prefill_len`
    tokens first, then one token per step, within `max_len` slots (order and room checked when the cursor is a
    concrete value)."""
    got_batch, num_tokens = tokens_shape
    check_batch(got_batch, batch)
    if num_tokens not in (1, prefill_len):
        raise ZipjaxError(
            f"a {kind} KV cache takes the prompt as one block of {prefill_len} tokens, then one token per step; "
            f"got {num_tokens} tokens"
        )
    if not isinstance(cursor, jax.core.Tracer):
        if num_tokens > 1 and int(cursor) != 0:
            raise ZipjaxError(f"the prompt block must be the first input of a {kind} KV cache")
        if num_tokens == 1 and int(cursor) == 0:
            raise ZipjaxError(f"a {kind} KV cache needs its prompt block before single decode tokens")
    check_room(cursor, num_tokens, max_len)
