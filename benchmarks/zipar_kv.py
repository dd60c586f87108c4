"""Parallel decoders over compressed KV caches: every decoder x every cache on the shipped digits model, side by side.

    python benchmarks/zipar_kv.py                      # 20 images per cell (2 per digit), one batch
    python benchmarks/zipar_kv.py --images 50 --out benchmarks/results

Decoders: sequential, ZipAR with a fixed lag (s=4), adaptive ZipAR (m=2), Speculative Jacobi Decoding (w=8).
Caches: dense, ZipCache 4/2 (60% salient), KIVI-2, KIVI-4 (group 16, residual 32), Uniform 4-bit; the quantized
caches compress blocks of 16 tokens (a row of the 16x16 digits). KIVI runs under sequential decoding only: the
parallel decoders refuse it by name (zipjax.zipar.compressed). Per cell: forward passes, KV bytes the decode held
(every array of the cache, guidance's sequences included; `ImageResult.kv_nbytes`), the shipped classifier's accuracy
against the prompted digit, the Fréchet distance of its features to held-out real digits, and ms/image of a second,
compiled run. Sequential + dense is the reference of the same run; the same cell again with another seed shows the
metrics' own noise. Prompts "a handwritten digit <name>", CFG 3 against "a handwritten digit", temperature 1, no top-k.

Results: a table on stdout; zipar_kv_<backend>.json under `--out` (default benchmarks/results/local/, untracked).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
import report

import zipjax
from zipjax import zipar
from zipjax.harness.digits_quality import DigitClassifier
from zipjax.image import Sequential

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "checkpoints" / "digits-emu3"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BLOCK = 16
CACHES = {
    "dense": None,
    "ZipCache 4/2": zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6, buffer_len=BLOCK),
    "KIVI-2": zipjax.kv.KIVI(bits=2, group=16, residual=32),
    "KIVI-4": zipjax.kv.KIVI(bits=4, group=16, residual=32),
    "uniform 4": zipjax.kv.Uniform(bits=4, buffer_len=BLOCK),
}
DECODERS = {
    "sequential": lambda kv: Sequential(kv=kv),
    "ZipAR s=4": lambda kv: zipar.FixedWindow(4, kv=kv),
    "ZipAR adaptive m=2": lambda kv: zipar.AdaptiveWindow(2, kv=kv),
    "SJD w=8": lambda kv: zipar.SJD(8, kv=kv),
}


def one_cell(model, classifier, decoder, images: int, seed: int) -> dict:
    """Generate `images` digits (an equal number of each) in one batch, after a compiling run of the same shapes."""
    labels = np.arange(images) % 10
    prompts = [f"a handwritten digit {NAMES[c]}" for c in labels]
    args = dict(size=(16, 16), cfg_scale=3.0, negative_prompt="a handwritten digit", temperature=1.0, top_k=None,
                decoder=decoder)
    zipjax.generate_image(model, prompts, seed=seed + 7, **args)  # compile outside the timing
    t = time.perf_counter()
    result = zipjax.generate_image(model, prompts, seed=seed, **args)
    seconds = time.perf_counter() - t
    digits = result.images[..., 0]
    return {"passes": result.num_forward_passes, "kv_bytes": result.kv_nbytes, "images": images,
            "ms_per_image": round(1e3 * seconds / images, 1),
            "accuracy": round(classifier.accuracy(digits, labels), 4),
            "frechet_distance": round(classifier.frechet_distance(digits), 3)}


def run(images: int) -> list[dict]:
    model = zipjax.load(DIGITS)
    classifier = DigitClassifier.load(DIGITS)
    rows = []
    cells = [(d, c, 0) for d in DECODERS for c in CACHES] + [("sequential", "dense", 1000)]  # last: seed noise
    for decoder_name, cache_name, seed in cells:
        row = {"decoder": decoder_name, "cache": cache_name, "seed": seed}
        try:
            decoder = DECODERS[decoder_name](CACHES[cache_name])
        except zipjax.ZipjaxError as error:  # a combination the library refuses by name
            rows.append({**row, "refused": str(error)})
            print(f"{decoder_name} x {cache_name}: refused ({error})", flush=True)
            continue
        t = time.perf_counter()
        rows.append({**row, **one_cell(model, classifier, decoder, images, seed)})
        print(f"{decoder_name} x {cache_name} (seed {seed}): {rows[-1]} [{time.perf_counter() - t:.0f}s with "
              f"compilation]", flush=True)
    return rows


def table(rows: list[dict]) -> list[tuple]:
    reference = next(r for r in rows if r["decoder"] == "sequential" and r["cache"] == "dense" and r["seed"] == 0)
    out = []
    for r in rows:
        name = r["decoder"] + (" (seed 2)" if r["seed"] else "")
        if "refused" in r:
            out.append((name, r["cache"], "refused", "", "", "", "", ""))
            continue
        out.append((name, r["cache"], r["passes"], f"{r['kv_bytes'] / 1024:.0f}",
                    f"{r['kv_bytes'] / reference['kv_bytes']:.2f}", f"{r['accuracy']:.2f}",
                    f"{r['frechet_distance']:.2f}", f"{r['ms_per_image']:.0f}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20, help="images per cell (one batch)")
    report.add_out_argument(parser)
    args = parser.parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0]
    rows = run(args.images)
    results = {"benchmark": "benchmarks/zipar_kv.py", "backend": backend,
               "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "jax": jax.__version__, "images_per_cell": args.images,
               "reference": "sequential decoding over the dense cache, same run", "rows": rows}
    report.print_table(("decoder", "cache", "passes", "KV KiB", "KV vs dense seq", "accuracy", "Fréchet distance",
                        "ms/image"), table(rows))
    out = report.write_json(args.out / f"zipar_kv_{backend}.json", results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
