"""The KV-cache quantization methods a user picks: `zipjax.generate(model, ids, n, kv=ZipCache(...))`.

Each method is a frozen, hashable description (it selects a compilation) validated when it is built, so a bad bit
width or ratio is an error at the call site, never inside jit. All of them compile to one `QuantSpec` that the
quantized cache (zipjax.kv.cache) runs:

  ZipCache  salient tokens (normalized attention score, probe-approximated) at high bits, the rest at low bits;
            keys channel-wise, values channel-separable token-wise; new tokens stay in full precision until
            `window` of them have been generated, then are ranked and compressed (streaming, paper §5.1).
  KIVI      keys per-channel, values per-token in groups of `group` channels, a full-precision residual of the
            most recent tokens (up to `residual`), every token at `bits`.
  Uniform   plain token-wise (or group-wise) quantization of keys and values at `bits`, same streaming window.

`kernel=True` (ZipCache, KIVI) runs decode attention as the Pallas kernel over the packed codes
(pallas_kernels.quantized_attention; compiled on GPU/TPU, interpreted on CPU) instead of dequantizing in jnp.
Uniform has no kernel: its keys are token-wise, and the kernel folds per-channel key scales into the query.
"""

from __future__ import annotations

import dataclasses
import math

from zipjax.errors import ZipjaxError
from zipjax.kv.quantize import SUPPORTED_BITS
from zipjax.kv.saliency import NORMALIZATIONS


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What the quantized cache does. Subset 0 holds the salient tokens, subset 1 the rest."""

    name: str
    high_bits: int
    low_bits: int
    saliency_ratio: float  # fraction of each block's tokens in the high-bit subset
    key_mode: str  # "channel" or "token"
    value_mode: str  # "token" or "cst"
    group: int | None  # channels per token-wise group (None: the whole head)
    window: int  # full-precision tokens kept before a block is compressed
    saliency: str  # "probe", "exact" or "none"
    probe_ratio: float
    normalize: str
    seed: int
    kernel: bool = False  # decode attention by the Pallas kernel over packed codes (else dequantize in jnp)
    tau: float | None = None  # ZipVL: the salient count of each block is p(tau), clipped to [min_ratio, max_ratio]
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    evict: bool = False  # ZipVL v2: the regular subset is dropped, not stored
    sparse_prefill: bool = False  # ZipVL: prompt attention only among the important tokens
    buckets: int = 8

    def split(self, n: int) -> tuple[int, int]:
        """(salient, regular) store sizes of a block of n tokens. Fixed ratio: int((1 - r) n) regular, as ZipCache's
        code. Adaptive (tau): room for up to ceil(max_ratio n) salient tokens and for the rest of the block once at
        least ceil(min_ratio n) are salient (none when evicting)."""
        if self.tau is None:
            regular = int((1.0 - self.saliency_ratio) * n + 1e-9)
            return n - regular, regular
        return self.clip_count(n)[1], 0 if self.evict else n - self.clip_count(n)[0]

    def check(self, config, batch: int, max_len: int, prefill_len: int) -> None:
        """Geometry errors (bit packing, window) at the call site, not inside jit."""
        from zipjax.kv.cache import make_layout

        make_layout(config, self, batch, max_len, prefill_len)

    def init_cache(self, config, batch: int, max_len: int, prefill_len: int, starts=None, dtype=None):
        from zipjax.kv.cache import QuantizedKVCache

        return QuantizedKVCache.init(config, self, batch, max_len, prefill_len, starts, dtype)

    def clip_count(self, n: int) -> tuple[int, int]:
        """The static (lowest, highest) adaptive salient count of a block of n tokens."""
        return min(n, math.ceil(self.min_ratio * n - 1e-9)), max(1, min(n, math.ceil(self.max_ratio * n - 1e-9)))


def _check_bits(name: str, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ZipjaxError(f"{name}={bits!r} is not a supported bit width; choose one of {SUPPORTED_BITS}")


def _check_window(name: str, window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ZipjaxError(f"{name} must be a positive integer, got {window!r}")


def _check_kernel(kernel: bool) -> None:
    if not isinstance(kernel, bool):
        raise ZipjaxError(f"kernel must be True (Pallas decode attention) or False (jax.numpy), got {kernel!r}")


def _check_mixed(method) -> None:
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
    _check_window("window", method.window)


def _check_group(group: int | None) -> None:
    if group is not None and (not isinstance(group, int) or group < 1):
        raise ZipjaxError(f"group must be a positive number of channels or None, got {group!r}")


@dataclasses.dataclass(frozen=True)
class ZipCache:
    high_bits: int = 4
    low_bits: int = 2
    saliency_ratio: float = 0.6
    saliency: str = "probe"  # "probe" (recent + random probe queries) or "exact" (full attention matrix)
    probe_ratio: float = 0.1
    normalize: str = "probe"
    window: int = 100
    seed: int = 0
    kernel: bool = False

    def __post_init__(self):
        _check_mixed(self)
        if not 0 < self.saliency_ratio <= 1:
            raise ZipjaxError(f"saliency_ratio must lie in (0, 1], got {self.saliency_ratio}")
        if self.normalize not in NORMALIZATIONS:
            raise ZipjaxError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    def spec(self) -> QuantSpec:
        return QuantSpec("zipcache", self.high_bits, self.low_bits, self.saliency_ratio, "channel", "cst", None,
                         self.window, self.saliency, self.probe_ratio, self.normalize, self.seed, self.kernel)


@dataclasses.dataclass(frozen=True)
class KIVI:
    bits: int = 2
    group: int | None = 32
    residual: int = 128
    kernel: bool = False

    def __post_init__(self):
        _check_kernel(self.kernel)
        _check_bits("bits", self.bits)
        _check_group(self.group)
        _check_window("residual", self.residual)

    def spec(self) -> QuantSpec:
        return QuantSpec("kivi", self.bits, self.bits, 1.0, "channel", "token", self.group, self.residual, "none",
                         0.0, "probe", 0, self.kernel)


@dataclasses.dataclass(frozen=True)
class Uniform:
    bits: int = 4
    group: int | None = None
    window: int = 100

    def __post_init__(self):
        _check_bits("bits", self.bits)
        _check_group(self.group)
        _check_window("window", self.window)

    def spec(self) -> QuantSpec:
        return QuantSpec("uniform", self.bits, self.bits, 1.0, "token", "token", self.group, self.window, "none",
                         0.0, "probe", 0)


@dataclasses.dataclass(frozen=True)
class ZipVL:
    """ZipVL: per layer (and per compressed window) the important tokens are the fewest holding `tau` of the probe
    attention mass, ranked by normalized score; prompt attention runs only among them (sparse prefill); the cache
    keeps them at `high_bits` and the rest at `low_bits` (v1), or drops the rest (v2, `evict=True`).

    Static shapes: the cache has room for ceil(max_ratio n) important tokens per block of n and, in v1, for the
    n - ceil(min_ratio n) others, so p is clipped into `ratio_range` for storage (sparse prefill uses p itself)."""

    tau: float = 0.975
    high_bits: int = 4
    low_bits: int = 2
    evict: bool = False
    ratio_range: tuple[float, float] = (0.2, 0.6)
    sparse_prefill: bool = True
    buckets: int = 8
    saliency: str = "probe"
    probe_ratio: float = 0.1
    window: int = 100
    seed: int = 0
    kernel: bool = False

    def __post_init__(self):
        _check_mixed(self)
        if not 0 < self.tau <= 1:
            raise ZipjaxError(f"tau must lie in (0, 1], got {self.tau}")
        low, high = self.ratio_range
        if not 0 <= low <= high <= 1 or high == 0:
            raise ZipjaxError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, high > 0; got "
                              f"{self.ratio_range}")
        if not isinstance(self.buckets, int) or self.buckets < 1:
            raise ZipjaxError(f"buckets must be a positive integer, got {self.buckets!r}")

    def spec(self) -> QuantSpec:
        low_bits = self.high_bits if self.evict else self.low_bits
        return QuantSpec("zipvl", self.high_bits, low_bits, self.ratio_range[1], "channel", "cst", None,
                         self.window, self.saliency, self.probe_ratio, "probe", self.seed, self.kernel,
                         tau=self.tau, min_ratio=self.ratio_range[0], max_ratio=self.ratio_range[1],
                         evict=self.evict, sparse_prefill=self.sparse_prefill, buckets=self.buckets)


@dataclasses.dataclass(frozen=True)
class MiniCache:
    """MiniCache: from `start_layer` (None: half the layers) on, adjacent layers share one SLERP direction per
    prompt token and head (t weighs the deeper layer), norms kept per layer, and the ceil(gamma n) most distinct
    tokens kept exactly (`retain="printed"`: the paper's literal, most-similar rule). `inner`: KIVI(...) or
    Uniform(...) to quantize what is stored, or None."""

    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05
    retain: str = "distinct"
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
        if self.inner is not None and not isinstance(self.inner, KIVI | Uniform):
            raise ZipjaxError(f"MiniCache's inner quantizer must be KIVI(...), Uniform(...) or None, got "
                              f"{self.inner!r} (ZipCache's saliency split of merged directions is not implemented)")

    def spec(self):
        from zipjax.kv.merged import MergeSpec

        return MergeSpec(self.start_layer, self.t, self.gamma, self.retain,
                         None if self.inner is None else self.inner.spec())


Method = ZipCache | KIVI | Uniform | ZipVL | MiniCache


def method_spec(kv: Method | None):
    """The compiled spec of a `kv=` argument (None for the dense cache), or a clear error for anything else."""
    if kv is None:
        return None
    if not hasattr(kv, "spec"):
        raise ZipjaxError(f"kv must be None or a zipjax.kv method (ZipCache, KIVI, Uniform, ZipVL, MiniCache), "
                          f"got {kv!r}")
    return kv.spec()
