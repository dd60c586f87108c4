"""The compression-ratio arithmetic of the ZipCache paper, so our benchmarks report numbers comparable to its tables.

The paper counts a K + V cache of b sequences, l tokens and h*d channels in FP16 (2 * b * l * hd * 16 bits) against
the codes plus the quantization parameters, also FP16. Appendix A compares granularities at 4 bits with
b = 8, hd = l = 4096; the mixed-precision tables use salient fraction r at `high` bits and the rest at `low` bits,
with 5hd + 2bl parameters (channel-wise key min/step for two subsets: 4hd; the value channel scales: hd; value
token-wise min/step: 2bl). `paper_ratio(0.6, 840)` = 4.98, the Mistral-7B GSM8k headline.

These are the paper's idealized counts. Our caches report real bytes (`QuantizedKVCache.nbytes()`), which also
hold per-(token, head) value parameters, slot indices and the full-precision window.
"""

from __future__ import annotations

FP16 = 16


def granularity_ratio(kind: str, bits: int = 4, b: int = 8, hd: int = 4096, l: int = 4096,  # noqa: E741
                      group: int = 32) -> float:
    """Appendix A: "group" (n channels per group, K and V), "token" (K and V), "zipcache" (channel-wise K, CST V)."""
    dense = 2 * b * hd * l * FP16
    codes = 2 * b * hd * l * bits
    params = {"group": 4 * b * hd * l / group, "token": 4 * b * l, "zipcache": 3 * hd + 2 * b * l}[kind]
    return dense / (codes + params * FP16)


def paper_ratio(saliency_ratio: float, l: int, high: int = 4, low: int = 2, b: int = 8,  # noqa: E741
                hd: int = 4096) -> float:
    """The mixed-precision ratio behind every ZipCache table (notes: fits 4.98x, 4.69x, 4.94x, 4.39x, 4.43x)."""
    dense = 2 * b * l * hd * FP16
    codes = 2 * b * l * hd * (saliency_ratio * high + (1 - saliency_ratio) * low)
    return dense / (codes + (5 * hd + 2 * b * l) * FP16)
