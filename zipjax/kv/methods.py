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

    def split(self, n: int) -> tuple[int, int]:
        """(salient, regular) token counts of a block of n tokens: int((1 - r) n) regular, as the official code."""
        regular = int((1.0 - self.saliency_ratio) * n + 1e-9)
        return n - regular, regular


def _check_bits(name: str, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ZipjaxError(f"{name}={bits!r} is not a supported bit width; choose one of {SUPPORTED_BITS}")


def _check_window(name: str, window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ZipjaxError(f"{name} must be a positive integer, got {window!r}")


def _check_kernel(kernel: bool) -> None:
    if not isinstance(kernel, bool):
        raise ZipjaxError(f"kernel must be True (Pallas decode attention) or False (jax.numpy), got {kernel!r}")


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
        _check_kernel(self.kernel)
        _check_bits("high_bits", self.high_bits)
        _check_bits("low_bits", self.low_bits)
        if self.low_bits > self.high_bits:
            raise ZipjaxError(f"low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        if not 0 < self.saliency_ratio <= 1:
            raise ZipjaxError(f"saliency_ratio must lie in (0, 1], got {self.saliency_ratio}")
        if self.saliency not in ("probe", "exact"):
            raise ZipjaxError(f"saliency must be 'probe' or 'exact', got {self.saliency!r}")
        if not 0 < self.probe_ratio <= 1:
            raise ZipjaxError(f"probe_ratio must lie in (0, 1], got {self.probe_ratio}")
        if self.normalize not in NORMALIZATIONS:
            raise ZipjaxError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        _check_window("window", self.window)

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


Method = ZipCache | KIVI | Uniform
