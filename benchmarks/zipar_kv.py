"""Parallel decoders over compressed KV caches: every decoder x every cache on the shipped digits model, side by side.

    python benchmarks/zipar_kv.py                      # 20 images per cell (2 per digit), one batch
    python benchmarks/zipar_kv.py --out benchmarks/results   # update the tracked results
    python benchmarks/zipar_kv.py --emu3-layout --out benchmarks/results   # ZipAR s=7 at 90x90, dense vs ZipCache

    python benchmarks/zipar_kv.py --decoders "ZipAR s=4" --caches KIVI-2 --out benchmarks/results
                                                       # rerun some cells; the file's other rows are kept

Decoders: sequential, ZipAR with a fixed lag (s=4), adaptive ZipAR (m=2), Speculative Jacobi Decoding (w=8).
Caches: dense, ZipCache 4/2 (60% salient), KIVI-2, KIVI-4 (group 16, residual 32), Uniform 4-bit; ZipCache and
Uniform compress blocks of 16 tokens (a row of the 16x16 digits); under the parallel decoders KIVI runs on its band
cache (zipjax.zipar.kivi_band: its precision rule read at each query's slot). Per cell: forward passes, KV bytes the
decode held
(every array of the cache, guidance's sequences included; `ImageResult.kv_nbytes`), the shipped classifier's accuracy
against the prompted digit, the Fréchet distance of its features to held-out real digits, and ms/image of a second,
compiled run; each cell prints its line as it finishes (all 21 cells in about 3 min on 2 shared CPU cores at 20
images; 50 images took over 12 min for the first 9 cells on cores busy with compile jobs). Sequential + dense is
the reference of the same run; the same cell again with another seed shows the metrics' own noise. Prompts
"a handwritten digit <name>", CFG 3 against "a handwritten digit", temperature 1, no top-k.

`--emu3-layout`: instead, a random-weight model with Emu3-Gen's token layout at reduced width and depth
(benchmarks/zipar.py's speed model: 90x90 image tokens + a row-end token per row = 8,190 visual tokens, guidance:
2 sequences per image, top-k 2048) decodes one 720x720-layout image with ZipAR s=7 over the dense cache and over
ZipCache 4/2 (blocks of 90 slots, 60% salient), in the same run: KV bytes held and wall time of the whole image
(713 passes; a first, compiling run of the same shapes is not timed). The ratios between the two are the claim;
absolute seconds are this machine's.

Results: a table on stdout; zipar_kv_<backend>.json (or zipar_kv_emu3_<backend>.json) under `--out` (default
benchmarks/results/local/, untracked).
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
EMU3_LAG = 7
EMU3_CACHES = {  # blocks of a row of codes (90 slots), as docs/zipar.md's example
    "dense": None,
    "ZipCache 4/2": zipjax.kv.ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6, buffer_len=90),
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


def grid(decoders=tuple(DECODERS), caches=tuple(CACHES)) -> list[tuple[str, str, int]]:
    """The cells (decoder, cache, seed) in table order, those of `decoders` x `caches`; last: the seed-noise cell."""
    cells = [(d, c, 0) for d in DECODERS for c in CACHES] + [("sequential", "dense", 1000)]
    return [cell for cell in cells if cell[0] in decoders and cell[1] in caches]


def merged(previous: list[dict], rows: list[dict]) -> list[dict]:
    """`previous` rows with those of the same (decoder, cache, seed) replaced by `rows`, in table order."""
    key = lambda r: (r["decoder"], r["cache"], r["seed"])
    by_cell = {key(r): r for r in previous} | {key(r): r for r in rows}
    return [by_cell[cell] for cell in grid() if cell in by_cell]


def run(images: int, cells: list[tuple[str, str, int]]) -> list[dict]:
    model = zipjax.load(DIGITS)
    classifier = DigitClassifier.load(DIGITS)
    rows = []
    start = time.perf_counter()
    for index, (decoder_name, cache_name, seed) in enumerate(cells, 1):
        row = {"decoder": decoder_name, "cache": cache_name, "seed": seed}
        where = f"[{index}/{len(cells)}, {time.perf_counter() - start:.0f}s] {decoder_name} x {cache_name}"
        try:
            decoder = DECODERS[decoder_name](CACHES[cache_name])
        except zipjax.ZipjaxError as error:  # a combination the library refuses by name
            rows.append({**row, "refused": str(error)})
            print(f"{where}: refused ({error})", flush=True)
            continue
        t = time.perf_counter()
        rows.append({**row, **one_cell(model, classifier, decoder, images, seed)})
        print(f"{where} (seed {seed}): {rows[-1]} [{time.perf_counter() - t:.0f}s with compilation]", flush=True)
    return rows


def emu3_layout(width: int, layers: int) -> dict:
    """ZipAR s=7 over the dense cache and over ZipCache 4/2 on a random Emu3-layout model at 90x90 codes, in one run:
    KV bytes held and the wall time of a whole image (after a compiling run of the same shapes, another seed)."""
    from zipar import speed_model  # benchmarks/zipar.py: the random Emu3-layout model its speed section times

    model = speed_model(width, layers)
    prompt = [1, *range(10, 40), 4, 8, 9, 3]  # BOS, 30 "text" tokens, image start, "h*w", image token
    negative = [1, 11, 12, 4, 8, 9, 3]
    rows = []
    for name, kv in EMU3_CACHES.items():
        args = dict(size=(90, 90), cfg_scale=3.0, negative_prompt=negative, top_k=2048, progress=True,
                    decoder=zipar.FixedWindow(EMU3_LAG, kv=kv))
        t = time.perf_counter()
        zipjax.generate_image(model, prompt, seed=1, **args)  # compile outside the timing
        first = time.perf_counter() - t
        t = time.perf_counter()
        result = zipjax.generate_image(model, prompt, seed=0, **args)
        seconds = time.perf_counter() - t
        rows.append({"cache": name, "passes": result.num_forward_passes, "kv_bytes": result.kv_nbytes,
                     "seconds": round(seconds, 2), "ms_per_pass": round(1e3 * seconds / result.num_forward_passes, 2),
                     "compile_s": round(max(first - seconds, 0.0), 2)})
        print(f"[emu3 layout] ZipAR s={EMU3_LAG} x {name}: {rows[-1]}", flush=True)
    for r in rows:
        r["kv_vs_dense"] = round(r["kv_bytes"] / rows[0]["kv_bytes"], 4)
        r["wall_vs_dense"] = round(r["seconds"] / rows[0]["seconds"], 3)
    config = model.config
    return {"model": {"hidden": width, "layers": layers, "heads": config.num_heads, "kv_heads": config.num_kv_heads,
                      "head_dim": config.head_dim, "dtype": config.dtype, "codes": [90, 90],
                      "visual_tokens": 90 * 91, "cfg_scale": 3.0, "sequences_per_image": 2},
            "decoder": f"ZipAR s={EMU3_LAG}", "rows": rows}


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
    parser.add_argument("--emu3-layout", action="store_true",
                        help="instead: ZipAR s=7, dense vs ZipCache 4/2, on a random Emu3-layout model at 90x90")
    parser.add_argument("--emu3-width", type=int, default=512, help="hidden size of the Emu3-layout model")
    parser.add_argument("--emu3-layers", type=int, default=4, help="layers of the Emu3-layout model")
    parser.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=list(DECODERS),
                        help="run only these decoders' cells (others are kept from the --out file)")
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES),
                        help="run only these caches' cells (others are kept from the --out file)")
    report.add_out_argument(parser)
    args = parser.parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0]
    results = {"benchmark": "benchmarks/zipar_kv.py", "backend": backend,
               "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "jax": jax.__version__}
    if args.emu3_layout:
        results.update(emu3_layout(args.emu3_width, args.emu3_layers))
        report.print_table(("cache", "passes", "KV MiB", "KV vs dense", "seconds", "ms/pass", "wall vs dense"),
                           [(r["cache"], r["passes"], f"{r['kv_bytes'] / 2**20:.1f}", f"{r['kv_vs_dense']:.2f}",
                             f"{r['seconds']:.1f}", f"{r['ms_per_pass']:.1f}", f"{r['wall_vs_dense']:.2f}")
                            for r in results["rows"]])
        print(f"\nwrote {report.write_json(args.out / f'zipar_kv_emu3_{backend}.json', results)}")
        return
    cells = grid(args.decoders, args.caches)
    write_grid(results, cells, run(args.images, cells), args.images, args.out / f"zipar_kv_{backend}.json")


def write_grid(results: dict, cells: list[tuple[str, str, int]], rows: list[dict], images: int, path: Path) -> None:
    """Write the grid's JSON to `path` and print its table: `rows` of `cells`; where they are not the whole grid, the
    file's other rows are kept (its reference among them) and the cells rerun are listed under "partial_runs"."""
    results.update({"images_per_cell": images, "reference": "sequential decoding over the dense cache, same run",
                    "rows": rows})
    if len(cells) < len(grid()):
        previous = report.previous_results(path)[0]
        results["rows"] = merged(previous.get("rows", []), rows)
        results["images_per_cell"] = previous.get("images_per_cell", images)
        results["reference"] = ("sequential decoding over the dense cache, in the first run; each of partial_runs "
                                "reran its cells later (their ms/image compare with each other)")
        results["partial_runs"] = [*previous.get("partial_runs", []), {
            "date": time.strftime("%Y-%m-%d"), "images_per_cell": images,
            "cells": [f"{d} x {c} (seed {seed})" for d, c, seed in cells]}]
    out = report.write_json(path, results)
    report.print_table(("decoder", "cache", "passes", "KV KiB", "KV vs dense seq", "accuracy", "Fréchet distance",
                        "ms/image"), table(results["rows"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
