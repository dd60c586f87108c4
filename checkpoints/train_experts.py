"""Re-create the ME-Switch expert fixtures: three domain experts fully fine-tuned from one base, offline.

    python checkpoints/train_experts.py                  # checkpoints/stdlib-experts (about 25 minutes, 2 cores)
    python checkpoints/train_experts.py --model smollm2  # ~/.cache/zipjax/experts/smollm2 (benchmark; not committed)

No family of fine-tunes ships offline, so zipjax makes its own (zipjax.harness.text_domains): a `prose` expert on the
pydoc topics, a `c` expert on the CPython headers, a `tests` expert on the standard library's test package. Each is a
full fine-tune of the base (zipjax.harness.finetune, optax AdamW, the tied embedding frozen so the delta covers the
transformer blocks and norms only) from the same seed; everything below is deterministic given the interpreter's
files.

Written to the output folder:
- ``experts.json`` + ``<domain>.npz``: each expert as float16 deltas from the base, with the base's fingerprint (the
  reference "full expert" is base + this delta);
- ``heldout.npz``: the held-out evaluation windows per domain (so tests need neither the interpreter's files nor
  the tokenizer run);
- ``router.json`` + ``router.npz``: the expert="auto" router (zipjax.harness.router_training) trained on
  training windows;
- ``bank/``: the compressed bank (zipjax.experts.compress, 2 bits, 2% salient input channels, activation-error
  saliency on training windows) when that API is importable;
- ``metrics.json`` and ``README.md``: held-out perplexity of the base, each expert and the compressed experts on
  every domain, routing accuracy, sizes, timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import zipjax  # isort: skip  (first: it picks the platform before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np

from zipjax.experts.fingerprint import fingerprint
from zipjax.harness import finetune
from zipjax.harness import router_training as routing
from zipjax.harness import text_domains as domains

HERE = Path(__file__).parent
PRESETS = {
    # 3.1M-parameter shipped default; long enough that the experts move far from the base (see README)
    "stdlib": dict(steps=100, batch=8, seq=256, lr=1e-3, eval_windows=32, eval_seq=256, router_windows=96,
                   train_chars=3_000_000,
                   # the base was trained on the stdlib's .py files, test/ included: at lr 1e-3 the tests expert
                   # only forgets (held-out 42.4 -> 44.1); a fifth of it specializes instead
                   lr_scale={"tests": 0.2}),
    # SmolLM2-135M-Instruct: short (about 8 minutes per expert on 2 busy cores), a large lr to move far
    "smollm2": dict(steps=20, batch=4, seq=128, lr=5e-4, eval_windows=16, eval_seq=256, router_windows=48,
                    train_chars=1_000_000),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def load_base(which: str) -> zipjax.Model:
    if which == "stdlib":
        return zipjax.load(HERE / "stdlib-llama")
    from zipjax.convert.smollm2 import fetch_and_convert

    return zipjax.load(fetch_and_convert(progress=False))


def default_out(which: str) -> Path:
    if which == "stdlib":
        return HERE / "stdlib-experts"
    from zipjax.convert.smollm2 import cache_dir

    return cache_dir() / "experts" / "smollm2"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def compress_bank(base, experts: dict, calibration: dict[str, np.ndarray], out: Path) -> dict | None:
    """A's compressed bank (2 bits, 2% salient, error saliency), saved to out/bank, if zipjax.experts has it."""
    try:
        from zipjax import experts as api

        compress = api.compress
    except (ImportError, AttributeError) as e:
        log(f"compressed bank skipped: zipjax.experts.compress is not available ({e})")
        return None
    start = time.time()
    bank = compress(base, experts, bits=2, salient=0.02, calibration=calibration)
    bank.save(out / "bank", overwrite=True)
    log(f"compressed bank: {folder_bytes(out / 'bank') / 1e6:.2f} MB in {time.time() - start:.0f}s")
    return {"bits": 2, "salient": 0.02, "bytes": folder_bytes(out / "bank"),
            "seconds": round(time.time() - start, 1), "bank": bank}


