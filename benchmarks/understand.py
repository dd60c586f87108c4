"""Image understanding with compressed KV caches on the digits model: `zipjax.emu3.ask` accuracy on held-out digits,
prefill time, attention FLOPs and KV bytes per cache, and ZipVL's important tokens per layer (image versus text).

    python benchmarks/understand.py                            # results under benchmarks/results/local/
    python benchmarks/understand.py --out benchmarks/results   # update the tracked results

The model is checkpoints/digits-emu3 (trained to answer "which digit?" with the digit's name); the held-out digits
(never trained on) are shown to `ask` as 16x16 grey PNG-like images, batch 64, greedy. Per cache:
  accuracy          the answer equals the digit's name (chance: 0.1)
  prefill ms        the prompt pass alone (the left-padded 512-slot bucket `ask` runs, batch `--batch`), jitted,
                    best of `--repeats` after a compiling call
  attention FLOPs   of the prefill's QK^T and PV per sequence, summed over layers: the dense caches attend over the
                    whole padded prompt; ZipVL's sparse prefill over the bucket holding its important tokens (from
                    the per-layer p of `zipvl_report`, zipjax.kv.zipvl.bucket_sizes)
  KV bytes          what the cache of one sequence holds for this prompt plus the answer's slots (from shapes)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import report

import zipjax
from zipjax import kv
from zipjax.emu3.understand import question_prompt, zipvl_report
from zipjax.harness.digits_quality import QUESTION, ask_accuracy, grey_rgb, heldout_digits
from zipjax.kv.methods import cache_nbytes, init_cache
from zipjax.kv.zipvl import bucket_sizes
from zipjax.shapes import cache_length, left_pad, prompt_bucket
from zipjax.transformer import prompt_pass

DIGITS = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-emu3"
CACHES: dict[str, kv.Method | None] = {
    "dense": None,
    "ZipVL (tau 0.975, 4/2-bit)": kv.ZipVL(),
    "ZipCache 4/2": kv.ZipCache(),
    "KIVI-2": kv.KIVI(bits=2),
    "KIVI-4": kv.KIVI(bits=4),
    "uniform 4": kv.Uniform(bits=4),
    "MiniCache": kv.MiniCache(),
}
ANSWER_SLOTS = 4  # what ask_accuracy asks for: " seven" + EOS fit


def prefill_seconds(model, method, codes: np.ndarray, repeats: int) -> float:
    """Best wall time of the prompt pass `ask` runs (left-padded bucket, the cache `generate` builds)."""
    prompts = [question_prompt(model, c, QUESTION) for c in codes]
    bucket = prompt_bucket(len(prompts[0]))
    length = cache_length(bucket + max(ANSWER_SLOTS, kv.methods.min_decode_slots(method)))
    ids, starts = left_pad(prompts, bucket, model.config.pad_id)
    positions = jnp.maximum(jnp.arange(bucket)[None, :] - jnp.asarray(starts)[:, None], 0)

    @jax.jit
    def run(params, ids, starts):
        cache = init_cache(method, model.config, len(prompts), length, bucket, starts)
        return prompt_pass(params, model.config, ids, positions, cache)[0]

    jax.block_until_ready(run(model.params, jnp.asarray(ids), jnp.asarray(starts)))  # compile
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        jax.block_until_ready(run(model.params, jnp.asarray(ids), jnp.asarray(starts)))
        best = min(best, time.perf_counter() - tick)
    return best


def attention_flops(model, method, layers) -> tuple[int, int]:
    """(this cache's, dense) prefill attention FLOPs per sequence, summed over layers (4 * heads * head_dim *
    rows^2 per layer): ZipVL's rows are the bucket holding its p, the others' the padded prompt."""
    cfg = model.config
    bucket = prompt_bucket(layers[0].tokens)
    per_row = 4 * cfg.num_heads * cfg.head_dim
    dense = per_row * bucket**2 * cfg.num_layers
    if not isinstance(method, kv.ZipVL) or not method.sparse_prefill:
        return dense, dense
    sizes = bucket_sizes(bucket, method.buckets)
    used = [next(s for s in sizes if s >= layer.important) for layer in layers]
    return per_row * sum(s * s for s in used), dense


def run_cache(model, name: str, method, codes, labels, args) -> dict:
    asked = ask_accuracy(model, codes, labels, kv=method, batch=args.batch)
    prompt_len = len(question_prompt(model, codes[0], QUESTION))
    bucket = prompt_bucket(prompt_len)
    length = cache_length(bucket + max(ANSWER_SLOTS, kv.methods.min_decode_slots(method)))
    layers = zipvl_report(model, grey_rgb(codes[:args.batch]), QUESTION,
                          method if isinstance(method, kv.ZipVL) else kv.ZipVL())
    flops, dense_flops = attention_flops(model, method, layers)
    row = {"cache": name, "method": None if method is None else repr(method), "ask_accuracy": asked["accuracy"],
           "images": asked["images"], "prompt_tokens": prompt_len, "prefill_bucket": bucket,
           "prefill_ms": round(prefill_seconds(model, method, codes[:args.batch], args.repeats) * 1e3, 2),
           "prefill_batch": args.batch, "attention_flops": flops,
           "attention_flops_vs_dense": round(flops / dense_flops, 4),
           "kv_bytes_per_sequence": cache_nbytes(method, model.config, 1, length, bucket)}
    if isinstance(method, kv.ZipVL):
        row["zipvl_layers"] = [{"layer": r.layer, "important": r.important, "ratio": round(r.ratio, 4),
                                "high_bits": r.high_bits, "image_important": r.image_important,
                                "image_tokens": r.image_tokens, "image_ratio": round(r.image_ratio, 4),
                                "text_important": r.text_important, "text_tokens": r.text_tokens,
                                "text_ratio": round(r.text_ratio, 4)} for r in layers]
    print(f"[{name}] accuracy {row['ask_accuracy']:.3f}, prefill {row['prefill_ms']:.1f} ms, attention FLOPs "
          f"{row['attention_flops_vs_dense']:.2f}x dense", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=None, help="held-out digits to ask about (default: all 359)")
    parser.add_argument("--batch", type=int, default=64, help="images per ask call and per timed prefill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    report.add_out_argument(parser)
    args = parser.parse_args()
    model = zipjax.load(DIGITS)
    codes, labels = heldout_digits(DIGITS, args.images)
    rows = [run_cache(model, name, CACHES[name], codes, labels, args) for name in args.caches]
    header = ("cache", "ask accuracy", "prefill ms", "attention FLOPs vs dense", "KV bytes / sequence")
    report.print_table(header, [(r["cache"], f"{r['ask_accuracy']:.3f}", f"{r['prefill_ms']:.1f}",
                                 f"{r['attention_flops_vs_dense']:.2f}", f"{r['kv_bytes_per_sequence']:,}")
                                for r in rows])
    zipvl = next((r for r in rows if "zipvl_layers" in r), None)
    if zipvl is not None:
        report.print_table(("layer", "important / tokens", "image ratio", "text ratio"), [
            (r["layer"], f"{r['important']:.1f} / {zipvl['prompt_tokens']}", f"{r['image_ratio']:.3f}",
             f"{r['text_ratio']:.3f}") for r in zipvl["zipvl_layers"]], title="ZipVL's important tokens per layer")
    device = jax.devices()[0]
    meta = {"benchmark": "benchmarks/understand.py", "backend": jax.default_backend(),
            "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "model": "checkpoints/digits-emu3", "question": QUESTION, "chance": 0.1}
    out = report.write_json(args.out / f"understand_{jax.default_backend()}.json", {**meta, "results": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
