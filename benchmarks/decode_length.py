"""Length-bounded decode: does a decode step cost what the cache holds, or what it could hold?

    python benchmarks/decode_length.py                 # 512 live tokens in caches of 1,024 and 16,384 slots
    python benchmarks/decode_length.py --out benchmarks/results   # the same, updating the tracked results

A random LLaMA-shaped model (float32, 6 layers, hidden 512, 8 query / 2 KV heads of 64) decodes with 512 live
tokens in the cache. Two attention paths are timed in the same run on the same weights:

  bounded    zipjax's attention (zipjax.attention.cache_attention): key blocks past the cursor are never read
  full       the baseline it replaced: a mask over every slot of the static cache, so each step reads all of it

ms/token is the median time between tokens of `generate_stream` (prefill excluded; compile excluded by a warm-up).
The target: bounded decode in the 16,384-slot cache within 1.2x of the 1,024-slot cache. The table is printed and
the JSON written to decode_length_<backend>.json under `--out` (default benchmarks/results/local/, untracked).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import report

import zipjax
import zipjax.kv.dense
from zipjax.attention import gqa_attention, slot_mask
from zipjax.config import ModelConfig
from zipjax.model import Model
from zipjax.transformer import init_params

CONFIG = ModelConfig(architecture="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=6,
                     num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=16384)
BOUNDED = zipjax.kv.dense.cache_attention


def full_cache_attention(q, k, v, cursor, starts, sliding_window):
    """The baseline: every slot of the static cache is scored, masked, and read."""
    mask = slot_mask(cursor + jnp.arange(q.shape[1]), jnp.arange(k.shape[2]), starts, sliding_window)
    return gqa_attention(q, k, v, mask)


def ms_per_token(model: Model, prompt: list[int], cache_length: int, steps: int) -> float:
    list(zipjax.generate_stream(model, [prompt], 4, cache_length=cache_length, stop_tokens=()))  # compile
    gaps, last = [], None
    for _ in zipjax.generate_stream(model, [prompt], steps + 1, cache_length=cache_length, stop_tokens=()):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return 1e3 * statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--live", type=int, default=512, help="tokens in the cache while decoding")
    parser.add_argument("--caches", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--steps", type=int, default=48)
    report.add_out_argument(parser)
    args = parser.parse_args()
    model = Model(CONFIG, init_params(CONFIG, jax.random.key(0)))
    prompt = np.random.default_rng(0).integers(3, CONFIG.vocab_size, args.live - args.steps // 2).tolist()
    rows = []
    for name, attention in (("bounded", BOUNDED), ("full", full_cache_attention)):
        zipjax.kv.dense.cache_attention = attention
        jax.clear_caches()
        for cache in args.caches:
            ms = ms_per_token(model, prompt, cache, args.steps)
            rows.append({"path": name, "cache_slots": cache, "live_tokens": args.live, "ms_per_token": ms})
            print(f"{name:8s} {cache:6d} slots: {ms:7.2f} ms/token", flush=True)
    zipjax.kv.dense.cache_attention = BOUNDED
    by = {(r["path"], r["cache_slots"]): r["ms_per_token"] for r in rows}
    small, large = min(args.caches), max(args.caches)
    summary = {path: by[(path, large)] / by[(path, small)] for path in ("bounded", "full")}
    report.print_table(("path", f"{small} slots ms/token", f"{large} slots ms/token", "ratio"),
                       [(path, f"{by[(path, small)]:.2f}", f"{by[(path, large)]:.2f}", f"{summary[path]:.2f}x")
                        for path in ("bounded", "full")])
    backend = jax.default_backend()
    out = report.write_json(args.out / f"decode_length_{backend}.json", {
        "backend": backend, "machine": platform.machine(), "jax": jax.__version__, "config": CONFIG.to_dict(),
        "rows": rows, "ratio_large_over_small": summary, "target": "bounded ratio <= 1.2"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
