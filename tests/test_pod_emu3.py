"""Emu3-Gen images in flight per chip (benchmarks/pod/emu3.py): one ZipAR pass (lag 7, 90x90 codes, guidance) over
the compressed band cache compiled ahead of time for a TPU v6e at 2 layers, its stores read by the packed-code
Pallas kernel, its argument bytes equal to the exact shard arithmetic and the cache donated in place; the bytes per
image by hand; the images-in-flight bisection against its closed form; the fit recovering its coefficients; the
attention path of every cache and the tracked results compiled with it."""

import json
import math
import sys
from pathlib import Path

import pytest

from zipjax import aot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.pod import emu3
from benchmarks.pod.fit import FITTED, Figures

GIB = 1 << 30
EMBED = 184_622 * 4_096  # Emu3-Gen's embedding, and its untied output head
LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v (8 KV heads of 128); the MLP
PARAMS = 2 * EMBED + 32 * (LAYER + 2 * 4096) + 4096  # with two norm vectors per layer and the final one


def test_a_zipar_pass_over_the_band_cache_compiles_for_v6e():
    """Emu3-Gen's shape with 2 layers, one image (2 sequences), ZipCache 4/2 band cache on one v6e chip: its stores
    read by the packed-code Pallas kernel (a Mosaic call per store segment and layer), the compiler's argument bytes
    the exact shard arithmetic (up to its padding of small arrays: 0.86 MB of 3.9 GB when written, the bitmaps and
    the packed stores' short rows), the cache donated and updated in place, and it fits."""
    prog = emu3.ImageProgram("v6e", 1, "zipcache-4/2")
    point = emu3.pass_point(prog, 2, 1, hlo=True)
    print(f"ZipAR s=7 pass, ZipCache 4/2, 2 layers, 1 image on v6e: {point}")
    assert point.hlo.count("tpu_custom_call") >= 2
    assert 0 <= point.argument_bytes - point.exact_argument_bytes < 1e-3 * point.argument_bytes
    cache, shardings = emu3.abstract_pass_cache(prog.config(2), "zipcache-4/2", 1, aot.mesh(emu3.host("v6e", 1), 1, 1))
    assert point.alias_bytes >= 0.99 * emu3._shard_bytes(cache, shardings)  # the donated cache, updated in place
    assert point.flops > 0 and point.argument_bytes + point.temp_bytes < aot.CHIPS["v6e"].hbm_bytes


