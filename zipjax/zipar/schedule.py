"""ZipAR's fixed-window decoding schedule, computed on the host once per (rows, columns, lag).

ZipAR (He et al., 2024) decodes an image "next-set": row i starts as soon as row i-1 is `lag` tokens ahead (the
paper's window size s), so token (i, j) is sampled in pass 1 + i*s + j (pass 1 is the prefill) and an image costs
(H - 1) * s + W passes instead of one per token. A pass feeds, for every token it samples, the token just before
it in raster order:

* (i, j-1) for j > 0, sampled one pass earlier;
* for j = 0 with an end-of-line layout (Emu3): the EOL closing row i-1, which is known in advance;
* for j = 0 without EOL: the slot of (i-1, W-1) is not decoded yet, so a proxy token is fed there, the newest
  decoded token of row i-1, i.e. (i-1, s-1). (The official LlamaGen code decodes row 0 fully sequentially and
  copies the newest token of row i-2 instead; taking row i-1 keeps one formula for every row.)

A row's last token (i, W-1) is never the input of a later sample, so the pass after it is sampled also feeds it
("refresh", logits unused) to put its real K/V into the cache, over the proxy where there was one.

Image tokens are indexed in raster order of the final sequence: n = i * (W + 1) + j with EOL (EOL of row i at
n = i * (W + 1) + W), n = i * W + j without. Every pass is padded to the same number of queries.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from zipjax.errors import ZipjaxError


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    rows: int
    cols: int
    lag: int  # a row starts once the row above is `lag` tokens ahead (capped at cols)
    eol: bool
    source: np.ndarray  # int32 [decode passes, q]: image token fed by each query (-1: padding)
    slot: np.ndarray  # int32 [decode passes, q]: its raster index (differs from source only for proxies)
    target: np.ndarray  # int32 [decode passes, q]: image token sampled from the query's logits (-1: none)

    @property
    def num_passes(self) -> int:
        """Forward passes for the whole image, prefill included."""
        return 1 + self.source.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + self.eol)

    @property
    def queries_per_pass(self) -> int:
        return self.source.shape[1]

    def index(self, row: int, col: int) -> int:
        return row * (self.cols + self.eol) + col


def passes(rows: int, cols: int, lag: int) -> int:
    """Forward passes of fixed-window ZipAR, prefill included: (H - 1) * s + W, with the lag s capped at W."""
    return (rows - 1) * min(lag, cols) + cols


@functools.lru_cache(maxsize=64)
def fixed_window(rows: int, cols: int, lag: int, eol: bool = True) -> Schedule:
    """The schedule for an image of rows x cols tokens with lag s = `lag` (s >= W is sequential row by row)."""
    for name, value in (("rows", rows), ("cols", cols), ("lag", lag)):
        if not isinstance(value, int) or value < 1:
            raise ZipjaxError(f"ZipAR needs a positive integer {name}, got {value!r}")
    s = min(lag, cols)
    width = cols + eol
    index = lambda i, j: i * width + j
    total = passes(rows, cols, s)
    feeds: list[list[tuple[int, int, int]]] = [[] for _ in range(total + 1)]  # pass -> (source, slot, target)
    for i in range(rows):
        for j in range(cols):
            t = 1 + i * s + j
            if t == 1:
                continue  # (0, 0) comes from the prefill's last logits
            if j > 0:
                feeds[t].append((index(i, j - 1), index(i, j - 1), index(i, j)))
            elif eol:
                feeds[t].append((index(i - 1, cols), index(i - 1, cols), index(i, j)))
            else:  # the newest decoded token of row i-1 stands in; it is the real one when s == W
                feeds[t].append((index(i - 1, s - 1), index(i - 1, cols - 1), index(i, j)))
        refresh = 1 + i * s + cols  # the pass after (i, W-1) is sampled
        if refresh <= total:
            feeds[refresh].append((index(i, cols - 1), index(i, cols - 1), -1))
    decode = [_one_per_slot(f) for f in feeds[2:]]
    width_q = max(len(f) for f in decode) if decode else 1
    table = np.full((3, len(decode), width_q), -1, np.int32)
    for p, f in enumerate(decode):
        if f:
            table[:, p, : len(f)] = np.array(f, np.int32).T
    return Schedule(rows, cols, s, eol, table[0], table[1], table[2])


def _one_per_slot(feeds: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Raster order; a refresh of a slot that a sampling query already feeds with its real token is dropped."""
    by_slot: dict[int, tuple[int, int, int]] = {}
    for feed in feeds:
        kept = by_slot.get(feed[1])
        if kept is None or kept[2] < 0:
            by_slot[feed[1]] = feed
    return [by_slot[k] for k in sorted(by_slot)]


def max_tokens_per_pass(rows: int, cols: int, lag: int) -> int:
    """The most tokens sampled in one pass: about ceil(W / s) in steady state."""
    s = min(lag, cols)
    return max(min(rows - 1, (t - 1) // s) - max(0, math.ceil((t - cols) / s)) + 1
               for t in range(1, passes(rows, cols, s) + 1))


def band_length(schedule: Schedule, block: int) -> int:
    """Full-precision entries a compressed cache needs for this schedule (zipjax.zipar.compressed): in every pass,
    from the first slot of the block holding the first unwritten image token (before the pass) to the last slot the
    pass writes, image-relative."""
    written = np.zeros(schedule.num_tokens + 1, bool)
    frontier, need = 0, 1
    for slots, sources in zip(schedule.slot, schedule.source, strict=True):
        fed = slots[sources >= 0]
        if not len(fed):
            continue
        need = max(need, int(fed.max()) - (frontier // block) * block + 1)
        written[fed] = True
        while written[frontier]:
            frontier += 1
    return need
