"""Decode throughput of `zipjax.generate` against transformers' `generate` on the very same weights and prompts.

    python benchmarks/generate.py                       # both models, batch 1 and 8, 128 new tokens
    python benchmarks/generate.py --models stdlib-llama --batch-sizes 1
    python benchmarks/generate.py --out benchmarks/results   # update the tracked results

Models: the shipped checkpoints/stdlib-llama (exported to a Hugging Face folder for transformers), and a random
~100M-parameter LLaMA (GQA 12/4, created with transformers and converted with `zipjax convert`). Both run greedy,
float32, with left-padded prompts of different lengths and no stop tokens, so both libraries produce exactly
`new_tokens` tokens per sequence; the generated tokens are compared too. Each side is warmed up first; zipjax's
first call (which compiles) is timed separately and the compile time reported as first call minus a warm call.
Tokens/s counts generated tokens only (batch x new_tokens / wall time, prefill included). The table is printed and
the JSON written to generate_<backend>.json under `--out` (default benchmarks/results/local/, untracked).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import report
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from zipjax.convert import convert
from zipjax.convert.export import export_hf

import zipjax

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints" / "stdlib-llama"

LLAMA_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)

STDLIB_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "    for key, value in sorted(mapping.items()):\n",
    "def read_lines(path, encoding='utf-8'):\n    with open(path",
    "# Copyright (c) 2001 Python Software Foundation\n\"\"\"Utilities for",
    "        if not isinstance(other, Fraction):\n            return",
    "def _check_arg(name, value):\n    if value is None:\n        raise",
]


def prepare(name: str, workdir: Path) -> tuple[zipjax.Model, torch.nn.Module, list[list[int]]]:
    """(zipjax model, transformers model with the same weights, prompt token lists) for one benchmark model."""
    if name == "stdlib-llama":
        if not (SHIPPED / "zipjax.json").is_file():
            sys.exit(f"error: the shipped checkpoint is missing at {SHIPPED}")
        model = zipjax.load(SHIPPED)
        hf_dir = export_hf(SHIPPED, workdir / "stdlib-llama-hf", progress=False)
        prompts = [model.tokenizer.encode(p) for p in STDLIB_PROMPTS]
    elif name == "llama-100m":
        torch.manual_seed(0)
        hf_dir = workdir / "llama-100m-hf"
        LlamaForCausalLM(LlamaConfig(**LLAMA_100M)).save_pretrained(hf_dir)
        model = zipjax.load(convert(hf_dir, workdir / "llama-100m-zj", progress=False))
        rng = np.random.RandomState(0)
        prompts = [rng.randint(3, LLAMA_100M["vocab_size"], n).tolist() for n in (24, 40, 17, 33, 48, 29, 12, 36)]
    else:
        sys.exit(f"error: unknown model {name!r}; choose from stdlib-llama, llama-100m")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, hf, prompts


def hf_generate(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int) -> np.ndarray:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id).numpy()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_case(model, hf, prompts, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    pad = model.config.pad_id

    def ours():
        return zipjax.generate(model, prompts, new_tokens, stop_tokens=())

    start = time.perf_counter()
    ours()
    first_call = time.perf_counter() - start
    zj_time, zj_tokens = timed(ours, repeats)

    hf_generate(hf, prompts, 4, pad)  # warm-up
    hf_time, hf_tokens = timed(lambda: hf_generate(hf, prompts, new_tokens, pad), repeats)

    generated = batch * new_tokens
    same = zj_tokens[:, -new_tokens:] == hf_tokens[:, -new_tokens:]
    return {
        "batch": batch, "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts],
        "zipjax_s": round(zj_time, 4), "transformers_s": round(hf_time, 4),
        "zipjax_tok_s": round(generated / zj_time, 1), "transformers_tok_s": round(generated / hf_time, 1),
        "speedup": round(hf_time / zj_time, 2),
        "zipjax_first_call_s": round(first_call, 3), "zipjax_compile_s": round(max(first_call - zj_time, 0.0), 3),
        "greedy_tokens_identical": bool(same.all()), "greedy_tokens_agreement": round(float(same.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["stdlib-llama", "llama-100m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    report.add_out_argument(parser)
    args = parser.parse_args()

    backend = jax.default_backend()
    device = jax.devices()[0]
    meta = {
        "benchmark": "benchmarks/generate.py", "backend": backend,
        "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "baseline": "transformers generate (greedy, float32, same weights and prompts)",
        "dtype": "float32",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[{name}] preparing", flush=True)
            model, hf, prompts = prepare(name, Path(tmp))
            params = zipjax.transformer.param_count(model.params)
            for batch in args.batch_sizes:
                print(f"[{name}] batch {batch}: {args.new_tokens} new tokens x {args.repeats} repeats", flush=True)
                row = {"model": name, "parameters": params,
                       **run_case(model, hf, prompts, batch, args.new_tokens, args.repeats)}
                rows.append(row)
                print(f"[{name}] batch {batch}: zipjax {row['zipjax_tok_s']:.0f} tok/s, transformers "
                      f"{row['transformers_tok_s']:.0f} tok/s, {row['speedup']:.2f}x", flush=True)

    header = ("model", "params", "batch", "zipjax tok/s", "transformers tok/s", "speedup", "compile s", "same tokens")
    report.print_table(header, [
        (r["model"], f"{r['parameters'] / 1e6:.1f}M", r["batch"], f"{r['zipjax_tok_s']:.0f}",
         f"{r['transformers_tok_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['zipjax_compile_s']:.1f}",
         f"{r['greedy_tokens_agreement']:.1%}") for r in rows])
    out = report.write_json(args.out / f"generate_{backend}.json", {**meta, "results": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
