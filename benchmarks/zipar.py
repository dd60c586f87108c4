"""ZipAR: forward passes, wall time and image quality against sequential decoding, measured side by side.

    python benchmarks/zipar.py                  # quality on the shipped digits model, then speed at 90x90
    python benchmarks/zipar.py --skip-speed --images 200
    python benchmarks/zipar.py --out benchmarks/results   # update the tracked results

1. Quality (checkpoints/digits-emu3, 16x16 digits): sequential decoding, ZipAR windows 1, 2, 4, 8, 16, adaptive
   ZipAR (minimum windows 1, 2, 4) and Speculative Jacobi Decoding (windows 4, 16); for each, N images (an equal
   number of each digit, prompt "a handwritten digit seven", CFG 3 against "a handwritten digit", temperature 1,
   no top-k), scored by the shipped digit classifier: accuracy against the prompted digit, and the Fréchet
   distance of its features to held-out real digits. A second sequential run with another seed shows the
   metrics' own noise. Writes a quality-vs-passes plot and a grid of samples.
2. Speed (random weights, Emu3 layout at 90x90 codes: 8190 sequential passes, reduced width and depth so a CPU
   can run it): wall time of sequential decoding, ZipAR windows, adaptive ZipAR and SJD, with CFG, the same
   prompt; the ratio of wall-time speedup to pass reduction shows what the parallel passes cost.

Results: a table on stdout; zipar_<backend>.json, zipar_quality.png and zipar_samples.png under `--out` (default
benchmarks/results/local/, untracked; a skipped section keeps its results from the JSON there, or from the tracked
one).
Needs matplotlib for the plots (pip install matplotlib).
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
from zipjax.config import ModelConfig, RopeConfig
from zipjax.emu3.model import Emu3Model, Emu3Vision
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import PaletteConfig
from zipjax.harness.digits_quality import DigitClassifier
from zipjax.image import Decoder, Sequential
from zipjax.platform import use_kernel
from zipjax.transformer import init_params, param_count

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "checkpoints" / "digits-emu3"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def method_name(decoder: Decoder) -> str:
    if isinstance(decoder, zipar.SJD):
        return f"SJD w={decoder.jacobi_window}"
    if isinstance(decoder, zipar.AdaptiveWindow):
        return f"ZipAR adaptive m={decoder.min_lag}"
    if isinstance(decoder, zipar.FixedWindow):
        return f"ZipAR s={decoder.lag}"
    return "sequential"


def method_fields(decoder: Decoder) -> dict:
    """The decoder's settings for a result row, under the keys earlier result files used, plus whether the
    attention ran as the Pallas kernel."""
    if isinstance(decoder, zipar.SJD):
        fields = {"sjd_window": decoder.window}
    elif isinstance(decoder, zipar.AdaptiveWindow):
        fields = {"zipar_window": "adaptive", "zipar_min_window": decoder.min_window}
    elif isinstance(decoder, zipar.FixedWindow):
        fields = {"zipar_window": decoder.window}
    else:
        return {}
    return {**fields, "kernel": use_kernel(decoder.kernel)}


def quality(images_per_method: int, batch: int, methods: list[Decoder]) -> tuple[list[dict], dict]:
    model = zipjax.load(DIGITS)
    classifier = DigitClassifier.load(DIGITS)
    labels = np.arange(images_per_method) % 10
    rows, samples = [], {}
    runs = [(m, 0) for m in methods] + [(Sequential(), 1)]  # the last: sequential again with another seed (noise)
    for method, seed_offset in runs:
        images, seconds, passes = [], 0.0, []
        zipjax.generate_image(model, ["a handwritten digit one"] * batch, size=(16, 16), top_k=None,
                              negative_prompt="a handwritten digit", decoder=method)  # compile outside the timing
        for start in range(0, images_per_method, batch):
            chunk = labels[start:start + batch]
            t = time.perf_counter()
            result = zipjax.generate_image(model, [f"a handwritten digit {NAMES[c]}" for c in chunk], size=(16, 16),
                                           cfg_scale=3.0, negative_prompt="a handwritten digit", temperature=1.0,
                                           top_k=None, seed=1000 * seed_offset + start, decoder=method)
            seconds += time.perf_counter() - t
            passes.append(result.num_forward_passes)
            images.append(result.images[..., 0])
        images = np.concatenate(images)
        name = method_name(method) + (" (seed 2)" if seed_offset else "")
        samples[name] = images[:20]
        passes = float(np.mean(passes))  # data-dependent for adaptive ZipAR and SJD (the batch's slowest image)
        rows.append({"method": name, **method_fields(method), "passes": passes, "images": len(images),
                     "seconds": round(seconds, 2), "ms_per_image": round(1e3 * seconds / len(images), 2),
                     "accuracy": round(classifier.accuracy(images, labels), 4),
                     "frechet_distance": round(classifier.frechet_distance(images), 3)})
        print(f"[quality] {name}: {passes:.0f} passes, accuracy {rows[-1]['accuracy']:.3f}, "
              f"FD {rows[-1]['frechet_distance']:.2f}, {seconds:.1f}s", flush=True)
    heldout = np.load(DIGITS / "heldout.npz")
    real = np.round(heldout["codes"] * 255.0 / 15).astype(np.uint8)
    reference = {"real_heldout_accuracy": round(classifier.accuracy(real, heldout["labels"]), 4),
                 "classifier_heldout_accuracy": classifier.heldout_accuracy}
    return rows, {"samples": samples, **reference}


def speed_model(width: int, layers: int) -> Emu3Model:
    """A random Emu3-layout model (32768 visual tokens + a small text vocabulary), built in memory."""
    text = 1024
    vocab = Emu3Vocab(bos=1, eos=2, pad=0, image_wrapper=3, boi=4, eoi=5, eol=6, eof=7, visual_offset=text,
                      codebook_size=32768)
    config = ModelConfig(architecture="emu3", vocab_size=text + 32768, hidden_size=width, intermediate_size=3 * width,
                         num_layers=layers, num_heads=width // 64, num_kv_heads=max(1, width // 256), head_dim=64,
                         max_position_embeddings=9216, rope=RopeConfig(theta=1e6), bos_token_id=1,
                         eos_token_ids=(2,), pad_token_id=0)
    palette = jax.random.uniform(jax.random.key(1), (32768, 3), minval=-1, maxval=1)
    return Emu3Model(config=config, params=init_params(config, jax.random.key(0)),
                     vision=Emu3Vision(PaletteConfig(codebook_size=32768, max_pixels=1 << 20), vocab),
                     vq_params={"codebook": palette})


def speed(methods: list[Decoder], width: int, layers: int) -> list[dict]:
    model = speed_model(width, layers)
    prompt = [1, *range(10, 40), 4, 8, 9, 3]  # BOS, 30 "text" tokens, image start, "h*w", image token
    negative = [1, 11, 12, 4, 8, 9, 3]
    rows = []
    for method in [Sequential(), *methods]:
        args = dict(size=(90, 90), cfg_scale=3.0, negative_prompt=negative, top_k=2048, seed=0, decoder=method)
        t = time.perf_counter()
        zipjax.generate_image(model, prompt, **args)
        first = time.perf_counter() - t
        t = time.perf_counter()
        result = zipjax.generate_image(model, prompt, **args)
        seconds = time.perf_counter() - t
        rows.append({"method": method_name(method), **method_fields(method), "passes": result.num_forward_passes,
                     "seconds": round(seconds, 2),
                     "compile_s": round(max(first - seconds, 0), 2)})
        print(f"[speed] {rows[-1]['method']}: {result.num_forward_passes} passes in {seconds:.1f}s", flush=True)
    base = rows[0]
    for r in rows:
        r["pass_reduction"] = round(base["passes"] / r["passes"], 2)
        r["wall_speedup"] = round(base["seconds"] / r["seconds"], 2)
        r["speedup_over_pass_reduction"] = round(r["wall_speedup"] / r["pass_reduction"], 2)
    return rows


def plots(quality_rows: list[dict], samples: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "accuracy", "class accuracy (higher is better)"),
                           (axes[1], "frechet_distance", "Fréchet distance to real digits (lower is better)")):
        for r in quality_rows:
            marker = "s" if r["method"].startswith("sequential") else ("^" if "SJD" in r["method"] else "o")
            ax.scatter(r["passes"], r[key], marker=marker)
            ax.annotate(r["method"], (r["passes"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("forward passes per image (log)")
        ax.set_title(label, fontsize=9)
    fig.suptitle("ZipAR on the digits model: quality vs forward passes")
    fig.tight_layout()
    quality_png = report.save_plot(fig, out_dir / "zipar_quality.png")

    names = list(samples)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 0.9 * len(names)))
    for ax, name in zip(axes, names, strict=True):
        strip = np.concatenate(list(samples[name][:20]), axis=1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    samples_png = report.save_plot(fig, out_dir / "zipar_samples.png")
    return [report.repo_path(quality_png), report.repo_path(samples_png)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500, help="images per method for the quality metrics")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--min-windows", type=int, nargs="+", default=[1, 2, 4], help="adaptive ZipAR")
    parser.add_argument("--sjd-windows", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--speed-windows", type=int, nargs="+", default=[1, 4, 7, 16])
    parser.add_argument("--speed-width", type=int, default=512)
    parser.add_argument("--speed-layers", type=int, default=4)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    report.add_out_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0]
    results = {"benchmark": "benchmarks/zipar.py", "backend": backend,
               "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "jax": jax.__version__,
               "baseline": "sequential decoding (one image token per forward pass) with the same model and settings"}
    out = args.out / f"zipar_{backend}.json"
    previous, _ = report.previous_results(out)  # a skipped section keeps its previous results
    results.update({k: v for k, v in previous.items() if k not in results})
    if not args.skip_quality:
        methods = [Sequential(), *(zipar.FixedWindow(w) for w in args.windows),
                   *(zipar.AdaptiveWindow(m) for m in args.min_windows), *(zipar.SJD(w) for w in args.sjd_windows)]
        rows, extra = quality(args.images, args.batch, methods)
        results["quality"] = rows
        results["quality_reference"] = {k: v for k, v in extra.items() if k != "samples"}
        results["plots"] = plots(rows, extra["samples"], args.out)
        report.print_table(("method", "passes", "accuracy", "Fréchet distance", "ms/image"),
                           [(r["method"], f"{r['passes']:.0f}", f"{r['accuracy']:.3f}", f"{r['frechet_distance']:.2f}",
                             f"{r['ms_per_image']:.1f}") for r in rows])
        print(f"(real held-out digits: classifier accuracy {extra['real_heldout_accuracy']:.3f})")
    if not args.skip_speed:
        model = speed_model(args.speed_width, args.speed_layers)
        results["speed_model"] = {"hidden": args.speed_width, "layers": args.speed_layers,
                                 "parameters": param_count(model.params), "codes": [90, 90], "cfg_scale": 3.0}
        del model
        # SJD is compared on the trained digits model only: on random weights its drafts are almost never accepted,
        # so it makes ~8190 passes, each with a window of queries, and says nothing about trained-model behaviour.
        methods = [*(zipar.FixedWindow(w) for w in args.speed_windows), zipar.AdaptiveWindow(4)]
        rows = speed(methods, args.speed_width, args.speed_layers)
        results["speed"] = rows
        report.print_table(("method", "passes", "seconds", "pass reduction", "wall speedup",
                            "speedup / pass reduction"),
                           [(r["method"], r["passes"], f"{r['seconds']:.1f}", f"{r['pass_reduction']:.2f}x",
                             f"{r['wall_speedup']:.2f}x", f"{r['speedup_over_pass_reduction']:.2f}") for r in rows])
    report.write_json(out, results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
