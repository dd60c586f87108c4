"""The KV-cache methods a user picks, and the static geometry of a quantized cache.

    zipjax.generate(model, ids, n, kv=ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))

Each method is a frozen, keyword-only, self-validating dataclass (hashable: it selects a compilation), so a bad bit
width or ratio is an error where it is written, never inside jit. The caches read the methods directly; no record
is shared by methods that do not share fields.

  ZipCache  salient tokens (normalized attention score, probe-approximated) at high bits, the rest at low bits;
            keys channel-wise, values channel-separable token-wise; new tokens stay in full precision until
            `window` of them have been generated, then are ranked and compressed (streaming, paper §5.1).
  KIVI      keys per channel in runs of `group` tokens, values per token in groups of `group` channels; a key
            residual quantized as a whole when it reaches `residual`, a sliding window of `residual` full-precision
            values (zipjax.kv.kivi).
  Uniform   plain token-wise (or group-wise) quantization of keys and values at `bits`, same streaming buffer.
  ZipVL     per layer the fewest tokens holding `tau` of the probe attention mass are important: sparse prefill
            among them, and the cache keeps them at `high_bits` and the rest at `low_bits` (or drops the rest).
  MiniCache adjacent deep layers share one SLERP direction per prompt token (zipjax.kv.merged).

ZipCache, Uniform and ZipVL implement `QuantMethod`, what zipjax.kv.quantized reads: the bit widths of the salient
and regular subsets, the codec, the length of the full-precision buffer, how a block is split and ranked, and how
the prompt attends. Decode attention of ZipCache, KIVI and ZipVL runs as the Pallas kernel over the packed codes
(zipjax.kernels.quantized_attention) where it is compiled, on TPU and GPU (`kernel=None`, the default), and
dequantizes in jnp on the CPU; `kernel=True` / `False` force one path (True on a CPU interprets the kernel). Uniform has
no kernel: its keys are token-wise, and the kernel folds per-channel key scales into the query.

Imports: errors, config, attention, and the method algorithms below it (codec, saliency, zipvl).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.attention import cache_attention
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.codec import SUPPORTED_BITS, Codec
from zipjax.kv.saliency import NORMALIZATIONS, prompt_saliency, prompt_statistics
from zipjax.kv.zipvl import important_count, important_order, sparse_prefill_attention
from zipjax.platform import use_kernel


class Ranking(NamedTuple):
    """How a block's tokens go into the two subsets, per (sequence, KV head)."""

    order: jax.Array  # int32 [batch, kv_heads, n]: token indices, most salient first
    count: jax.Array | None = None  # int32 [batch]: ZipVL's p, the adaptive salient count (None: a fixed split)
    stored: jax.Array | None = None  # int32 [batch]: p clipped into the cache's static room


class QuantMethod:
    """The interface of a quantizing method (ZipCache, KIVI, Uniform, ZipVL); subset 0 holds the salient tokens."""

    kernel: bool | None

    @property
    def uses_kernel(self) -> bool:
        """Whether decode attention runs the Pallas kernel, for the platform being traced (see `kernel`)."""
        return use_kernel(self.kernel)

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


def _fixed_split(saliency_ratio: float, n: int) -> tuple[int, int]:
    """int((1 - r) n) regular tokens, as ZipCache's code."""
    regular = int((1.0 - saliency_ratio) * n + 1e-9)
    return n - regular, regular


def _buffer_score(mass: jax.Array) -> jax.Array:
    """The normalized score of a full buffer: buffered token i was seen by the n - i queries after it."""
    n = mass.shape[-1]
    return mass / (n - jnp.arange(n)).astype(jnp.float32)


