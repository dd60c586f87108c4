"""ME-Switch on real experts: bytes, quality, routing and serving speed of compressed expert deltas.

    python checkpoints/train_experts.py --model smollm2   # once: three SmolLM2-135M experts into ~/.cache/zipjax
    python benchmarks/experts.py                          # both models (about 20 minutes on 2 CPU cores)
    python benchmarks/experts.py --models stdlib --skip-speed
    python benchmarks/experts.py --out benchmarks/results   # update the tracked results

Experts: three full fine-tunes per base (prose / C / test code, zipjax.experts.domains) made by
checkpoints/train_experts.py: the shipped stdlib-llama fixture (checkpoints/stdlib-experts) and SmolLM2-135M-Instruct
(real trained weights, cached). The "full expert" is base + its float16 delta.

Measured, per model:
  bytes       bytes per expert of the compressed delta (zipjax.experts.ExpertBank.nbytes: codes, float16 step and
              minimum per output channel, int32 salient indices, float16 salient rows, float32 norm deltas, the
              embedding at 4 bits) at 1/2/3 bits with and without 2% salient channels, against a full float16
              expert; and the paper's way: N experts as N full float16 models vs one base + N deltas.
  quality     held-out perplexity on each expert's own domain: base, full expert, compressed variants (plain,
              magnitude-salient, error-salient, 1-bit BitDelta-like = sign x per-column mean|delta|).
  routing     router (zipjax.experts.router), oracle, perplexity routing and random, on held-out windows routed by
              their first 64 tokens, perplexity of the chosen (2-bit error-salient) expert on the rest.
  speed       tokens/s of one mixed batch (two prompts per expert) served at once by attach(..., path=) against
              switching whole experts in and out: per expert, `jax.device_put` of its weights (a full float32
              expert from host memory, or its compressed delta then W_base + delta built on the device), then
              that expert's prompts; all in the same run, greedy, same prompts.
  capacity    how many Mistral-7B-shaped experts fit on an 80 GB and a 16 GB chip beside one float16 base, from
              the same byte accounting (weights only: no KV cache, no activations), checked against the real bank.

Writes experts_<backend>.json and experts_<backend>.png under `--out` (default benchmarks/results/local/, untracked);
prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import zipjax  # isort: skip  (first: it picks the platform before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np
import report

from zipjax import experts
from zipjax.config import ModelConfig
from zipjax.harness import finetune
from zipjax.harness import router_training as routing
from zipjax.harness import text_domains as domains
from zipjax.transformer import param_count

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = domains.DOMAINS
# label -> compress settings; the 2-bit error-salient bank is the one served and routed
VARIANTS = {
    "2-bit plain": dict(bits=2, salient=0.0, score="none"),
    "2-bit magnitude-salient 2%": dict(bits=2, salient=0.02, score="magnitude"),
    "2-bit error-salient 2%": dict(bits=2, salient=0.02, score="error"),
    "1-bit BitDelta-like": dict(bits=1, salient=0.0, score="none"),
    "1-bit error-salient 2%": dict(bits=1, salient=0.02, score="error"),
    "3-bit plain": dict(bits=3, salient=0.0, score="none"),
    "3-bit error-salient 2%": dict(bits=3, salient=0.02, score="error"),
}
SERVED = "2-bit error-salient 2%"
QUICK = ("2-bit plain", "2-bit magnitude-salient 2%", SERVED, "1-bit BitDelta-like")
MISTRAL_7B = ModelConfig(architecture="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
                         pad_token_id=None, dtype="bfloat16")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- byte accounting

def site_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[in, out] of every compressed site (zipjax.experts.bank.sites), from the config alone."""
    e, h, kv, d, m = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.intermediate_size)
    per_layer = {"q": (e, h * d), "k": (e, kv * d), "v": (e, kv * d), "o": (h * d, e), "gate": (e, m), "up": (e, m),
                 "down": (m, e)}
    out = {f"layer_{i}/{n}": s for i in range(config.num_layers) for n, s in per_layer.items()}
    out["embed"] = (e, config.vocab_size)
    if not config.tie_word_embeddings:
        out["lm_head"] = (e, config.vocab_size)
    return out


def delta_bytes(config: ModelConfig, bits: int, salient: float, embed_bits: int = 4) -> dict[str, int]:
    """Bytes of one expert's compressed delta, as ExpertBank.nbytes counts them (codes, fp16 step + minimum per
    output channel, int32 indices and fp16 rows of the k = round(salient * in) salient input channels, none for the
    embedding; float32 norm deltas)."""
    out = {"linears": 0, "embedding": 0}
    for name, (n_in, n_out) in site_shapes(config).items():
        b = embed_bits if name in ("embed", "lm_head") else bits
        k = 0 if name == "embed" else round(salient * n_in)
        size = n_in * n_out * b // 8 + 2 * n_out * 2 + k * 4 + k * n_out * 2
        out["embedding" if name in ("embed", "lm_head") else "linears"] += size
    out["norms"] = (2 * config.num_layers + 1) * config.hidden_size * 4
    out["total"] = out["linears"] + out["embedding"] + out["norms"]
    return out


