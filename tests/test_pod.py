"""The pod benchmark (benchmarks/pod/) and the profiling flag: an LLaMA-3-8B decode step compiled ahead of time for
multi-host TPU topologies from the library's own shardings (collectives present, the compiler's argument bytes equal
to the exact shard arithmetic), the roofline arithmetic checked by hand, the quick mode end to end (compiles, fits,
bisection, table, JSON, plot, the measured part on this CPU), and `--profile` writing a jax.profiler trace."""

import json
import sys
from pathlib import Path

import pytest

from zipjax import aot, cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import pod

GIB = 1 << 30


@pytest.mark.parametrize("gen, m", [("v5e", 4), ("v5p", 8)], ids=["v5e:2x2", "v5p:2x2x2"])
def test_8b_decode_step_compiles_for_multi_host_topologies(gen, m):
    """LLaMA-3-8B shape with 2 layers (identical layers: the rest is affine), batch 8, 1,024 slots, on a 1 x m mesh:
    v5e:2x2 is one host, v5p:2x2x2 two. Heads and MLP split over "model", so the partitioner inserts all-reduces."""
    prog = pod.Program("llama-3-8b", gen, m, "dense")
    point = pod.decode_point(prog, 2, 8, 1024)
    print(f"{pod.HOSTS[gen][m]}: {point}")
    assert point.collectives.get("all-reduce", 0) >= 4  # attention and MLP of each layer at least
    assert point.collective_bytes["all-reduce"] >= 4 * 8 * 4096 * 2  # [batch, hidden] bf16 per reduction
    # the shard arithmetic, up to the TPU's padding of small arrays (tokens, cursor)
    assert abs(point.argument_bytes - point.exact_argument_bytes) < 1e-4 * point.argument_bytes
    cache_bytes = 2 * 2 * 8 * 8 * 1024 * 128 * 2 // m  # layers, k/v, batch, KV heads, slots, head_dim, bf16
    assert point.alias_bytes >= cache_bytes  # the donated cache is updated in place
    assert point.flops > 0 and point.argument_bytes < aot.CHIPS[gen].hbm_bytes


def test_roofline_arithmetic_by_hand():
    """LLaMA-3-8B on a 1x4 v5e mesh, batch 1, 2,048 slots. Per chip: every matrix is split 4 ways (the 32 x 2 + 1
    norm vectors of 4096 are whole): (8,030,261,248 - 266,240) / 4 + 266,240 parameters x 2 bytes = 4,015,529,984
    bytes; the cache 32 layers x K,V x 2 of 8 KV heads x 2,048 x 128 x 2 bytes = 67,108,864. A step that reads them
    once at 819 GB/s takes 4.985 ms; with a fit that says exactly that, the roofline is memory-bound at that time."""
    weights, cache = pod.exact_arguments("llama-3-8b", "v5e", 4, "dense", 1, 2048)
    assert weights == ((8_030_261_248 - 266_240) // 4 + 266_240) * 2 == 4_015_529_984
    assert cache == 32 * 2 * 2 * 2048 * 128 * 2 + 8 == 67_108_872  # + the int32 cursor and start
    zero = (0.0,) * 5
    fit = pod.Fit(temp_bytes=zero, extra_bytes=zero, collective_total=zero,
                  bytes_accessed=(float(weights + cache), 0, 0, 0, 0),
                  flops=(0.0, 0.0, 0.0, 2 * 8_030_261_248 / 4 / 32, 0.0))  # 2 FLOPs per parameter per token, per layer
    step = pod.Decode(pod.Program("llama-3-8b", "v5e", 4, "dense"), fit).step(1, 2048)
    assert step.step_s == pytest.approx(4_082_638_856 / 819e9) == pytest.approx(4.985e-3, rel=1e-3)
    assert step.bound == "memory" and step.ideal_step_s == pytest.approx(step.step_s)
    assert step.compute_s == pytest.approx(2 * 8_030_261_248 / 4 / 197e12)  # 20.4 us: far from the bound
    times = pod.roofline(flops=197e12 * 0.002, bytes_accessed=819e9 * 0.001, collective=200e9 * 0.003, gen="v5e")
    assert (times.step_s, times.bound) == (pytest.approx(0.003), "collective")


def test_affine_fit_recovers_its_coefficients():
    """f = p0 + p1 b + L (q0 + q1 b + q2 b S) from the five decode points; a compressed cache adds L b (c0 + c1 S)."""
    truth = [5.0, 3.0, 7.0, 2.0, 0.5]
    points = {p: pod.Figures(**{n: float(sum(c * x for c, x in zip(truth, pod._row(*p), strict=True)))
                                for n in pod.FITTED}) for p in pod.dense_points((2048, 8192))}
    fit = pod.fit_dense(points)
    assert fit.flops == pytest.approx(truth)
    quant = {p: pod.Figures(**{n: pod.predict(fit, n, *p) + p[0] * p[1] * (11.0 + 0.25 * p[2]) for n in pod.FITTED})
             for p in pod.quant_points((2048, 32768))}
    assert pod.fit_quantized(fit, quant).temp_bytes == pytest.approx([5.0, 3.0, 7.0, 13.0, 0.75])


def test_quick_mode_runs_end_to_end(tmp_path):
    out = pod.main(["--quick", "--out", str(tmp_path), "--batches", "1", "--profile", str(tmp_path / "trace")])
    compiled = json.loads((tmp_path / "pod_quick.json").read_text())
    assert compiled["compiles"] == len(compiled["points"]) == 7  # 5 decode points, prefill at 2 and 4 layers
    assert (tmp_path / "pod_quick.png").stat().st_size > 1000
    rows = [r for r in compiled["grid"] if r["meshes"]]
    assert rows and all(r["best_mesh"] == "2x2" for r in rows)
    for row in rows:
        best = row["meshes"][0]
        assert 1 <= best["largest_batch_per_replica"] <= pod.MAX_BATCH and best["step"]["fits"]
        assert best["tok_s_per_pod"] == pytest.approx(best["tok_s_per_chip"] * 4)
    measured = out.measured[0]
    assert measured.ttft_s > 0 and 0 < measured.p50_s <= measured.p99_s and measured.tok_s_per_chip > 0
    assert measured.mbu is None  # a CPU has no peak bandwidth figure
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))


