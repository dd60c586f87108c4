"""Quantizing one delta matrix: bit planes packed along the input axis, per-output-channel step / minimum, and the
choice of salient input channels kept exact.

A delta matrix is always seen as D [in, out], `in` the contracted axis. Its codes are stored as bit planes
(`PLANE_WIDTHS`): 1, 2 and 4 bits are one plane each, 3 bits are a 2-bit plane and a 1-bit plane (code = plane0 +
4 * plane1), so every plane packs whole codes into bytes. Each plane is packed along `in` in the split-halves layout
of `zipjax.kernels.common.pack` (applied to the transposed codes), which a kernel unpacks with one shift and mask per
contiguous block of input channels.

Quantizers (zipjax's choices; the ME-Switch abstract specifies none of them):
- "mse" (default): asymmetric, per output column, the clipping range [c * min, c * max] searched over `CLIP_GRID`
  for the lowest squared error of the column (non-salient rows only);
- "minmax": the same with c = 1;
- 1 bit, whatever the quantizer: sign x mean|D| per output column (BitDelta's sign x scale, with one scale per
  column instead of per matrix), written in the same form: minimum = -scale, step = 2 * scale. (A min-max 1-bit
  quantizer measured catastrophic on stdlib-llama: perplexity 208.6 against 73.3 for sign x mean.)
Step and minimum are rounded to float16 *before* the codes are computed, so |D - deq| <= step / 2 holds exactly
for every entry inside the clipping range.

Saliency ("error", default): input channel j scores ||D_j - Q(D)_j|| * RMS(x_j), its reconstruction error weighted by
the RMS of the activations it multiplies (measured on calibration text); the top k are kept exact as a float16
residual D_S - deq(codes_S). "magnitude" scores ||D_j|| alone (the ablation the scoping note found useless:
0.210 -> 0.203 output error against 0.125 for "error"), "none" keeps no channel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.errors import ZipjaxError
from zipjax.kernels.common import pack, unpack

PLANE_WIDTHS: dict[int, tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
QUANTIZERS = ("mse", "minmax")
SCORES = ("error", "magnitude", "none")
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


def plane_widths(bits: int) -> tuple[int, ...]:
    if bits not in PLANE_WIDTHS:
        raise ZipjaxError(f"bits must be one of {sorted(PLANE_WIDTHS)}, got {bits!r}")
    return PLANE_WIDTHS[bits]


def check_packable(in_features: int, widths: tuple[int, ...], what: str) -> None:
    for w in widths:
        if in_features % (8 // w):
            raise ZipjaxError(f"{what}: {in_features} input channels cannot be packed {8 // w} codes per byte")


def pack_planes(codes: np.ndarray, widths: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """uint8 codes [..., in, out] -> one uint8 [..., in * w / 8, out] per plane width w (host numpy; the layout of
    `zipjax.kernels.common.pack` along `in`, which tests/test_experts.py checks against it)."""
    planes, shift = [], 0
    for w in widths:
        part = ((np.asarray(codes, np.uint8) >> shift) & ((1 << w) - 1)).astype(np.uint8)
        chunks = np.split(part, 8 // w, axis=-2)  # split halves of the in axis
        packed = chunks[0].copy()
        for j, chunk in enumerate(chunks[1:], start=1):
            packed |= chunk << (j * w)
        planes.append(packed)
        shift += w
    return tuple(planes)


def pack_planes_jnp(codes: jax.Array, widths: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """`pack_planes` by `zipjax.kernels.common.pack` itself (jnp): the reference layout."""
    planes, shift = [], 0
    for w in widths:
        part = (codes.astype(jnp.uint8) >> shift) & ((1 << w) - 1)
        planes.append(jnp.swapaxes(pack(jnp.swapaxes(part, -1, -2), w), -1, -2))
        shift += w
    return tuple(planes)


def unpack_planes(planes, widths: tuple[int, ...]):
    """Inverse of `pack_planes` (jnp, traceable): uint8 codes [..., in, out]."""
    codes, shift = None, 0
    for plane, w in zip(planes, widths, strict=True):
        part = jnp.swapaxes(unpack(jnp.swapaxes(plane, -1, -2), w), -1, -2)
        part = part if shift == 0 else part << shift
        codes = part if codes is None else codes | part
        shift += w
    return codes


@dataclasses.dataclass
class Quantized:
    """One delta matrix, quantized (host numpy)."""

    codes: np.ndarray  # uint8 [in, out]
    step: np.ndarray  # float16 [out]
    minimum: np.ndarray  # float16 [out]
    salient_idx: np.ndarray  # int32 [k]
    salient_rows: np.ndarray  # float16 [k, out]

    def dequantize(self) -> np.ndarray:
        """float32 [in, out]: the codes dequantized, plus the salient residual rows."""
        out = self.minimum.astype(np.float32) + self.step.astype(np.float32) * self.codes.astype(np.float32)
        out[self.salient_idx] += self.salient_rows.astype(np.float32)
        return out


def _column_stats(delta: np.ndarray, rows: np.ndarray, bits: int, quantizer: str) -> tuple[np.ndarray, np.ndarray]:
    """float16 (step, minimum) [out] fitted on delta[rows]."""
    part = delta[rows] if rows is not None else delta
    if bits == 1:
        scale = np.abs(part).mean(axis=0).astype(np.float16)
        return (2 * scale.astype(np.float32)).astype(np.float16), -scale
    levels = (1 << bits) - 1
    lo, hi = part.min(axis=0), part.max(axis=0)
    grid = CLIP_GRID if quantizer == "mse" else (1.0,)
    best_err = np.full(part.shape[1], np.inf, np.float32)
    best_step = np.zeros(part.shape[1], np.float16)
    best_min = np.zeros(part.shape[1], np.float16)
    for c in grid:
        step, minimum = _fp16_pair((hi - lo) * c / levels, lo * c)
        err = ((_deq(_codes(part, step, minimum, bits), step, minimum) - part) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_step, best_min = np.where(better, step, best_step), np.where(better, minimum, best_min)
    return best_step, best_min


def _fp16_pair(step: np.ndarray, minimum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return step.astype(np.float16), minimum.astype(np.float16)


def _codes(delta: np.ndarray, step: np.ndarray, minimum: np.ndarray, bits: int) -> np.ndarray:
    step32, min32 = step.astype(np.float32), minimum.astype(np.float32)
    if bits == 1:
        return (delta > 0).astype(np.uint8)
    safe = np.where(step32 > 0, step32, 1.0)
    return np.clip(np.rint((delta - min32) / safe), 0, (1 << bits) - 1).astype(np.uint8)


def _deq(codes: np.ndarray, step: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    return minimum.astype(np.float32) + step.astype(np.float32) * codes.astype(np.float32)


def quantize(delta: np.ndarray, bits: int, k: int, *, quantizer: str = "mse", score: str = "error",
             act_rms: np.ndarray | None = None) -> Quantized:
    """Quantize delta [in, out] (float32) with k salient input channels. act_rms [in]: RMS of the activations that
    multiply each input channel (None: all ones, i.e. weight-only reconstruction error)."""
    delta = np.asarray(delta, np.float32)
    n_in = delta.shape[0]
    if score == "none":
        k = 0
    if k:
        step, minimum = _column_stats(delta, None, bits, quantizer)
        if score == "error":
            err = np.linalg.norm(delta - _deq(_codes(delta, step, minimum, bits), step, minimum), axis=1)
            weight = np.ones(n_in, np.float32) if act_rms is None else np.asarray(act_rms, np.float32)
            scores = err * weight
        else:  # magnitude
            scores = np.linalg.norm(delta, axis=1)
        salient = np.sort(np.argsort(-scores, kind="stable")[:k]).astype(np.int32)
    else:
        salient = np.zeros((0,), np.int32)
    rest = np.setdiff1d(np.arange(n_in), salient)
    step, minimum = _column_stats(delta, rest, bits, quantizer)
    codes = _codes(delta, step, minimum, bits)
    residual = (delta[salient] - _deq(codes[salient], step, minimum)).astype(np.float16)
    return Quantized(codes, step, minimum, salient, residual)