def compressed_perplexity(base, bank, heldout: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out perplexity of each compressed expert (W_base + dequantized delta) on its own domain."""
    merge = jax.jit(lambda p, b, i: b.merged_params(p, base.config, i))
    out = {}
    for i, name in enumerate(bank.names):
        params = merge(base.params, bank, jnp.int32(i))
        out[name] = round(finetune.perplexity(params, base.config, heldout[name]), 4)
    log("  compressed (2-bit) on own domain: " + "  ".join(f"{d} {v:.2f}" for d, v in out.items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="stdlib")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the deltas already in --out; redo evaluation, router and bank")
    parser.add_argument("--only", nargs="+", choices=domains.DOMAINS, default=None,
                        help="train only these experts, keeping the others' deltas in --out")
    args = parser.parse_args()
    preset = dict(PRESETS[args.model])
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.lr is not None:
        preset["lr"] = args.lr
    out = args.out or default_out(args.model)
    t_start = time.time()

    base = load_base(args.model)
    cfg = base.config
    log(f"base {args.model}: fingerprint {fingerprint(base.params)[:16]}..., out {out}")
    streams, heldout = {}, {}
    for d in domains.DOMAINS:
        streams[d] = domains.domain_stream(base, d, "train", preset["train_chars"])
        heldout[d] = domains.windows(domains.domain_stream(base, d, "heldout"), preset["eval_seq"],
                                     preset["eval_windows"])
        log(f"domain {d}: {len(streams[d]):,} training tokens, {len(heldout[d])} held-out windows of "
            f"{preset['eval_seq']} ({time.time() - t_start:.0f}s)")

    info: dict[str, dict] = {}
    experts_params: dict = {}
    kept = [d for d in domains.DOMAINS if d not in (args.only or domains.DOMAINS)] if not args.reuse else \
        list(domains.DOMAINS)
    if kept:  # deltas already in `out` that this run keeps
        manifest = finetune.read_manifest(out)
        for name, model in finetune.load_experts(out, base, kept).items():
            experts_params[name] = model.params
            info[name] = {k: v for k, v in manifest["experts"][name].items() if k not in ("file", "parameters")}
    if len(kept) < len(domains.DOMAINS):
        for i, d in enumerate(domains.DOMAINS):
            if d in kept:
                continue
            lr = preset["lr"] * preset.get("lr_scale", {}).get(d, 1.0)
            log(f"fine-tuning the {d} expert ({preset['steps']} steps of {preset['batch']} x {preset['seq']}, "
                f"lr {lr:g})")
            params, record = finetune.finetune(
                base.params, cfg, streams[d], steps=preset["steps"], batch=preset["batch"], seq=preset["seq"],
                lr=lr, seed=args.seed + i, log=log)
            experts_params[d] = params
            info[d] = {"domain": d, "source": domains.DESCRIPTIONS[d], "train_tokens": len(streams[d]), **record}
        experts_params = {d: experts_params[d] for d in domains.DOMAINS}
        info = {d: info[d] for d in domains.DOMAINS}
        out.mkdir(parents=True, exist_ok=True)
        finetune.save_deltas(out, base, experts_params, info)
    experts = finetune.load_experts(out, base)  # the reference: base + the float16 delta as stored
    np.savez(out / "heldout.npz", **{d: w.astype(np.int32) for d, w in heldout.items()})

    log("held-out perplexity (rows: model, columns: domain)")
    table = {"base": {d: finetune.perplexity(base.params, cfg, heldout[d]) for d in domains.DOMAINS}}
    for name, m in experts.items():
        table[name] = {d: finetune.perplexity(m.params, cfg, heldout[d]) for d in domains.DOMAINS}
    for row, vals in table.items():
        log(f"  {row:>6}: " + "  ".join(f"{d} {v:8.2f}" for d, v in vals.items()))

    log("router")
    train_windows = {d: domains.windows(streams[d], preset["eval_seq"], preset["router_windows"]) for d in streams}
    router = routing.train_router(base, train_windows, log=log)
    router.save(out)
    routed = routing.compare_routing(base, router, experts, heldout, prefix=64, seed=args.seed)
    for method, r in routed["methods"].items():
        log(f"  {method:>10}: accuracy {r['accuracy']:.3f}  perplexity " +
            "  ".join(f"{d} {v:.2f}" for d, v in r["perplexity"].items()))

    calibration = {d: train_windows[d][:8, :-1] for d in domains.DOMAINS}
    bank = compress_bank(base, experts_params, calibration, out)
    compressed = None
    if bank is not None:
        compressed = compressed_perplexity(base, bank.pop("bank"), heldout)

    metrics = {
        "model": args.model, "base_fingerprint": fingerprint(base.params), "python": platform.python_version(),
        "jax": jax.__version__, "preset": preset, "seed": args.seed, "experts": info,
        "heldout_windows": {d: list(w.shape) for d, w in heldout.items()},
        "heldout_perplexity": {r: {d: round(v, 4) for d, v in vals.items()} for r, vals in table.items()},
        "compressed_perplexity": compressed, "bank": bank, "routing": routed, "router": router.record,
        "delta_bytes": {d: (out / f"{d}.npz").stat().st_size for d in domains.DOMAINS},
        "minutes": round((time.time() - t_start) / 60, 1),
    }
    metrics["folder_bytes"] = folder_bytes(out) + 8192  # README and metrics written next
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(readme(metrics))
    log(f"wrote {out} ({folder_bytes(out) / 1e6:.1f} MB, {time.time() - t_start:.0f}s in all)")


def readme(m: dict) -> str:
    ppl = m["heldout_perplexity"]
    rows = "\n".join(f"| {r} | " + " | ".join(f"{ppl[r][d]:.2f}" for d in domains.DOMAINS) + " |" for r in ppl)
    routing_rows = "\n".join(f"| {k} | {v['accuracy']:.3f} | " + " | ".join(f"{v['perplexity'][d]:.2f}"
                                                                          for d in domains.DOMAINS) + " |"
                             for k, v in m["routing"]["methods"].items())
    p = m["preset"]
    train = ", ".join(f"{d} lr {e['lr']:g}, {e['seconds'] / 60:.1f} min" for d, e in m["experts"].items())
    gain = {d: ppl["base"][d] / ppl[d][d] for d in domains.DOMAINS}
    comp = m.get("compressed_perplexity") or {}
    comp_line = "" if not comp else (
        "\n2-bit compressed experts (2% error-salient input channels, `bank/`) on their own domain: "
        + ", ".join(f"{d} {comp[d]:.2f} ({comp[d] / ppl[d][d] - 1:+.1%} vs full)" for d in comp) + ".\n")
    return f"""# {m['model']} experts (ME-Switch fixture)

Three experts fully fine-tuned from the {m['model']} base (fingerprint `{m['base_fingerprint'][:16]}...`), one per
offline domain (zipjax.harness.text_domains), stored as float16 deltas from the base. Re-create with
`python checkpoints/train_experts.py{'' if m['model'] == 'stdlib' else ' --model ' + m['model']}`
(Python {m['python']}, jax {m['jax']}).

Training per expert: {p['steps']} AdamW steps of {p['batch']} x {p['seq']} tokens (warmup, cosine to lr/10), weight
decay 0.01, the tied embedding frozen (its delta is zero and not stored); {train} on 2 busy CPU cores. The base
was trained on the standard library's .py files, its test/ package included, so the tests expert has little to
learn: at lr 1e-3 it only forgot (42.44 -> 44.05); at a fifth of it, it barely improves.

Held-out perplexity per token ({m['heldout_windows']['prose'][0]} windows of {p['eval_seq']} tokens per domain, from
documents never trained on; rows: model, columns: domain). Each expert improves its own domain by
{', '.join(f"{d} {g:.2f}x" for d, g in gain.items())}:

| model | {' | '.join(domains.DOMAINS)} |
|---|{'---|' * len(domains.DOMAINS)}
{rows}
{comp_line}
Routing held-out windows by their first {m['routing']['prefix']} tokens (perplexity of the chosen expert on the
remaining {m['routing']['scored_tokens_per_window']} tokens):

| router | accuracy | {' | '.join(domains.DOMAINS)} |
|---|---|{'---|' * len(domains.DOMAINS)}
{routing_rows}

Files: `experts.json` (manifest, base fingerprint), `<domain>.npz` (float16 deltas), `heldout.npz` (evaluation
windows), `router.json`/`router.npz`, `bank/` (compressed experts, if present), `metrics.json` (everything above).
"""


if __name__ == "__main__":
    sys.exit(main())