def test_generate_profile_flag_writes_a_trace(tmp_path, capsys):
    assert cli.main(["generate", "--max-new-tokens", "4", "--profile", str(tmp_path / "p"), "def f(x):"]) == 0
    assert list((tmp_path / "p").rglob("*.xplane.pb"))
    assert "profile written" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["generate", "--profile", str(tmp_path / "file"), "def f(x):"]) == 2


def test_sequence_split_cache_attends_in_place_on_a_1x16_mesh():
    """LLaMA-3-70B's shape with 2 layers on v5e:4x4 as a 1x16 mesh: its 8 KV heads do not divide the model axis, so
    the cache is split by sequence, and the flash kernel runs per sequence shard with the softmax states combined
    across the axis: K and V are never all-gathered. (With a kernel that needed whole K/V rows, this program
    gathered each layer's K and V: at batch 8 and 8k slots, 1,745.8 MB of collectives per step and 2.94 GB of bytes
    accessed per chip, against 1.58 MB and 1.34 GB per shard; measured when the change landed.)"""
    prog = pod.Program("llama-3-70b", "v5e", 16, "dense")
    after = pod.decode_point(prog, 2, 2, 2048, hlo=True)
    print(f"per sequence shard: collective bytes {after.collective_bytes}, bytes accessed "
          f"{after.bytes_accessed / 2**20:.1f} MiB, temporaries {after.temp_bytes / 2**20:.1f} MiB")
    layer_kv = 2 * 2 * 8 * 2048 * 128 * 2  # one layer's K and V, whole: batch, KV heads, slots, head_dim, bf16
    assert after.collective_bytes.get("all-gather", 0) < layer_kv / 100
    assert after.collective_total < layer_kv / 10
    assert "tpu_custom_call" in after.hlo


def test_zipcache_decode_runs_the_packed_code_kernel_per_shard_on_v5e_2x2():
    """LLaMA-3-8B's shape with 2 layers, ZipCache 4/2 over a 1,792-token prompt, batch 8, on a 1x4 v5e mesh: the
    Pallas kernel over packed codes runs per shard (KV heads over "model"), so the program holds no dequantized
    copy of a store: no float array has a store's shape (the weights are the program's largest float arrays, so
    only per-token arrays are looked at)."""
    import re

    point = pod.decode_point(pod.Program("llama-3-8b", "v5e", 4, "zipcache-4/2"), 2, 8, 2048, hlo=True)
    hlo = point.hlo
    print(f"ZipCache 8B on v5e 1x4: {point}")
    assert hlo.count("tpu_custom_call") >= 2 * 2  # two segments of each layer at least
    # a dequantized store would be a float [batch, KV heads per chip, tokens > the full-precision window, head_dim]
    shapes = [[int(n) for n in dims.split(",")] for dims in re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]+)\]", hlo)]
    assert not [s for s in shapes if len(s) == 4 and s[:2] == [8, 2] and s[3] == 128 and s[2] > pod.DECODE_ROOM]
