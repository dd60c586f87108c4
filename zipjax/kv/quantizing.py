"""What the quantized cache (zipjax.kv.quantized) reads of a method, and the static block geometry it derives.

`QuantMethod` is the interface of ZipCache, Uniform and ZipVL: the bit widths of the salient and regular subsets, the
codec, the length of the full-precision buffer, how a block is split and ranked, and how the prompt attends; subset 0
holds the salient tokens. It also gives them the `Method` answers they share (`check` through `geometry`,
`decode_slots` = the buffer, `uses_kernel`). `MixedPrecision` holds the fields ZipCache and ZipVL share (two bit
widths, the saliency source, probes, the streaming buffer_len, the kernel flag) and validates them once.

Imports: errors, config, attention, platform, codec, method.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.attention import cache_attention
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.codec import Codec
from zipjax.kv.method import (
    check_bits,
    check_block_sizes,
    check_field_types,
    check_kernel,
    check_packing,
    check_positive,
)
from zipjax.platform import use_kernel


class Ranking(NamedTuple):
    """How a block's tokens go into the two subsets, per (sequence, KV head)."""

    order: jax.Array  # int32 [batch, kv_heads, n]: token indices, most salient first
    count: jax.Array | None = None  # int32 [batch]: ZipVL's p, the adaptive salient count (None: a fixed split)
    stored: jax.Array | None = None  # int32 [batch]: p clipped into the cache's static room


class QuantMethod:
    """The interface of a method cached by QuantizedKVCache (ZipCache, Uniform, ZipVL)."""

    has_kernel: ClassVar[bool] = True
    kernel: bool | None

    @property
    def uses_kernel(self) -> bool:
        """Whether decode attention runs the Pallas kernel, for the platform being traced (see `kernel`)."""
        return self.has_kernel and use_kernel(self.kernel)

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        geometry(config, self, batch, max_len, prefill_len)

    @property
    def decode_slots(self) -> int:
        """The full-precision buffer must fit after the prompt."""
        return self.buffer_len

    @property
    def subset_bits(self) -> tuple[int, int]:
        """(salient, regular) bit widths."""
        return self.bits, self.bits

    @property
    def codec(self) -> Codec:
        raise NotImplementedError

    @property
    def buffer_len(self) -> int:
        """Full-precision tokens kept after the prompt before they are compressed as a block."""
        raise NotImplementedError

    def split(self, n: int) -> tuple[int, int]:
        """(salient, regular) store sizes of a block of n tokens. Without saliency every token is salient."""
        return n, 0

    def rank_prompt(self, q: jax.Array, k: jax.Array, starts: jax.Array, layer: int) -> Ranking:
        """The prompt block's ranking. q [batch, n, heads, head_dim], k [batch, n, kv_heads, head_dim]."""
        return _slot_order(q.shape[0], k.shape[2], q.shape[1])

    def buffer_mass(self, mass: jax.Array, probs: jax.Array) -> jax.Array:
        """The buffer's attention mass after a decode step, from the mass so far and this step's probabilities
        [batch, kv_heads, buffer_len] (summed over the group's heads): summed over the window's queries."""
        return mass + probs

    def rank_buffer(self, mass: jax.Array) -> Ranking:
        """A full buffer's ranking from the attention mass each token received, float32 [batch, kv_heads, n]."""
        return _slot_order(*mass.shape)

    def prefill_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, ranking: Ranking, starts: jax.Array,
                          sliding_window: int | None) -> jax.Array:
        """Prompt attention: exact (dense) unless the method sparsifies it. q [batch, n, heads, head_dim]; k, v
        [batch, kv_heads, n, head_dim]."""
        return cache_attention(q, k, v, jnp.zeros((), jnp.int32), starts, sliding_window)


def _slot_order(batch: int, kv_heads: int, n: int) -> Ranking:
    return Ranking(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, kv_heads, n)))


