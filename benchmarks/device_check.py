"""One command for the few minutes a GPU or TPU is lent: every kernel compiled and timed against its reference, and a
LLaMA-2-7B-shaped model decoding, with the fraction of HBM bandwidth it reaches.

    python benchmarks/device_check.py            # on the lent machine: real shapes, about 5 minutes on an H200
    python benchmarks/device_check.py --quick    # small shapes (what the CPU runs, in interpret mode)
    python benchmarks/device_check.py --out benchmarks/results   # update the tracked results

Kernels (each against its jax.numpy reference on the same inputs, bf16; max abs error and median ms):
  flash prefill    zipjax.kernels.flash_attention, LLaMA-3-8B heads (32 / 8 KV, head_dim 128) over 8,192 tokens
  flash decode     the same kernel, batch 8, one query each, 4,096 live tokens in an 8,192-slot cache
  zipar            zipjax.kernels.zipar_attention, an Emu3 90x90 ZipAR pass with guidance (13 queries, 8,320 slots)
  quantized        the packed-code decode attention, through zipjax.generate with ZipCache(kernel=True) against
                   the jnp path of the same cache (tokens compared, decode ms/token)
  quantized multi  zipjax.kernels.quantized_multi_query, an Emu3 90x90 ZipAR pass with guidance (13 queries) over
                   88 compressed rows of 91 tokens at 4 bits (ZipCache layout), kernel=True against kernel=False
  paged dense      zipjax.kernels.paged_dense_attention (the serving engine's dense pool on a GPU) against the jnp
                   path's paged_state: 32 decode rows, then 4 prefill blocks of 64 queries, over 4,096-token tables
                   of 16-token pages, LLaMA-3-8B heads (GPU only: a TPU serves dense pages by jax's ragged kernel)
Serving: zipjax.serve's engine (on a GPU its dense pool read by the paged dense kernel, by the library's policy)
(continuous batching over the paged pool) on the same model, 16 requests of 512
prompt tokens x 64 new tokens at once, against static `zipjax.generate` at batch 16 over the same prompts (equal
work): output tok/s of each and whether the greedy tokens are equal.
Model: random LLaMA-2-7B-shaped weights in bf16 (32 layers, hidden 4096, 32 heads), batch 1 and 8, a 512-token
prompt, 64 new tokens by `generate_stream`; decode ms/token (median), tokens/s, and MBU = (weight bytes + KV bytes
read per step) / step time / the chip's peak HBM bandwidth (zipjax.aot.CHIPS).

On a CPU the same code runs end to end at small shapes (kernels interpreted), so the script stays working between
the rare device sessions. JSON goes to device_check_<device>.json under `--out` (default benchmarks/results/local/,
untracked), the table to stdout.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import report
from zipjax.kernels.common import platform as traced_platform
from zipjax.kernels.flash_attention import flash_attention
from zipjax.kernels.flash_attention import reference as flash_reference
from zipjax.kernels.paged_dense_attention import paged_dense_attention
from zipjax.kernels.quantized_attention import PackedSegment
from zipjax.kernels.quantized_multi_query import multi_query
from zipjax.kernels.zipar_attention import reference as zipar_reference
from zipjax.kernels.zipar_attention import zipar_attention

import zipjax
from zipjax import aot, kv
from zipjax.config import ModelConfig
from zipjax.kv.codec import channel_scale, grouped, pack, quantize
from zipjax.model import Model
from zipjax.serve.paged import paged_attention
from zipjax.transformer import init_params

LLAMA2_7B = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
                        dtype="bfloat16")
TINY = LLAMA2_7B.replace(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=4, head_dim=32, dtype="float32")


def median_ms(fn: Callable, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def compare(name: str, kernel: Callable, reference: Callable, args: tuple, rows_seen=None) -> dict:
    out, ref = jax.jit(kernel)(*args), jax.jit(reference)(*args)
    diff = jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))
    if rows_seen is not None:
        diff = diff[rows_seen]
    row = {"kernel": name, "max_abs_error": float(diff.max()), "kernel_ms": median_ms(jax.jit(kernel), *args),
           "reference_ms": median_ms(jax.jit(reference), *args)}
    print(f"{name:14s} error {row['max_abs_error']:.2e}  kernel {row['kernel_ms']:8.2f} ms  "
          f"reference {row['reference_ms']:8.2f} ms", flush=True)
    return row


def flash_cases(quick: bool) -> list[dict]:
    heads, kv_heads, head_dim, dtype = (8, 2, 32, jnp.float32) if quick else (32, 8, 128, jnp.bfloat16)
    prefill, slots, live = (256, 512, 300) if quick else (8192, 8192, 4096)
    keys = jax.random.split(jax.random.key(0), 3)
    rows = []
    for name, batch, q_len, cursor in (("flash prefill", 1, prefill, 0), ("flash decode", 8, 1, live)):
        q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
        k = jax.random.normal(keys[1], (batch, kv_heads, max(slots, prefill), head_dim), dtype)
        v = jax.random.normal(keys[2], k.shape, dtype)
        args = (q, k, v, jnp.int32(cursor), jnp.zeros((batch,), jnp.int32))
        rows.append(compare(name, flash_attention, flash_reference, args))
    return rows


def zipar_case(quick: bool) -> dict:
    batch, queries, heads, kv_heads, head_dim, slots = (2, 5, 8, 2, 32, 512) if quick else (2, 13, 32, 8, 128, 8320)
    dtype = jnp.float32 if quick else jnp.bfloat16
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, queries, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_heads, slots, head_dim), dtype)
    v = jax.random.normal(keys[2], k.shape, dtype)
    q_slots = jnp.broadcast_to(jnp.linspace(slots // 2, slots - 2, queries).astype(jnp.int32), (batch, queries))
    written = jnp.arange(slots)[None, :] < slots - 1
    written = jnp.broadcast_to(written, (batch, slots))
    args = (q, k, v, q_slots, written, jnp.zeros((batch,), jnp.int32))
    return compare("zipar", zipar_attention, zipar_reference, args)


def packed_segment(seed: int, batch: int, kv_heads: int, blocks: int, block: int, head_dim: int,
                   bits: int) -> PackedSegment:
    """A ZipCache-layout segment (channel-wise keys per block, token-wise values, CST scale) of random K and V,
    quantized by zipjax.kv.codec; slot s holds token s."""
    key_k, key_v = jax.random.split(jax.random.key(seed))
    shape = (batch, kv_heads, blocks, block, head_dim)
    k, v = jax.random.normal(key_k, shape), jax.random.normal(key_v, shape)
    k_codes, k_step, k_min = quantize(k, bits, axis=3)
    v_scale = channel_scale(v, axis=3)
    v_codes, v_step, v_min = quantize(grouped(v / v_scale.astype(jnp.float32), head_dim), bits, axis=-1)
    tokens = (batch, kv_heads, blocks * block)
    slots = jnp.broadcast_to(jnp.arange(blocks * block, dtype=jnp.int16), tokens)
    return PackedSegment(pack(k_codes.reshape(*tokens, head_dim), bits), k_step[:, :, :, 0], k_min[:, :, :, 0],
                         pack(v_codes.reshape(*tokens, head_dim), bits), v_step[..., 0].reshape(*tokens, 1),
                         v_min[..., 0].reshape(*tokens, 1), v_scale[:, :, :, 0], slots)


def quantized_multi_case(quick: bool) -> dict:
    batch, queries, heads, kv_heads, head_dim, blocks, block = (2, 5, 8, 2, 32, 4, 60) if quick else \
        (2, 13, 32, 8, 128, 88, 91)
    segment = packed_segment(2, batch, kv_heads, blocks, block, head_dim, bits=4)
    q = jax.random.normal(jax.random.key(3), (batch, queries, heads, head_dim), jnp.float32 if quick else jnp.bfloat16)
    length = blocks * block
    q_slots = jnp.broadcast_to(jnp.linspace(length // 2, length + 90, queries).astype(jnp.int32), (batch, queries))
    args = (q, segment, q_slots, jnp.zeros((batch,), jnp.int32))
    attend = lambda kernel: lambda *a: multi_query(*a, bits=4, block=block, kernel=kernel)[0]
    return compare("quantized multi", attend(True), attend(False), args)


def paged_dense_cases(quick: bool) -> list[dict]:
    heads, kv_heads, head_dim, dtype = (8, 2, 32, jnp.float32) if quick else (32, 8, 128, jnp.bfloat16)
    rows, width, page = (4, 8, 16) if quick else (32, 256, 16)
    keys = jax.random.split(jax.random.key(4), 3)
    kv = jax.random.normal(keys[0], (rows * width + 1, page, 2 * kv_heads, head_dim), dtype)
    table = 1 + jax.random.permutation(keys[1], rows * width).reshape(rows, width).astype(jnp.int32)
    out = []
    for name, queries in (("paged dense dec", 1), ("paged dense pre", 64)):
        n = rows if queries == 1 else 4
        last = jnp.linspace(width * page // 2, width * page - 1, n).astype(jnp.int32)
        positions = last[:, None] - jnp.arange(queries)[::-1][None]
        q = jax.random.normal(keys[2], (n, queries, heads, head_dim), dtype)
        kernel = lambda q, kv, t, p: paged_dense_attention(q, kv, t, p)[0].astype(q.dtype)
        reference = lambda q, kv, t, p: paged_attention(q, kv, t, p, None, 8)
        out.append(compare(name, kernel, reference, (q, kv, table[:n], positions)))
    return out


def decode_rate(model: Model, batch: int, prompt_len: int, new_tokens: int, method=None) -> tuple[float, np.ndarray]:
    """(median decode ms per step, the generated tokens) of generate_stream, compile excluded."""
    prompts = np.random.default_rng(batch).integers(3, model.config.vocab_size, (batch, prompt_len)).tolist()
    list(zipjax.generate_stream(model, prompts, 3, stop_tokens=(), kv=method))
    gaps, last, steps = [], None, []
    for step in zipjax.generate_stream(model, prompts, new_tokens, stop_tokens=(), kv=method):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
        steps.append(step)
    return 1e3 * statistics.median(gaps), np.stack(steps, axis=1)


def chip_for(device) -> aot.Chip | None:
    kind = device.device_kind.lower()
    names = {"h200": "h200", "h100": "h100", "v5 lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v6": "v6e"}
    return next((aot.CHIPS[chip] for key, chip in names.items() if key in kind), None)


def model_rows(quick: bool) -> list[dict]:
    config = TINY if quick else LLAMA2_7B
    model = Model(config, init_params(config, jax.random.key(0)))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    chip, prompt_len, new_tokens = chip_for(jax.devices()[0]), (64 if quick else 512), (16 if quick else 64)
    rows = []
    for batch in (1, 8):
        ms, _ = decode_rate(model, batch, prompt_len, new_tokens)
        live = prompt_len + new_tokens // 2
        kv_bytes = 2 * config.num_layers * batch * config.num_kv_heads * live * config.head_dim * 2
        mbu = None if chip is None else (weights + kv_bytes) / (ms / 1e3) / chip.hbm_bandwidth
        rows.append({"model": "llama2-7b-shape" if not quick else "tiny", "batch": batch, "ms_per_step": ms,
                     "tokens_per_s": batch * 1e3 / ms, "weight_bytes": weights, "mbu": mbu})
        print(f"model batch {batch}: {ms:.2f} ms/step, {batch * 1e3 / ms:.1f} tok/s, MBU "
              f"{'n/a' if mbu is None else f'{mbu:.2f}'}", flush=True)
    return rows


def quantized_row(quick: bool) -> dict:
    model = zipjax.load(Path(__file__).resolve().parents[1] / "checkpoints" / "stdlib-llama")
    jnp_ms, jnp_tokens = decode_rate(model, 4, 64, 24, kv.ZipCache(buffer_len=8))
    kernel_ms, kernel_tokens = decode_rate(model, 4, 64, 24, kv.ZipCache(buffer_len=8, kernel=True))
    row = {"kernel": "quantized (ZipCache 4/2)", "tokens_equal": bool((jnp_tokens == kernel_tokens).all()),
           "kernel_ms": kernel_ms, "reference_ms": jnp_ms}
    print(f"quantized      tokens equal {row['tokens_equal']}  kernel {kernel_ms:8.2f} ms/step  "
          f"jnp {jnp_ms:8.2f} ms/step", flush=True)
    return row


def serving_row(quick: bool) -> dict:
    from zipjax.serve.engine import Engine, EngineConfig
    from zipjax.serve.requests import Request, SamplingParams

    config = TINY if quick else LLAMA2_7B
    model = Model(config, init_params(config, jax.random.key(0)))
    batch, prompt_len, new_tokens = (4, 64, 16) if quick else (16, 512, 64)
    prompts = np.random.default_rng(7).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
    zipjax.generate(model, prompts, new_tokens, stop_tokens=())  # compile
    start = time.perf_counter()
    static = zipjax.generate(model, prompts, new_tokens, stop_tokens=())[:, prompt_len:]
    static_s = time.perf_counter() - start
    length = prompt_len + new_tokens
    engine = Engine(model, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=2 * 128, block_size=128,
                                        max_model_len=length, num_pages=batch * -(-length // 16) + 1))
    engine.start()
    engine.wait_ready(900)
    start = time.perf_counter()
    streams = [engine.submit(Request(str(i), tuple(p), SamplingParams(max_tokens=new_tokens, ignore_eos=True)))
               for i, p in enumerate(prompts)]
    served = np.asarray([[t for u in s for t in u.token_ids] for s in streams])
    served_s = time.perf_counter() - start
    engine.stop()
    row = {"serving": f"{batch} x ({prompt_len} + {new_tokens})", "engine_tok_s": batch * new_tokens / served_s,
           "static_tok_s": batch * new_tokens / static_s, "tokens_equal": float((served == static).mean())}
    print(f"serving        engine {row['engine_tok_s']:8.1f} tok/s  static generate {row['static_tok_s']:8.1f} "
          f"tok/s  tokens equal {row['tokens_equal']:.3f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    report.add_out_argument(parser)
    args = parser.parse_args()
    quick = args.quick or traced_platform() == "cpu"
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({traced_platform()}), jax {jax.__version__}, quick={quick}", flush=True)
    started = time.perf_counter()
    kernels = [*flash_cases(quick), zipar_case(quick), quantized_row(quick), quantized_multi_case(quick)]
    if traced_platform() in ("gpu", "cpu"):
        kernels += paged_dense_cases(quick)
    models = model_rows(quick)
    serving = serving_row(quick)
    name = device.device_kind.lower().replace(" ", "-")
    out = report.write_json(args.out / f"device_check_{name}.json", {
        "device": device.device_kind, "platform": traced_platform(), "jax": jax.__version__,
        "python": platform.python_version(), "quick": quick, "kernels": kernels, "model": models,
        "serving": serving,
        "seconds": time.perf_counter() - started})
    print(f"wrote {out} after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
