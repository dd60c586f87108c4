"""The pod benchmark's measured part: `zipjax.generate_stream` timed on this process's devices (TTFT, p50 / p99 per
output token, tok/s per chip, MBU), beside the bandwidth roofline of the same step where the chip has peak figures.
Nothing here is predicted."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import zipjax
from zipjax import aot


@dataclasses.dataclass(frozen=True)
class Measured:
    """One measured batch size (mbu and roofline_step_s are None on a device with no peak figures, e.g. a CPU)."""

    batch: int
    chips: int
    device: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    p50_s: float
    p99_s: float
    tok_s_per_chip: float
    ideal_bytes_per_chip: float
    mbu: float | None
    roofline_step_s: float | None


def chip_for_device(device: jax.Device) -> str | None:
    """The CHIPS entry of a real device, or None (a CPU has no peak figures)."""
    kind = device.device_kind.lower()
    for gen, needle in (("v5e", "v5 lite"), ("v6e", "v6 lite"), ("v5p", "v5"), ("h200", "h200"), ("h100", "h100")):
        if needle in kind:
            return gen
    return None


def _time_stream(model: zipjax.Model, prompts: list[list[int]], new_tokens: int) -> tuple[float, np.ndarray]:
    """(TTFT, seconds per output token after the first) of one warm `generate_stream` call."""
    list(zipjax.generate_stream(model, prompts, new_tokens, stop_tokens=()))  # compile
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in zipjax.generate_stream(model, prompts, new_tokens, stop_tokens=())]
    return stamps[0] - start, np.diff(np.array(stamps))


def measure(checkpoint: Path, batches: Sequence[int], new_tokens: int, prompt_len: int,
            mesh_shape: tuple[int, int] | None) -> list[Measured]:
    """Time `zipjax.generate_stream` on this process's devices: TTFT, p50/p99 per output token, tok/s per chip and
    MBU, with the bandwidth roofline of the same step beside them (where the chip has peak figures)."""
    mesh = zipjax.make_mesh(*mesh_shape) if mesh_shape else None
    model = zipjax.load(checkpoint, mesh=mesh)
    chips = mesh.devices.size if mesh is not None else 1
    gen = chip_for_device(jax.devices()[0])
    config = model.config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    text = "def read_config(path):\n    " * (1 + prompt_len // 4)
    ids = model.tokenizer.encode(text)[:prompt_len]
    rows = []
    for batch in batches:
        ttft, per_token = _time_stream(model, [ids] * batch, new_tokens)
        p50, p99 = float(np.percentile(per_token, 50)), float(np.percentile(per_token, 99))
        live = prompt_len + new_tokens // 2
        kv_bytes = 2 * config.num_layers * batch * config.num_kv_heads * live * config.head_dim * 2
        ideal = (weight_bytes + kv_bytes) / chips  # per chip, bf16 cache
        bandwidth = aot.CHIPS[gen].hbm_bandwidth if gen is not None else None
        rows.append(Measured(batch, chips, jax.devices()[0].device_kind, len(ids), new_tokens, ttft, p50, p99,
                             batch / p50 / chips, ideal, ideal / p50 / bandwidth if bandwidth else None,
                             ideal / bandwidth if bandwidth else None))
    return rows