def test_bytes_per_chip_by_hand():
    """Weights: every parameter in bf16; on v5e's 1x4 mesh the layers' matrices split 4 ways, their norm vectors
    whole, and the embedding and output head whole too (184,622 rows: the library's rules replicate a dimension
    the model axis does not divide). Dense KV per image: 32 layers x K,V x 2 sequences x 8 KV heads x 8,320 slots
    x 128 x bf16, a quarter per chip (KV heads over "model"), plus the per-sequence bookkeeping (written bitmap,
    start, slot, valid)."""
    weights, one = emu3.exact_bytes(emu3.ImageProgram("v6e", 1, "dense"), 1)
    assert weights == 2 * PARAMS
    weights4, one4 = emu3.exact_bytes(emu3.ImageProgram("v5e", 4, "dense"), 1)
    assert weights4 == 2 * (2 * EMBED + 32 * (LAYER // 4 + 2 * 4096) + 4096) == 6_515_040_256
    kv = 32 * 2 * 2 * 8 * 8320 * 128 * 2
    assert emu3.cache_len() == 8320
    assert emu3.exact_bytes(emu3.ImageProgram("v6e", 1, "dense"), 2)[1] - one == kv + 2 * (8320 + 4 + 4 + 1)
    assert emu3.exact_bytes(emu3.ImageProgram("v5e", 4, "dense"), 2)[1] - one4 == kv // 4 + 2 * (8320 + 4 + 4 + 1)
    zipcache = emu3.ImageProgram("v6e", 1, "zipcache-4/2")
    per_image = emu3.exact_bytes(zipcache, 2)[1] - emu3.exact_bytes(zipcache, 1)[1]
    assert 0.15 * kv < per_image < 0.4 * kv  # 4/2 bits with a full-precision band of 12 rows of 8,320 slots


def test_images_in_flight_is_the_largest_count_that_fits_90_percent_of_hbm():
    """With temporaries t0 + t1 n per chip (fitted figures, here given), n images fit while weights + KV(n) +
    tokens + t0 + t1 n <= 0.9 HBM; the bisection finds the closed form's floor, per chip that over m."""
    prog = emu3.ImageProgram("v6e", 1, "dense")
    zero = (0.0, 0.0, 0.0, 0.0)
    t0, t1 = 300e6, 40e6  # bytes; t1 per image
    read = (1e9, 2e9, 0.0, 0.0)  # XLA's bytes accessed: 1 GB + 2 GB per image
    cap = emu3.Capacity(prog, {**{n: zero for n in FITTED}, "temp_bytes": (t0, t1, 0.0, 0.0), "bytes_accessed": read})
    weights, one = emu3.exact_bytes(prog, 1)
    per_image = emu3.exact_bytes(prog, 2)[1] - one + 2 * emu3.schedule().queries_per_pass * 4
    fixed = weights + one - per_image + 2 * emu3.schedule().queries_per_pass * 4 + t0
    expected = math.floor((0.9 * aot.CHIPS["v6e"].hbm_bytes - fixed) / (per_image + t1))
    # (0.9 x 32 GiB - 16.98 GB of weights - 0.30 GB) / (2.181 GB of KV + 0.04 GB) = (30.92 - 17.28) / 2.22 = 6.1
    assert cap.images_in_flight() == expected == 6
    assert cap.total_bytes(expected) <= 0.9 * 32 * GIB < cap.total_bytes(expected + 1)
    row = emu3.summary(cap)
    assert row["images_per_chip"] == expected and row["passes_per_image"] == 713
    kv_bound = math.floor((0.9 * aot.CHIPS["v6e"].hbm_bytes - weights - one) / (per_image - 8 * 13)) + 1
    assert row["kv_bound_images_per_chip"] == kv_bound == 6  # weights and KV alone: (30.92 - 16.98) / 2.181 = 6.4
    at = row["pass_at_capacity"]  # memory-bound on both counts: XLA's bytes, and the weights + KV read once
    assert (at.step_s, at.bound) == (pytest.approx((1e9 + 2e9 * 6) / 1640e9), "memory")
    assert at.ideal_step_s == pytest.approx(sum(emu3.exact_bytes(prog, 6)) / 1640e9)
    assert row["images_per_s_per_chip"] == pytest.approx(6 / (713 * at.step_s))
    v5e = emu3.Capacity(emu3.ImageProgram("v5e", 4, "dense"), cap.coefficients)
    assert emu3.summary(v5e)["images_per_chip"] == v5e.images_in_flight() / 4


def test_fit_recovers_its_coefficients():
    truth = (5.0, 3.0, 7.0, 2.0)  # f = p0 + p1 n + L (q0 + q1 n)
    points = {k: Figures(**{n: truth[0] + truth[1] * k[1] + k[0] * (truth[2] + truth[3] * k[1]) for n in FITTED})
              for k in emu3.FIT_POINTS}
    fitted = emu3.fit(points)
    assert fitted["flops"] == pytest.approx(truth)
    assert emu3.predict(fitted, 32, 8).temp_bytes == pytest.approx(5 + 24 + 32 * (7 + 16))


def test_every_cache_is_taken_and_its_attention_path_is_in_the_compile_key():
    """The parallel decoders take every cache; on a TPU the dense cache, ZipCache and KIVI attend by Pallas kernels
    (kernel=None), Uniform in jax.numpy; the path is part of the key, so a compile of another path is not reused."""
    assert all(emu3.refusal(c) is None for c in emu3.CACHES)
    paths = {c: emu3.attention_kind(c) for c in emu3.CACHES}
    assert paths == {"dense": "kernel", "zipcache-4/2": "kernel", "uniform-4": "jnp", "kivi-2": "kernel",
                     "kivi-4": "kernel"}
    assert emu3.ImageProgram("v5e", 4, "dense").key == "emu3pass|emu3-gen|v5e|m4|dense|kernel|s7"
    assert "per KV-head shard" in emu3.attention_path(emu3.ImageProgram("v5e", 4, "dense"))


def test_kivi_bytes_per_image():
    """KIVI's band cache per image on one v6e chip, by hand: per sequence, layer and KV head (8 of 128), a
    slot-addressed store of 8,320 slots (keys per channel, a float16 (step, min) per run of 32 tokens and channel;
    values per token, a pair per group of 32 channels; bits-wide codes; an int16 mark per slot) and a 1,137-entry
    bf16 ring of K and V; per sequence the written bitmap, start, pass slot, valid, settled and the ring's slots.
    Below half the dense bytes, KIVI-4 above KIVI-2."""
    per = {}
    for cache in ("kivi-2", "kivi-4", "dense"):
        prog = emu3.ImageProgram("v6e", 1, cache)
        per[cache] = emu3.exact_bytes(prog, 2)[1] - emu3.exact_bytes(prog, 1)[1]
    heads, slots, ring = 2 * 32 * 8, 8320, 1137
    for cache, bits in (("kivi-2", 2), ("kivi-4", 4)):
        store = 2 * slots * 128 * bits // 8 + 2 * (slots // 32) * 128 * 2 + 2 * slots * (128 // 32) * 2 + 2 * slots
        assert per[cache] == heads * (store + 2 * ring * 128 * 2) + 2 * (slots + 4 + 4 + 1 + 4 + 4 * ring)
    assert per["kivi-2"] < per["kivi-4"] < 0.5 * per["dense"]


def test_tracked_results_are_compiled_with_the_current_attention_paths():
    """benchmarks/results/pod_emu3_tpu_aot.json: a row per generation and cache, each compiled under its current
    key (attention path included) at every fit point; the compile cache holds no key without a path."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    payload = json.loads((results / "pod_emu3_tpu_aot.json").read_text())
    rows = {(r["gen"], r["cache"]): r for r in payload["rows"]}
    assert set(rows) == {(g, c) for g in emu3.GENS for c in emu3.CACHES}
    for (gen, cache), row in rows.items():
        prog = emu3.ImageProgram(gen, emu3.GENS[gen], cache)
        assert row["attention"] == emu3.attention_path(prog) and row["images_per_chip"] >= 1
        assert all(f"{prog.key}|L{layers}|n{n}" in payload["points"] for layers, n in emu3.FIT_POINTS)
    compiles = json.loads((results / "pod_emu3_compiles.json").read_text())
    assert all("|kernel|s7|" in k or "|jnp|s7|" in k for k in compiles)
