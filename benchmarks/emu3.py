"""Emu3 text-to-image: zipjax against transformers on the very same random-weight Emu3 models, one run.

    python benchmarks/emu3.py                    # tiny and small models
    python benchmarks/emu3.py --models small
    python benchmarks/emu3.py --out benchmarks/results   # update the tracked results

Both sides generate greedily with classifier-free guidance (scale 3, a negative prompt) under Emu3's layout
constraint: zipjax with `generate_image` (batched CFG, one jitted loop), transformers with `generate` plus the
documented `prefix_allowed_tokens_fn` and its CFG processor; the image tokens are compared. Reported per model: time
per image token (generation only, prefill included), VQ-VAE decode time, and seconds per image (both). zipjax's
first call, which compiles, is timed separately. The table is printed and the JSON written to emu3_<backend>.json
under `--out` (default benchmarks/results/local/, untracked).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import report
import torch
from transformers import Emu3ForConditionalGeneration
from zipjax.convert import convert

import zipjax
from zipjax.image import format_prompt, generate_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the random-model builders
from random_hf import TINY_TEXT, TINY_VQ, save_random_emu3

PROMPT = "a watercolor painting of mountains at sunset with a lake in the foreground."
NEGATIVE = "lowres, bad anatomy, text, error, cropped, worst quality, low quality, blurry."

MODELS = {
    # name: (text config, VQ config, image size in pixels)
    "tiny": (TINY_TEXT, TINY_VQ, (32, 32)),
    "small": (dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=2048),
              dict(TINY_VQ, codebook_size=1024, base_channels=64, channel_multiplier=[1, 2, 2], hidden_size=128),
              (128, 128)),
}


def constraint(vocab, rows: int, cols: int):
    visual = list(vocab.visual_ids)

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == vocab.image_wrapper, as_tuple=True)[0][0]
        end = (cols + 1) * rows
        if offset % (cols + 1) == 0:
            return [vocab.eol]
        return {end + 1: [vocab.eof], end + 2: [vocab.eoi], end + 3: [vocab.eos]}.get(int(offset), visual)

    return allowed


def run_model(name: str, workdir: Path) -> dict:
    text, vq, size = MODELS[name]
    print(f"[{name}] building a random Emu3 and converting it", flush=True)
    hf_dir = save_random_emu3(workdir / f"{name}-hf", text=text, vq=vq)
    model = zipjax.load(convert(hf_dir, workdir / f"{name}-zj", progress=False))
    hf = Emu3ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    factor = model.vq_config.spatial_factor
    rows, cols = size[0] // factor, size[1] // factor
    image_tokens = rows * (cols + 1)

    def ours():
        return generate_image(model, PROMPT, size=size, cfg_scale=3.0, negative_prompt=NEGATIVE, temperature=0)

    start = time.perf_counter()
    ours()
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    result = ours()
    zj_gen = time.perf_counter() - start
    # decode alone (inside `ours` too), to split generation from decoding
    model.decode_codes(result.codes).block_until_ready()
    start = time.perf_counter()
    model.decode_codes(result.codes).block_until_ready()
    zj_decode = time.perf_counter() - start
    zj_gen -= zj_decode

    print(f"[{name}] zipjax: {rows}x{cols} codes in {zj_gen:.2f}s + decode {zj_decode:.3f}s; "
          "now transformers", flush=True)
    cond = torch.tensor([result.prompt_ids[0]])
    negative = torch.tensor([format_prompt(model, NEGATIVE, rows, cols)])
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(input_ids=cond, max_new_tokens=image_tokens + 3, do_sample=False, guidance_scale=3.0,
                          negative_prompt_ids=negative, prefix_allowed_tokens_fn=constraint(model.vocab, rows, cols))
        hf_gen = time.perf_counter() - start
        generated = out[:, cond.shape[1]:]
        start = time.perf_counter()
        hf.model.decode_image_tokens(generated, height=rows, width=cols)
        hf_decode = time.perf_counter() - start
    same = generated[0].numpy() == result.tokens[0]
    row = {
        "model": name, "lm_parameters": zipjax.transformer.param_count(model.params),
        "vq_parameters": zipjax.transformer.param_count(model.vq_params), "image_pixels": list(size),
        "codes": [rows, cols], "image_tokens": image_tokens, "zipjax_forward_passes": result.num_forward_passes,
        "zipjax_generate_s": round(zj_gen, 3), "transformers_generate_s": round(hf_gen, 3),
        "zipjax_ms_per_image_token": round(1e3 * zj_gen / image_tokens, 3),
        "transformers_ms_per_image_token": round(1e3 * hf_gen / image_tokens, 3),
        "generate_speedup": round(hf_gen / zj_gen, 2),
        "zipjax_decode_s": round(zj_decode, 4), "transformers_decode_s": round(hf_decode, 4),
        "decode_speedup": round(hf_decode / zj_decode, 2),
        "zipjax_s_per_image": round(zj_gen + zj_decode, 3), "transformers_s_per_image": round(hf_gen + hf_decode, 3),
        "image_speedup": round((hf_gen + hf_decode) / (zj_gen + zj_decode), 2),
        "zipjax_first_call_s": round(first_call, 2),
        "greedy_tokens_identical": bool(same.all()), "greedy_tokens_agreement": round(float(same.mean()), 4),
    }
    print(f"[{name}] {row['zipjax_ms_per_image_token']:.2f} vs {row['transformers_ms_per_image_token']:.2f} "
          f"ms/token ({row['generate_speedup']:.2f}x); image {row['image_speedup']:.2f}x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    report.add_out_argument(parser)
    args = parser.parse_args()

    backend = jax.default_backend()
    device = jax.devices()[0]
    meta = {
        "benchmark": "benchmarks/emu3.py", "backend": backend, "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "baseline": "transformers Emu3ForConditionalGeneration.generate (greedy, CFG 3.0 via negative_prompt_ids, "
                    "prefix_allowed_tokens_fn) + decode_image_tokens, float32, same weights and prompt",
        "dtype": "float32",
    }
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_model(name, Path(tmp)) for name in args.models]

    header = ("model", "LM params", "codes", "zipjax ms/token", "transformers ms/token", "speedup",
              "decode speedup", "zipjax s/image", "transformers s/image", "same tokens")
    report.print_table(header, [
        (r["model"], f"{r['lm_parameters'] / 1e6:.1f}M", f"{r['codes'][0]}x{r['codes'][1]}",
         f"{r['zipjax_ms_per_image_token']:.2f}", f"{r['transformers_ms_per_image_token']:.2f}",
         f"{r['generate_speedup']:.2f}x", f"{r['decode_speedup']:.2f}x", f"{r['zipjax_s_per_image']:.2f}",
         f"{r['transformers_s_per_image']:.2f}", f"{r['greedy_tokens_agreement']:.1%}") for r in rows])
    out = report.write_json(args.out / f"emu3_{backend}.json", {**meta, "results": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