def _check_bits(name: str, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ZipjaxError(f"{name}={bits!r} is not a supported bit width; choose one of {SUPPORTED_BITS}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ZipjaxError(f"{name} must be a positive integer, got {value!r}")


def _check_kernel(kernel: bool | None) -> None:
    if kernel is not None and not isinstance(kernel, bool):
        raise ZipjaxError(f"kernel must be None (the Pallas kernel on TPU/GPU, jax.numpy on CPU), True or False, "
                          f"got {kernel!r}")


def _check_group(group: int | None) -> None:
    if group is not None and (not isinstance(group, int) or group < 1):
        raise ZipjaxError(f"group must be a positive number of channels or None, got {group!r}")


def _check_mixed(method: ZipCache | ZipVL) -> None:
    """The fields ZipCache and ZipVL share: kernel flag, two bit widths, saliency source, probes, window."""
    _check_kernel(method.kernel)
    _check_bits("high_bits", method.high_bits)
    _check_bits("low_bits", method.low_bits)
    if method.low_bits > method.high_bits:
        raise ZipjaxError(f"low_bits ({method.low_bits}) must not exceed high_bits ({method.high_bits})")
    if method.saliency not in ("probe", "exact"):
        raise ZipjaxError(f"saliency must be 'probe' or 'exact', got {method.saliency!r}")
    if not 0 < method.probe_ratio <= 1:
        raise ZipjaxError(f"probe_ratio must lie in (0, 1], got {method.probe_ratio}")
    _check_positive("window", method.window)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZipCache(QuantMethod):
    high_bits: int = 4
    low_bits: int = 2
    saliency_ratio: float = 0.6
    saliency: str = "probe"  # "probe" (recent + random probe queries) or "exact" (full attention matrix)
    probe_ratio: float = 0.1
    normalize: str = "code"  # the official code's normalizer (measured better than "probe": benchmarks/kvcache.py)
    window: int = 100
    seed: int = 0
    kernel: bool | None = None

    def __post_init__(self):
        _check_mixed(self)
        if not 0 < self.saliency_ratio <= 1:
            raise ZipjaxError(f"saliency_ratio must lie in (0, 1], got {self.saliency_ratio}")
        if self.normalize not in NORMALIZATIONS:
            raise ZipjaxError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    @property
    def subset_bits(self) -> tuple[int, int]:
        return self.high_bits, self.low_bits

    @property
    def codec(self) -> Codec:
        return Codec("channel", "cst")

    @property
    def buffer_len(self) -> int:
        return self.window

    def split(self, n: int) -> tuple[int, int]:
        return _fixed_split(self.saliency_ratio, n)

    def rank_prompt(self, q, k, starts, layer):
        key = jax.random.fold_in(jax.random.key(self.seed), layer)
        score = prompt_saliency(q, k, starts, method=self.saliency, probe_ratio=self.probe_ratio,
                                normalize=self.normalize, key=key)
        return Ranking(jnp.argsort(-score, axis=-1, stable=True))

    def rank_buffer(self, mass):
        return Ranking(jnp.argsort(-_buffer_score(mass), axis=-1, stable=True))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVI:
    """KIVI as its official code runs it (jy-yuan/KIVI, models/llama_kivi.py), cached by zipjax.kv.kivi:

      keys    per channel, statistics per (channel, run of `group` tokens); the newest keys (the prompt's last
              T0 % residual, then the decode tokens) stay in full precision until `residual` of them have gathered,
              then are quantized together;
      values  per token, in groups of `group` channels; the `residual` most recent values stay in full precision,
              a sliding window: each decode step quantizes the one value that leaves it.

    `group` is both the key run length and the value channel group (the code's one `group_size`); None quantizes
    values per whole head and keys per run of `residual` tokens."""

    bits: int = 2
    group: int | None = 32
    residual: int = 128
    kernel: bool | None = None

    def __post_init__(self):
        _check_kernel(self.kernel)
        _check_bits("bits", self.bits)
        _check_group(self.group)
        _check_positive("residual", self.residual)
        if self.group is not None and self.residual % self.group:
            raise ZipjaxError(f"KIVI quantizes the key residual in runs of group={self.group} tokens: residual "
                              f"({self.residual}) must be a multiple of group")

    @property
    def uses_kernel(self) -> bool:
        return QuantMethod.uses_kernel.fget(self)

    @property
    def key_block(self) -> int:
        """Tokens per channel-wise key statistic."""
        return self.group or self.residual

    @property
    def codec(self) -> Codec:
        return Codec("channel", "token", self.group, key_block=self.key_block)

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        check_block_sizes(batch, max_len, prefill_len)
        check_packing(config, self.bits, self.group)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform(QuantMethod):
    bits: int = 4
    group: int | None = None
    window: int = 100
    kernel: ClassVar[bool] = False

    def __post_init__(self):
        _check_bits("bits", self.bits)
        _check_group(self.group)
        _check_positive("window", self.window)

    @property
    def codec(self) -> Codec:
        return Codec("token", "token", self.group)

    @property
    def buffer_len(self) -> int:
        return self.window


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZipVL(QuantMethod):
    """ZipVL: per layer (and per compressed window) the important tokens are the fewest holding `tau` of the probe
    attention mass, ranked by normalized score; prompt attention runs only among them (sparse prefill); the cache
    keeps them at `high_bits` and the rest at `low_bits` (v1), or drops the rest (v2, `evict=True`).

    As the paper: one important set T per layer, shared by its heads (Algorithm 1; `per_head=True` ranks each KV
    head by its own score, with the same count p), and the probes are the 64 most recent and 64 random queries
    (`probes`; None: `probe_ratio` of the prompt, 5% + 5% as ZipCache). `compress=False` keeps a dense cache and
    only sparsifies the prefill (the paper's Video-MME setting); `sparse_prefill=False` only compresses (its GSM8k
    setting).

    Static shapes: the cache has room for ceil(max_ratio n) important tokens per block of n and, in v1, for the
    n - ceil(min_ratio n) others, so p is clipped into `ratio_range` for storage (sparse prefill uses p itself);
    `QuantizedKVCache.stored_nbytes()` counts the tokens actually stored (clipped p), not the room."""

    tau: float = 0.975
    high_bits: int = 4
    low_bits: int = 2
    evict: bool = False
    ratio_range: tuple[float, float] = (0.2, 0.6)
    sparse_prefill: bool = True
    compress: bool = True
    per_head: bool = False
    buckets: int = 8
    saliency: str = "probe"
    probes: tuple[int, int] | None = (64, 64)
    probe_ratio: float = 0.1
    window: int = 100
    seed: int = 0
    kernel: bool | None = None

    def __post_init__(self):
        _check_mixed(self)
        if not 0 < self.tau <= 1:
            raise ZipjaxError(f"tau must lie in (0, 1], got {self.tau}")
        low, high = self.ratio_range
        if not 0 <= low <= high <= 1 or high == 0:
            raise ZipjaxError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, high > 0; got "
                              f"{self.ratio_range}")
        _check_positive("buckets", self.buckets)
        if self.probes is not None and (len(self.probes) != 2 or min(self.probes) < 0 or self.probes[0] < 1):
            raise ZipjaxError(f"probes must be (recent >= 1, random >= 0) query counts or None, got {self.probes!r}")
        if not (self.compress or self.sparse_prefill):
            raise ZipjaxError("ZipVL with compress=False and sparse_prefill=False is the dense cache: use kv=None")

    @property
    def subset_bits(self) -> tuple[int, int]:
        return self.high_bits, self.high_bits if self.evict else self.low_bits

    @property
    def codec(self) -> Codec:
        return Codec("channel", "cst")

    @property
    def buffer_len(self) -> int:
        return self.window

    def clip_count(self, n: int) -> tuple[int, int]:
        """The static (lowest, highest) salient count of a block of n tokens."""
        low, high = self.ratio_range
        return min(n, math.ceil(low * n - 1e-9)), max(1, min(n, math.ceil(high * n - 1e-9)))

    def split(self, n: int) -> tuple[int, int]:
        """Room for up to ceil(max_ratio n) salient tokens and for the rest of the block once at least
        ceil(min_ratio n) are salient (none when evicting)."""
        lowest, highest = self.clip_count(n)
        return highest, 0 if self.evict else n - lowest

    def _ranking(self, order: jax.Array, mass: jax.Array) -> Ranking:
        count = important_count(mass, self.tau)
        return Ranking(order, count, jnp.clip(count, *self.clip_count(mass.shape[-1])).astype(jnp.int32))

    def _shared(self, score: jax.Array) -> jax.Array:
        """The score T is chosen by: per KV head, or (the paper) the layer's heads summed, broadcast back."""
        if self.per_head:
            return score
        return jnp.broadcast_to(score.sum(axis=1, keepdims=True), score.shape)

    def rank_prompt(self, q, k, starts, layer):
        key = jax.random.fold_in(jax.random.key(self.seed), layer)
        mass, score = prompt_statistics(q, k, starts, method=self.saliency, probe_ratio=self.probe_ratio,
                                        normalize="probe", key=key, probes=self.probes)
        return self._ranking(important_order(self._shared(score)), mass)

    def rank_buffer(self, mass):
        return self._ranking(jnp.argsort(-self._shared(_buffer_score(mass)), axis=-1, stable=True), mass)

    def prefill_attention(self, q, k, v, ranking, starts, sliding_window):
        if not self.sparse_prefill:
            return super().prefill_attention(q, k, v, ranking, starts, sliding_window)
        out, _ = sparse_prefill_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ranking.order,
                                          ranking.count, starts, buckets=self.buckets, sliding_window=sliding_window)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCache:
    """MiniCache: from `start_layer` S (None: half the layers) on, the layer pairs (l - 1, l) with l odd and
    l - 1 >= S (30 layers: (16, 17) .. (28, 29)) share one SLERP direction per token (t weighs the deeper layer),
    norms kept per layer, and the ceil(gamma n) most distinct prompt tokens kept exactly (`retain="printed"`: the
    paper's literal, most-similar rule). `merge_dims="token"` (the paper's X in R^{n x h}) takes a token's norm and
    angle over its whole vector across KV heads; "head" merges each head's vector separately. Decode tokens are
    merged at the second layer of each pair as they arrive (Algorithm 2; `merge_decode=False` keeps them exact).
    `inner`: KIVI(...) or Uniform(...) to quantize the prompt's stored arrays, or None."""

    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05
    retain: str = "distinct"
    merge_dims: str = "token"
    merge_decode: bool = True
    inner: KIVI | Uniform | None = None

    def __post_init__(self):
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ZipjaxError(f"start_layer must be None or a layer index >= 0, got {self.start_layer!r}")
        if not 0 <= self.t <= 1:
            raise ZipjaxError(f"t must lie in [0, 1], got {self.t}")
        if not 0 <= self.gamma < 1:
            raise ZipjaxError(f"gamma (the retained fraction) must lie in [0, 1), got {self.gamma}")
        if self.retain not in ("distinct", "printed"):
            raise ZipjaxError(f"retain must be 'distinct' or 'printed', got {self.retain!r}")
        if self.merge_dims not in ("token", "head"):
            raise ZipjaxError(f"merge_dims must be 'token' (whole vector) or 'head', got {self.merge_dims!r}")
        if self.inner is not None and not isinstance(self.inner, KIVI | Uniform):
            raise ZipjaxError(f"MiniCache's inner quantizer must be KIVI(...), Uniform(...) or None, got "
                              f"{self.inner!r} (ZipCache's saliency split of merged directions is not implemented)")

    def start(self, num_layers: int) -> int:
        return num_layers // 2 if self.start_layer is None else self.start_layer

    def pairs(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """The merged layer pairs (l - 1, l): l odd, l - 1 >= the start layer."""
        start = self.start(num_layers)
        return tuple((l - 1, l) for l in range(1, num_layers, 2) if l - 1 >= start)  # noqa: E741

    def roles(self, num_layers: int) -> tuple[tuple[str, int], ...]:
        """Per layer: ("plain", index into the plain layers), ("first", pair) or ("second", pair)."""
        role = {}
        for index, (first, second) in enumerate(self.pairs(num_layers)):
            role[first], role[second] = ("first", index), ("second", index)
        plain = [layer for layer in range(num_layers) if layer not in role]
        return tuple(role[layer] if layer in role else ("plain", plain.index(layer)) for layer in range(num_layers))

    def retained(self, prefill_len: int) -> int:
        return math.ceil(self.gamma * prefill_len - 1e-9)

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        check_block_sizes(batch, max_len, prefill_len)
        if not 0 <= self.start(config.num_layers) < config.num_layers:
            raise ZipjaxError(f"start_layer {self.start_layer} is outside the model's {config.num_layers} layers")
        if self.inner is not None:  # the inner residual window does not apply: decode tokens stay in MiniCache's
            check_packing(config, self.inner.bits, self.inner.codec.group)  # own buffer


Method = ZipCache | KIVI | Uniform | ZipVL | MiniCache


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


def check_block_sizes(batch: int, max_len: int, prefill_len: int) -> None:
    if batch <= 0:
        raise ZipjaxError(f"a KV cache needs batch > 0, got {batch}")
    if not 1 < prefill_len <= max_len:
        raise ZipjaxError(f"prefill_len must lie in (1, max_len={max_len}], got {prefill_len}")


def check_packing(config: ModelConfig, bits: tuple[int, ...] | int, group: int | None) -> None:
    """Codes of each bit width pack whole bytes per head, and a group divides head_dim."""
    d = config.head_dim
    for b in sorted({bits} if isinstance(bits, int) else set(bits)):
        if d % (8 // b):
            raise ZipjaxError(f"{b}-bit codes pack {8 // b} channels per byte; head_dim {d} is not a multiple")
    if group is not None and d % group:
        raise ZipjaxError(f"quantization group of {group} channels does not divide head_dim {d}")


def geometry(config: ModelConfig, method: QuantMethod, batch: int, max_len: int, prefill_len: int) -> Geometry:
    """Validate a quantized cache's geometry against the model and the method, with errors naming the problem."""
    check_block_sizes(batch, max_len, prefill_len)
    check_packing(config, method.subset_bits, method.codec.group)
    buffer_len = method.buffer_len
    if buffer_len > max_len - prefill_len and max_len > prefill_len:
        raise ZipjaxError(
            f"the full-precision window ({buffer_len} tokens) is longer than the cache's decode part "
            f"({max_len - prefill_len} slots after a {prefill_len}-token prompt); use a smaller window"
        )
    return Geometry(max_len=max_len, prefill_len=prefill_len, buffer_len=buffer_len, head_dim=config.head_dim,
                    bits=method.subset_bits, first=method.split(prefill_len), rest=method.split(buffer_len))
