"""Static sizes shared by every decode loop: prompt buckets, cache rounding, left padding.

Prompt lengths are bucketed to powers of two (at least 16) and cache lengths rounded up to multiples of 128, so new
lengths mostly reuse a compiled program. Prompts of different lengths are left-padded to one bucket so that they
all end at the same cache slot. A leaf: imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_PREFILL_BUCKET = 16
CACHE_ROUNDING = 128


def next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(longest: int) -> int:
    """The padded prompt length for a batch whose longest prompt has `longest` tokens."""
    return max(MIN_PREFILL_BUCKET, next_pow2(longest))


def cache_length(tokens: int) -> int:
    """Cache slots for `tokens` tokens, rounded up to CACHE_ROUNDING."""
    return round_up(tokens, CACHE_ROUNDING)


def left_pad(sequences: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [batch, bucket] with each sequence at the right end, int32 [batch] the slot each one starts at)."""
    padded = np.full((len(sequences), bucket), pad_id, np.int32)
    for i, s in enumerate(sequences):
        padded[i, bucket - len(s):] = s
    starts = (bucket - np.array([len(s) for s in sequences])).astype(np.int32)
    return padded, starts
