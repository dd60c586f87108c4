"""The pod benchmark: LLaMA-3-8B, LLaMA-3-70B, Mistral-7B and Emu3-Gen on TPU pods, compiled ahead of time with
libtpu for real topologies (nothing runs), and measured on whatever devices this process has.

    python -m benchmarks.pod                   # compiled predictions (about 40 min on 2 CPU cores) + measured
    python -m benchmarks.pod --quick           # a small grid in about a minute (CI, tests)
    python -m benchmarks.pod --measure-only    # only the measured part, on this process's devices
    python -m benchmarks.pod --profile DIR     # also write a jax.profiler trace of the measured part
    python -m benchmarks.pod --out benchmarks/results   # update the tracked results (default: results/local/)

(`python benchmarks/pod` runs the same from anywhere.)

Why: the value of a sharding rule or of KV compression at pod scale (how many sequences fit a chip, what a decode step
costs) is decided by the compiler's memory plan and the roofline, which need no pod to obtain: `zipjax.aot` compiles
the library's own programs (one decode step `Transformer.apply` on the cache, and the prefill `prompt_pass`) for the
described chips, with the library's logical-axis shardings. Per chip it records memory (arguments, temporaries,
outputs not aliased to the donated cache) and whether it fits the HBM, FLOPs and bytes accessed (XLA's cost
analysis), and the collectives with the bytes of their results. With the peak figures of `zipjax.aot.CHIPS` it
predicts TTFT, the decode step time, tok/s per chip and per pod, the largest batch that fits for each cache, and the
best (data x model) mesh per topology; for Emu3-Gen, the time of a ZipAR pass against the number of active rows.

Grid: models (zipjax.config.PUBLISHED) x topologies (v5e-4/16/64/256, v5p-8/32 in Google's core count, i.e. 4 and 16
chips, v6e-8) x caches (dense bf16, ZipCache 4/2 at 60 % salient, KIVI-2) x contexts (2k, 8k, 32k) x batch (1..256).
Compiling that grid is thousands of full-size compiles; on 2 CPU cores these approximations make it about 100
(each is recorded in the JSON, and checked where said):

1. Layers. Decoder layers are identical, so every per-chip figure is affine in the layer count. Programs are
   compiled with 2 and 4 layers and extrapolated (checked: one full-depth LLaMA-3-8B decode step; errors in the JSON
   under "validation").
2. Data parallelism. A (data d x model m) mesh keeps the weights replicated over "data" and splits the batch, and a
   decode step or a prefill has no collective over "data"; so a chip of a (d, m) mesh at global batch d*b runs the
   same program as a chip of a (1, m) mesh at batch b. Each "per-chip program" (model, chip generation, m, cache) is
   compiled once, on the smallest topology of that generation with m chips, and serves every topology and mesh with
   that m (checked: one 2x2 mesh against its 1x2 program).
3. Batch and context. Per program, a decode step is compiled at five (layers, batch, context) points and each
   figure f is fitted as f = p0 + p1*b + L*(q0 + q1*b + q2*b*S): per layer, the weights (q0), per-sequence
   activations (q1) and the cache (q2); outside the layers the embedding and head (p0) and the logits (p1). Checked
   against a held-out compile at 32k. Argument bytes are not fitted: they are exact, from the abstract shapes and
   the shardings (and equal the compiler's figure at every compiled point, recorded).
4. Compressed caches. A ZipCache / KIVI program is compiled at two points (2 layers, batch 8, contexts 2k and 32k)
   and modelled as the dense program of the same (model, generation, m) plus a difference that is per layer and per
   sequence, affine in the context (checked once with 4 layers). Their prompt is one block of S - 256 tokens, the
   decode step reads it and a partly filled full-precision window. The quantized decode attention runs the Pallas
   kernel over packed codes on every chip, per shard of the mesh (zipjax.sharding.states_per_shard: batch over
   "data", KV heads over "model", or the tokens with the shards' softmax states combined where the heads do not
   divide it). Points compiled before that (jnp path on more than one chip) say so in the JSON.
5. Prefill (TTFT, batch 1, dense cache): compiled for LLaMA-3-8B (1x4) and LLaMA-3-70B (1x16) at 2 and 4 layers
   and contexts 2k and 8k (a prefill compile takes about a minute here; the other models and 32k are left out of
   the time budget and show no TTFT); per-chip FLOPs and bytes on an m-way model axis are scaled by m_ref / m
   (tensor parallelism splits every matmul), v5p and v6e use the v5e compile (the same HLO) with their peaks.
   A prompt longer than 512 tokens goes through the model in chunks (a fori_loop whose body XLA's cost
   analysis counts once), so the body's figures are multiplied by the number of chunks; the flash kernel's own cost
   estimate charges each chunk the whole cache, so attention FLOPs of long prompts are overestimated (up to 2x).
6. Largest batch: bisection over b in [1, 256] on exact argument bytes + fitted temporaries and outputs <= HBM;
   the found batch of one program is compiled for real at full depth and one above it, to confirm.
7. Roofline: a step takes max(HBM bytes / bandwidth, FLOPs / bf16 peak, collective bytes / ICI bandwidth)
   (perfect overlap; collective bytes are each collective's result size per chip). FLOPs and collectives are the
   compiler's; the HBM bytes of a decode step are the exact weights + cache per chip, because XLA's TPU byte count
   includes its own prefetch copies of weights into VMEM (see the README) and its fit is the one that extrapolates
   worst in depth (validation: full-depth error in the JSON); the step from XLA's count is kept as xla_step_s.
   tok/s per chip = b / (m * step); per pod = that times the chips. TTFT and ZipAR passes use XLA's counts.
8. ZipAR (Emu3-Gen, 90x90 codes, guidance: 2 sequences): a pass with r active rows carries r queries per sequence
   over an 8,320-slot cache. Compiled at r = 1 and 90 (2 and 4 layers) on one program per generation; figures are
   affine in r between them (checked at r = 8). The pass stops being bandwidth-bound where FLOPs / peak overtakes
   bytes / bandwidth. The dense cache stands in for ZipAR's scatter cache (same reads, a different write).

Measured mode (`measure`): on this process's devices it loads a checkpoint (the shipped checkpoints/stdlib-llama on a
CPU; `--checkpoint` on a real chip or pod, where every host runs the same command after jax.distributed.initialize)
and times `zipjax.generate_stream`: TTFT, p50 / p99 time per output token, tok/s per chip, and MBU (ideal bytes of
a step / p50 / the chip's HBM bandwidth; none on a CPU, which has no figure in CHIPS), printed beside the roofline
of the same model on the same chip. Nothing in the compiled part is measured; nothing in the measured part is
predicted.

Output, under `--out` (default benchmarks/results/local/, untracked; the tracked copies are in benchmarks/results/):
pod_tpu_aot.json (the compiled points, fits, validation and the derived grid), pod_measured_<backend>.json,
pod_tpu_aot.png (Pillow; matplotlib is not in the environment), and a printed table. Compiled points are cached in
pod_compiles.json there (seeded from the tracked one), so an interrupted run resumes.

Modules: plan (the grid and the programs a run compiles), points (compiling one point), store (the compile cache),
fit (affine fits), capacity (exact bytes, memory plan, largest batch, roofline), run (the compile jobs and fits),
checks (the approximations checked), grid (the derived grid, TTFT, ZipAR curves), measure (the measured part),
output (tables, plot), cli (the command line); emu3 (its own table, `python -m benchmarks.pod.emu3`: Emu3-Gen 90x90
images in flight per chip and the ZipAR pass time with dense and compressed band caches).
"""

from __future__ import annotations

# isort: off
import zipjax  # noqa: F401  (before jax: it chooses the platform jax starts on)

# isort: on
from .capacity import Decode, Memory, Roofline, Step, exact_arguments, roofline
from .cli import Outcome, main
from .fit import FITTED, Figures, Fit, _row, fit_dense, fit_quantized, predict
from .grid import GridRow, MeshOption, grid
from .measure import Measured, measure
from .plan import DECODE_ROOM, HOSTS, MAX_BATCH, Plan, Program, full_plan, quick_plan
from .points import Point, decode_point, prefill_point, zipar_point
from .run import dense_points, quant_points

__all__ = ["DECODE_ROOM", "FITTED", "HOSTS", "MAX_BATCH", "Decode", "Figures", "Fit", "GridRow", "Measured", "Memory",
           "MeshOption", "Outcome", "Plan", "Point", "Program", "Roofline", "Step", "_row", "decode_point",
           "dense_points", "exact_arguments", "fit_dense", "fit_quantized", "full_plan", "grid", "main", "measure",
           "predict", "prefill_point", "quant_points", "quick_plan", "roofline", "zipar_point"]