def model_params(config: ModelConfig) -> int:
    e, h, kv, d, m = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.intermediate_size)
    layer = e * (h + 2 * kv) * d + h * d * e + 3 * e * m + 2 * e
    return config.num_layers * layer + config.vocab_size * e * (1 if config.tie_word_embeddings else 2) + e


def byte_table(config: ModelConfig, n_experts: int = 3) -> list[dict]:
    full = model_params(config) * 2  # a full float16 expert = a float16 copy of the model
    rows = []
    for bits in (1, 2, 3):
        for salient in (0.0, 0.02):
            b = delta_bytes(config, bits, salient)
            rows.append({"bits": bits, "salient": salient, "bytes_per_expert": b["total"],
                         "bytes_per_expert_without_embedding": b["total"] - b["embedding"],
                         "full_expert_bytes": full, "compression_vs_full_expert": round(full / b["total"], 2),
                         f"paper_ratio_{n_experts}_experts":
                             round(n_experts * full / (full + n_experts * b["total"]), 3)})
    return rows


def capacity(config: ModelConfig, memory_gb: float) -> dict:
    """Experts that fit beside one float16 base in `memory_gb` GB (1e9 bytes), weights only."""
    base = model_params(config) * 2
    free = memory_gb * 1e9 - base
    out = {"memory_gb": memory_gb, "base_gb": round(base / 1e9, 2),
           "full_fp16_models": int(memory_gb * 1e9 // base)}
    for bits in (1, 2, 3):
        for salient in (0.0, 0.02):
            per = delta_bytes(config, bits, salient)["total"]
            out[f"{bits}-bit{' +2% salient' if salient else ''}"] = {"experts": max(0, int(free // per)),
                                                                     "gb_per_expert": round(per / 1e9, 3)}
    return out


# ---------------------------------------------------------------- models and quality

def load_model(which: str) -> tuple[zipjax.Model, Path]:
    if which == "stdlib":
        return zipjax.load(ROOT / "checkpoints" / "stdlib-llama"), ROOT / "checkpoints" / "stdlib-experts"
    from zipjax.convert.smollm2 import cache_dir, fetch_and_convert

    return zipjax.load(fetch_and_convert(progress=False)), cache_dir() / "experts" / "smollm2"


def calibration(base: zipjax.Model) -> dict[str, np.ndarray]:
    """8 training windows of 256 tokens per domain (as checkpoints/train_experts.py gives compress)."""
    return {d: domains.windows(domains.domain_stream(base, d, "train", 200_000), 256, 8)[:, :-1] for d in DOMAINS}


def merged(base: zipjax.Model, bank) -> dict[str, zipjax.Model]:
    merge = jax.jit(lambda p, b, i: b.merged_params(p, base.config, i))
    return {name: dataclasses.replace(base, params=merge(base.params, bank, jnp.int32(i)))
            for i, name in enumerate(bank.names)}


def own_domain_ppl(models: dict[str, zipjax.Model], heldout: dict[str, np.ndarray]) -> dict[str, float]:
    return {d: round(finetune.perplexity(models[d].params, models[d].config, heldout[d]), 4) for d in DOMAINS}


# ---------------------------------------------------------------- speed

def timed(fn, repeats: int = 2) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def speed(base: zipjax.Model, bank, full: dict[str, zipjax.Model], heldout: dict[str, np.ndarray],
          prompt_len: int, new_tokens: int, per_expert: int = 2) -> dict:
    names = list(bank.names)
    prompts = [heldout[d][i, :prompt_len].tolist() for d in names for i in range(per_expert)]
    expert_of = [d for d in names for _ in range(per_expert)]
    batch = len(prompts)
    tokens = batch * new_tokens
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "stop_tokens": "none"}
    gen = lambda model, ps, **kw: zipjax.generate(model, ps, new_tokens, stop_tokens=(), **kw)

    out["base only, one batch"] = timed(lambda: gen(base, prompts))
    for mode in ("dense", "grouped"):
        model = experts.attach(base, bank, kernel=False, path=mode)  # results keep their delta_mode= keys
        out[f"mixed batch, delta_mode={mode}"] = timed(lambda model=model: gen(model, prompts, expert=expert_of))
        log(f"  {mode}: {tokens / out[f'mixed batch, delta_mode={mode}']:.1f} tokens/s")

    host_full = {d: jax.tree.map(np.asarray, full[d].params) for d in names}
    host_bank = jax.tree.map(np.asarray, bank)
    merge = jax.jit(lambda p, b, i: b.merged_params(p, base.config, i))

    def switch_full():
        result = None
        for j, d in enumerate(names):
            params = jax.device_put(host_full[d])
            model = dataclasses.replace(base, params=params)
            result = gen(model, prompts[j * per_expert:(j + 1) * per_expert])
        return result

    def switch_delta():
        result = None
        for j, d in enumerate(names):
            one = jax.tree.map(lambda x, j=j: x[j:j + 1], host_bank)
            one = jax.device_put(dataclasses.replace(one, names=(d,)) if dataclasses.is_dataclass(one) else one)
            model = dataclasses.replace(base, params=merge(base.params, one, jnp.int32(0)))
            result = gen(model, prompts[j * per_expert:(j + 1) * per_expert])
        return result

    out["switching experts, device_put full weights"] = timed(switch_full)
    out["switching experts, device_put delta + merge"] = timed(switch_delta)
    out["device_put one full expert (s)"] = timed(lambda: jax.device_put(host_full[names[0]]), repeats=3)
    out["device_put one compressed delta (s)"] = timed(
        lambda: jax.device_put(jax.tree.map(lambda x: x[:1], host_bank)), repeats=3)
    out["tokens_per_s"] = {k: round(tokens / v, 2) for k, v in out.items()
                           if isinstance(v, float) and not k.startswith("device_put")}
    return out


# ---------------------------------------------------------------- one model

def run_model(which: str, args, result: dict, save) -> dict:
    """Fill `result` phase by phase, calling save() after each (a long run keeps what it measured)."""
    t0 = time.time()
    base, folder = load_model(which)
    if not (folder / "experts.json").is_file():
        raise SystemExit(f"no experts in {folder}: run checkpoints/train_experts.py"
                         f"{'' if which == 'stdlib' else ' --model ' + which} first")
    full = finetune.load_experts(folder, base)
    with np.load(folder / "heldout.npz") as data:
        heldout = {d: data[d][:args.windows] for d in DOMAINS}
    log(f"[{which}] {param_count(base.params) / 1e6:.1f}M parameters, {len(full)} experts, "
        f"{len(heldout['prose'])} held-out windows per domain ({time.time() - t0:.0f}s)")
    result.update({"model": which, "parameters": param_count(base.params), "experts": list(full),
                   "heldout_windows": {d: list(w.shape) for d, w in heldout.items()},
                   "bytes": byte_table(base.config)})
    if args.speed_only:  # keep the quality and routing numbers of the earlier run in the JSON
        bank = experts.compress(base, {d: full[d].params for d in DOMAINS}, calibration=calibration(base),
                                **VARIANTS[SERVED])
        log("  speed (mixed batch vs switching experts)")
        result["speed"] = speed(base, bank, full, heldout, args.prompt_len, args.new_tokens)
        save()
        return result
    result.update({"quality": {}, "measured_bytes": {}})

    quality = result["quality"]
    quality["base"] = {d: round(finetune.perplexity(base.params, base.config, heldout[d]), 4) for d in DOMAINS}
    quality["full expert"] = own_domain_ppl(full, heldout)
    log(f"  base {quality['base']}\n  full {quality['full expert']}")
    calib = calibration(base)
    banks, measured_bytes = {}, result["measured_bytes"]
    variants = VARIANTS if which == "stdlib" or not args.quick else {k: VARIANTS[k] for k in QUICK}
    for label, settings in variants.items():
        start = time.time()
        bank = experts.compress(base, {d: full[d].params for d in DOMAINS}, calibration=calib, **settings)
        seconds = time.time() - start
        quality[label] = own_domain_ppl(merged(base, bank), heldout)
        nbytes = bank.nbytes()
        predicted = delta_bytes(base.config, settings["bits"], settings["salient"])["total"]
        measured_bytes[label] = {"per_expert": nbytes["per_expert"], "accounting": predicted,
                                 "embedding_per_expert": nbytes["embedding"] // bank.num_experts,
                                 "compress_seconds": round(seconds, 1)}
        log(f"  {label}: {quality[label]}  {nbytes['per_expert'] / 1e6:.2f} MB/expert ({seconds:.0f}s)")
        save()
        if label == SERVED:
            banks[label] = bank
        else:
            del bank

    bank = banks[SERVED]
    if args.quick and which != "stdlib":  # E x 3 forwards of every window: take the training script's run
        if (folder / "metrics.json").is_file():
            result["routing"] = json.loads((folder / "metrics.json").read_text())["routing"]
            result["routing"]["experts"] = "full (from checkpoints/train_experts.py's metrics.json)"
    else:
        router = routing.Router.load(folder, base)
        result["routing"] = routing.compare_routing(base, router, merged(base, bank), heldout, prefix=64)
        result["routing"]["experts"] = SERVED
    save()
    for method, r in result.get("routing", {}).get("methods", {}).items():
        log(f"  routing {method}: accuracy {r['accuracy']:.3f} {r['perplexity']}")

    if not args.skip_speed:
        log("  speed (mixed batch vs switching experts)")
        result["speed"] = speed(base, bank, full, heldout, args.prompt_len, args.new_tokens)
    result["seconds"] = round(time.time() - t0, 1)
    save()
    return result


# ---------------------------------------------------------------- report

def print_tables(results: dict) -> None:
    for which, r in results["models"].items():
        if "bytes" not in r:
            continue
        report.print_table(
            ("bits", "salient", "MB per expert", "x smaller than a full expert",
             "3 experts: full models / (base + deltas)"),
            [(b["bits"], f"{b['salient']:.0%}", f"{b['bytes_per_expert'] / 1e6:.2f}",
              f"{b['compression_vs_full_expert']:.1f}", f"{b['paper_ratio_3_experts']:.2f}x") for b in r["bytes"]],
            title=f"## {which}: bytes per expert (full float16 expert "
                  f"{r['bytes'][0]['full_expert_bytes'] / 1e6:.1f} MB)")
        report.print_table(("variant", *DOMAINS), [(label, *(f"{q[d]:.3f}" for d in DOMAINS))
                                                   for label, q in r["quality"].items()],
                           title=f"## {which}: held-out perplexity on each expert's own domain")
        if "routing" in r:
            report.print_table(
                ("router", "accuracy", *DOMAINS),
                [(method, f"{m['accuracy']:.3f}", *(f"{m['perplexity'][d]:.3f}" for d in DOMAINS))
                 for method, m in r["routing"]["methods"].items()],
                title=f"## {which}: routing (first {r['routing']['prefix']} tokens; perplexity on the rest with "
                      f"{r['routing'].get('experts', SERVED)} experts)")
        if "speed" in r:
            s = r["speed"]
            report.print_table(("how", "tokens/s"), [(k, f"{v:.1f}") for k, v in s["tokens_per_s"].items()],
                               title=f"## {which}: serving {s['batch']} prompts ({s['prompt_len']} tokens, "
                                     f"{s['new_tokens']} new each)")
    print("\n## Mistral-7B-shaped experts beside one float16 base (weights only)")
    for c in results["capacity"]:
        parts = ", ".join(f"{k} {v['experts']} ({v['gb_per_expert']:.2f} GB each)" for k, v in c.items()
                          if isinstance(v, dict))
        print(f"- {c['memory_gb']:.0f} GB: full float16 models {c['full_fp16_models']}; {parts}")


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, which in zip(axes[0], models, strict=True):
        r = results["models"][which]
        if not r.get("measured_bytes"):
            continue
        base_q = r["quality"]["base"]
        for label, mb in r["measured_bytes"].items():
            rel = np.mean([r["quality"][label][d] / r["quality"]["full expert"][d] for d in DOMAINS])
            ax.scatter(mb["per_expert"] / 1e6, rel, label=label)
        full_mb = r["bytes"][0]["full_expert_bytes"] / 1e6
        ax.scatter(full_mb, 1.0, marker="*", s=150, color="k", label="full float16 expert")
        rel_base = np.mean([base_q[d] / r["quality"]["full expert"][d] for d in DOMAINS])
        ax.axhline(rel_base, color="gray", linestyle="--", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("MB per expert")
        ax.set_ylabel("own-domain perplexity / full expert's (mean of 3)")
        ax.set_title(f"{which}: size vs quality")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.save_plot(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="stdlib,smollm2")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows per domain")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="SmolLM2: only the 4 compressed variants of the issue, routing from the training run")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed phase (with --keep-others: the rest stays from the earlier run)")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the results of models not run now from the existing JSON")
    report.add_out_argument(parser)
    args = parser.parse_args()
    start = time.time()
    results = {"backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
               "machine": f"{platform.machine()}, {jax.device_count()} device(s) {jax.devices()[0].device_kind}",
               "models": {}}
    out = args.out / f"experts_{results['backend']}.json"
    if args.keep_others:  # keep the other models' results of an earlier run
        results["models"] = report.previous_results(out)[0].get("models", {})
    results["capacity"] = [capacity(MISTRAL_7B, gb) for gb in (80, 16)]
    results["mistral_7b"] = {"parameters": model_params(MISTRAL_7B), "bytes": byte_table(MISTRAL_7B)}

    def save() -> None:
        results["seconds"] = round(time.time() - start, 1)
        report.write_json(out, results)

    for which in args.models.split(","):
        results["models"][which] = results["models"].get(which, {}) if args.speed_only else {}
        run_model(which, args, results["models"][which], save)
    save()
    plot(results, args.out / f"experts_{results['backend']}.png")
    print_tables(results)
    print(f"\nwrote {out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