def buffer_score(mass: jax.Array) -> jax.Array:
    """The normalized score of a full buffer: buffered token i was seen by the n - i queries after it."""
    n = mass.shape[-1]
    return mass / (n - jnp.arange(n)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecision(QuantMethod):
    """The fields ZipCache and ZipVL share: salient tokens at `high_bits`, the rest at `low_bits`, saliency from
    `saliency` ("probe": recent + random probe queries, or "exact": the full attention matrix), `buffer_len` new
    tokens kept in full precision before they are ranked and compressed together (ZipCache's streaming window; ZipVL
    re-selects its important tokens per such block), `seed` for the random probes. `window=` is the deprecated name
    of `buffer_len` (one release)."""

    high_bits: int = 4
    low_bits: int = 2
    saliency: str = "probe"
    probe_ratio: float = 0.1
    buffer_len: int = 100
    seed: int = 0
    kernel: bool | None = None

    def __post_init__(self):
        check_field_types(self)
        check_kernel(self.kernel)
        check_bits("high_bits", self.high_bits)
        check_bits("low_bits", self.low_bits)
        if self.low_bits > self.high_bits:
            raise ZipjaxError(f"low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        if self.saliency not in ("probe", "exact"):
            raise ZipjaxError(f"saliency must be 'probe' or 'exact', got {self.saliency!r}")
        if not 0 < self.probe_ratio <= 1:
            raise ZipjaxError(f"probe_ratio must lie in (0, 1], got {self.probe_ratio}")
        check_positive("buffer_len", self.buffer_len)

    @property
    def codec(self) -> Codec:
        return Codec("channel", "cst")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One store: `blocks` blocks of `size` tokens of one subset at one bit width (uniform blocks, which is what
    the decode kernel's grid needs). The prompt block (0) and the later blocks (1 ..) are separate segments."""

    subset: int  # 0: salient (high bits), 1: regular (low bits)
    first_block: int  # 0 for the prompt segment, 1 for the streaming segment
    blocks: int
    size: int
    bits: int

    @property
    def capacity(self) -> int:
        return self.blocks * self.size

    def block_ids(self) -> np.ndarray:
        """int32 [capacity]: the segment-local block of each store index."""
        return np.repeat(np.arange(self.blocks, dtype=np.int32), self.size)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static block geometry of a quantized cache."""

    max_len: int
    prefill_len: int
    buffer_len: int
    head_dim: int
    bits: tuple[int, int]  # (salient, regular)
    first: tuple[int, int]  # (salient, regular) tokens of the prompt block
    rest: tuple[int, int]  # (salient, regular) tokens of each later block

    @property
    def num_blocks(self) -> int:
        # a later block is compressed when a token arrives at a full buffer: floor((T - 1) / buffer_len) times for T
        # decode tokens; the last buffer's tokens never leave it
        return 1 + max(self.max_len - self.prefill_len - 1, 0) // self.buffer_len

    @property
    def slot_dtype(self):
        return jnp.int16 if self.max_len < 2**15 else jnp.int32

    def segments(self) -> tuple[Segment, ...]:
        """The non-empty stores, in the order of a layer's stores: per subset, the prompt segment, then the
        streaming segment."""
        out = []
        for s in (0, 1):
            if self.first[s]:
                out.append(Segment(s, 0, 1, self.first[s], self.bits[s]))
            if self.rest[s] and self.num_blocks > 1:
                out.append(Segment(s, 1, self.num_blocks - 1, self.rest[s], self.bits[s]))
        return tuple(out)


def geometry(config: ModelConfig, method: QuantMethod, batch: int, max_len: int, prefill_len: int) -> Geometry:
    """Validate a quantized cache's geometry against the model and the method, with errors naming the problem."""
    check_block_sizes(batch, max_len, prefill_len)
    check_packing(config, method.subset_bits, method.codec.group)
    buffer_len = method.buffer_len
    if buffer_len > max_len - prefill_len and max_len > prefill_len:
        raise ZipjaxError(
            f"the full-precision window (buffer_len={buffer_len} tokens) is longer than the cache's decode part "
            f"({max_len - prefill_len} slots after a {prefill_len}-token prompt); use a smaller buffer_len"
        )
    return Geometry(max_len=max_len, prefill_len=prefill_len, buffer_len=buffer_len, head_dim=config.head_dim,
                    bits=method.subset_bits, first=method.split(prefill_len), rest=method.split(buffer_len))
