"""The packed-code decode attention kernel compiled ahead of time for real chips, on this CPU-only machine.

zipjax.aot compiles for a TPU topology (libtpu: Mosaic) or a described H100 (jax's CUDA plugin: Triton) from
abstract arguments: nothing is allocated, nothing runs. That proves what interpret mode cannot (Mosaic's tiling,
VMEM and dtype rules, Triton's power-of-two rule, the GPU lowering actually being Triton) and gives the compiler's
own memory plan. Shapes are real models' decode shapes: LLaMA-2-7B (32 KV heads, G=1, d=128), LLaMA-3-8B /
Mistral-7B (8 KV heads, G=4, d=128), SmolLM2-135M (3 KV heads, G=3, d=64), bf16 queries, float16 scales, in the
ZipCache layout (token-wise values, CST channel scale) and the KIVI layout (groups of 32 channels, no CST), over a
prompt segment (0.6 * 4096 salient tokens, one block) or streaming blocks of 60 tokens.

The kernel for several queries per sequence (zipjax.kernels.quantized_multi_query, through `multi_query`, the
library's call, kernel=None) at Emu3-Gen 90x90 with classifier-free guidance (batch 2; 32 query heads on 8 KV heads,
d = 128): a ZipAR pass of the fixed window 7 (13 queries), of the adaptive decoder (21) and SJD's window of 16 over
the compressed rows of the image (ZipCache layout: 88 rows of 91 tokens, one 4-bit block a row; KIVI layout: 8192
tokens at 2 bits in blocks of 32).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.kernels.quantized_attention import PackedSegment, combine, segment_attention
from zipjax.kernels.quantized_multi_query import multi_query

from zipjax import aot
from zipjax.zipar.adaptive import query_slots
from zipjax.zipar.schedule import fixed_window

MODELS = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128), "smollm2-135m": (3, 3, 64)}  # kv_heads, G, d
LAYOUTS = {"zipcache": (None, True), "kivi": (32, False)}  # value group, CST scale
PROMPT = 4096
SALIENT = round(0.6 * PROMPT)  # ZipCache's 4-bit share of the prompt; the rest is 2-bit
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


def segment(sharding, batch: int, model: str, bits: int, blocks: int, block: int, layout: str) -> list:
    """Abstract arguments of one segment, as the cache holds them: codes, key (step, min), value (step, min), CST
    scale (or None), int16 slots."""
    kv_heads, _, d = MODELS[model]
    group, cst = LAYOUTS[layout]
    tokens, per_block = (batch, kv_heads, blocks * block), (batch, kv_heads, blocks, d)
    codes = aot.array((*tokens, d * bits // 8), jnp.uint8, sharding)
    value_scale = aot.array((*tokens, d // (group or d)), jnp.float16, sharding)
    stat = aot.array(per_block, jnp.float16, sharding)
    return [codes, stat, stat, codes, value_scale, value_scale, stat if cst else None,
            aot.array(tokens, jnp.int16, sharding)]


def attention(*settings: tuple[int, int, int | None]):
    """Decode attention over one segment per (bits, block, group), merged: q, then each segment's arguments, then
    q_slot and starts."""
    def run(q, *args):
        *segments, q_slot, starts = args
        states = [segment_attention(q, PackedSegment(*segments[8 * i:8 * (i + 1)]), q_slot, starts, bits=bits,
                                    block=block, group=group)
                  for i, (bits, block, group) in enumerate(settings)]
        return combine(states)[0]
    return run


def compile_segments(target_name: str, batch: int, model: str, layout: str, *segments: tuple[int, int, int]):
    """Compile attention over segments (bits, blocks, block) for a target; returns (compiled, report, arguments)."""
    target = aot.target(target_name)
    sharding = aot.on_chip(target)
    kv_heads, heads_per_kv, d = MODELS[model]
    args = [aot.array((batch, kv_heads, heads_per_kv, d), jnp.bfloat16, sharding)]
    for bits, blocks, block in segments:
        args += segment(sharding, batch, model, bits, blocks, block, layout)
    args += [aot.array((), jnp.int32, sharding), aot.array((batch,), jnp.int32, sharding)]
    fn = attention(*[(bits, block, LAYOUTS[layout][0]) for bits, _, block in segments])
    compiled, report = aot.compile(fn, *args, target=target)
    return compiled, report, args


def largest_float_buffer(hlo: str) -> int:
    """Elements of the largest floating-point array anywhere in a compiled HLO module (fusions included)."""
    shapes = re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]+)\]", hlo)
    return max((int(np.prod([int(n) for n in dims.split(",")])) for dims in shapes), default=0)


ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
ENTRY_ARRAY = re.compile(r'%\S+ = (\w+)\[([0-9,]*)\]\{[^}]*\} ([\w-]+)\((?:.*custom_call_target="(\w+)")?')
MOVES = {"parameter", "bitcast", "copy-start", "copy-done", "slice-start", "slice-done", "ConcatBitcast"}


def largest_computed_array(hlo: str) -> int:
    """Bytes of the largest array that an instruction of the entry computation other than the kernels computes or
    copies, in HBM or VMEM. Left out: parameters and bitcasts, and XLA's asynchronous prefetches of operands into
    VMEM (copy/slice start and done, the ConcatBitcast that joins prefetched slices), which move an operand once
    instead of the kernel reading it from HBM; the kernels' results are tuples."""
    entry = hlo[hlo.index("\nENTRY"):].split("\n}")[0]
    return max((ITEMSIZE[dtype] * int(np.prod([int(n) for n in dims.split(",") if n]))
                for dtype, dims, op, target in ENTRY_ARRAY.findall(entry) if op not in MOVES and target not in MOVES),
               default=0)


@pytest.mark.parametrize("target, model, batch, layout, bits, blocks, block", [
    ("v5e:1x1", "llama3-8b", 8, "zipcache", 4, 1, SALIENT),
    ("v5e:1x1", "smollm2-135m", 1, "kivi", 2, 27, 60),
    ("v6e:1x1", "llama2-7b", 1, "kivi", 2, 1, SALIENT),
    ("v6e:1x1", "llama3-8b", 8, "zipcache", 4, 27, 60),
    ("h100", "llama3-8b", 8, "zipcache", 4, 1, SALIENT),
    ("h100", "llama2-7b", 1, "kivi", 2, 27, 60),
])
def test_compiles_for_real_chips(target, model, batch, layout, bits, blocks, block):
    """The kernel is in the compiled program (Mosaic's custom call on TPU, Triton's on GPU) and the compiler's
    temporaries stay far below a dequantized cache."""
    compiled, report, _ = compile_segments(target, batch, model, layout, (bits, blocks, block))
    kv_heads, _, d = MODELS[model]
    dequantized_bf16 = 2 * batch * kv_heads * blocks * block * d * 2
    kind = "gpu" if target == "h100" else "tpu"
    print(f"{target} {model} batch {batch} {layout} {bits}-bit {blocks}x{block}: compiled in "
          f"{report.compile_seconds:.1f}s, temp {report.temp_bytes} bytes, arguments {report.argument_bytes} bytes "
          f"(a bf16 K/V copy: {dequantized_bf16})")
    assert CUSTOM_CALLS[kind] in compiled.as_text()
    assert report.fits and report.temp_bytes < dequantized_bf16 / 4


def test_reads_at_most_40_percent_of_a_bf16_cache_and_makes_no_dequantized_copy():
    """LLaMA-3-8B decode, batch 8, a 4096-token prompt in ZipCache's two segments (2458 salient tokens at 4 bits,
    1638 at 2 bits, CST), both kernels and their log-sum-exp merge compiled for one TPU v5e.

    What is compared, against a dense bf16 K and V of the same 4096 tokens (batch * kv_heads * 4096 * d * 2 * 2
    bytes):
      - the bytes the two kernels read and write, from their own CostEstimates as the compiled HLO carries them
        (packed codes, the float16 side rows of value scales and visibility, the per-block statistics, the query,
        the partial states), and
      - the cache's own inputs: codes + float16 scales + int16 slots.
    Both must be <= 40%. XLA's whole-program "bytes accessed" is printed too but not compared: besides the
    wrapper's one pass over scales and slots into the side rows, it counts XLA's prefetches of operands small
    enough for VMEM as extra reads and writes, although the kernel then reads them from VMEM instead of HBM.
    That nothing else copies the cache is checked instead: the largest array any instruction but the kernels and
    those prefetches computes or copies must be 16 times smaller than the cache inputs (so no relayout of the
    codes, in HBM or VMEM: on TPU the codes are read in XLA's own layout for them, tokens minor).
    No dequantized copy: a float copy of the cache would be a float array of at least batch * kv_heads * tokens *
    d elements (and as many temporary bytes as its size); the largest float array anywhere in the compiled
    program, HBM or VMEM, must be 16 times smaller than that, and the compiler's temporaries 16 times smaller
    than a bf16 copy.
    """
    regular = PROMPT - SALIENT
    compiled, report, args = compile_segments("v5e:1x1", 8, "llama3-8b", "zipcache", (4, 1, SALIENT),
                                              (2, 1, regular))
    hlo = compiled.as_text()
    kv_heads, _, d = MODELS["llama3-8b"]
    dense_bf16 = 8 * kv_heads * PROMPT * d * 2 * 2
    kernel_bytes = [int(n) for n in re.findall(r'"bytes_accessed":"(\d+)"', hlo)]
    cache_bytes = sum(a.size * a.dtype.itemsize for a in args[1:-2] if a is not None)
    share = lambda n: f"{n} bytes ({n / dense_bf16:.1%})"
    print(f"dense bf16 K/V {dense_bf16} bytes; kernels' CostEstimates {kernel_bytes}: {share(sum(kernel_bytes))}; "
          f"cache inputs {share(cache_bytes)}; XLA whole program {share(int(report.bytes_accessed))}; temp "
          f"{report.temp_bytes}; largest float array {largest_float_buffer(hlo)} elements (a float copy of the "
          f"salient segment: {8 * kv_heads * SALIENT * d}); largest other array {largest_computed_array(hlo)} bytes")
    assert len(kernel_bytes) == 2 and hlo.count("tpu_custom_call") >= 2
    assert sum(kernel_bytes) <= 0.4 * dense_bf16 and cache_bytes <= 0.4 * dense_bf16
    assert largest_float_buffer(hlo) < 8 * kv_heads * regular * d / 16
    assert largest_computed_array(hlo) < cache_bytes / 16
    assert report.temp_bytes < dense_bf16 / 16


@pytest.mark.parametrize("target_name", ["h100"])
def test_kernel_per_shard_compiles_for_a_mesh(target_name):
    """zipjax.sharding.states_per_shard over LLaMA-3-8B's 8 KV heads on one H100 (a 1x1 mesh; "v5e:2x2" takes the
    2x2 branch, and tests/test_pod.py compiles the whole ZipCache decode per shard on a v5e 1x4 mesh): Triton's
    custom call in the program, no float array the size of a dequantized segment."""
    import functools

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from zipjax.sharding import states_per_shard

    target = aot.target(target_name)
    data, model = (2, 2) if target.kind == "tpu" else (1, 1)
    mesh = aot.mesh(target, data, model)
    per_head = NamedSharding(mesh, PartitionSpec("data", "model"))
    kv_heads, heads_per_kv, d = MODELS["llama3-8b"]
    q = aot.array((8, kv_heads, heads_per_kv, d), jnp.bfloat16, per_head)
    arrays = PackedSegment(*segment(per_head, 8, "llama3-8b", 4, 1, SALIENT, "zipcache"))
    q_slot = aot.array((), jnp.int32, NamedSharding(mesh, PartitionSpec()))
    starts = aot.array((8,), jnp.int32, NamedSharding(mesh, PartitionSpec("data")))
    kernel = functools.partial(segment_attention, bits=4, block=SALIENT, group=None)

    def attend(q, arrays, q_slot, starts):
        return combine([states_per_shard(kernel, q, arrays, q_slot, starts)])[0]

    with jax.set_mesh(mesh):
        compiled, report = aot.compile(attend, q, arrays, q_slot, starts, target=target)
    hlo = compiled.as_text()
    print(f"{target_name} {data}x{model}: temp {report.temp_bytes} bytes, largest float array "
          f"{largest_float_buffer(hlo)} elements, collectives {report.collectives}")
    assert CUSTOM_CALLS[target.kind] in hlo
    assert largest_float_buffer(hlo) < 8 * kv_heads * SALIENT * d // (data * model) / 16


EMU3_GEN = (8, 4, 128)  # kv_heads, G, d: Emu3-Gen 8B's 32 query heads on 8 KV heads
EMU3_PASSES = {"zipar_window7": fixed_window(90, 90, 7).queries_per_pass, "zipar_adaptive": query_slots(90, 4, 90),
               "sjd16": 16}  # queries per pass at 90x90
# bits, blocks, block, value group, CST scale
EMU3_SEGMENTS = {"zipcache": (4, 88, 91, None, True), "kivi": (2, 256, 32, 32, False)}


@pytest.mark.parametrize("target_name, decoder, layout", [
    ("v5e:1x1", "zipar_window7", "zipcache"), ("v5e:1x1", "sjd16", "kivi"),
    ("v6e:1x1", "zipar_adaptive", "zipcache"), ("v6e:1x1", "zipar_window7", "kivi"),
    ("h100", "zipar_window7", "zipcache"), ("h100", "sjd16", "zipcache"),
])
def test_multi_query_compiles_for_emu3_90x90_with_guidance(target_name, decoder, layout, record_property):
    """multi_query(kernel=None) compiled for the chip picks the kernel (Mosaic's or Triton's custom call in the
    program); it fits; its temporaries stay below a bf16 copy of the segment's K and V. On TPU no float array is an
    eighth the size of a dequantized copy (the largest is the wrapper's float16 side rows, 1 + 2 groups a token:
    visibility, value steps and mins), and the bytes the kernel reads by its CostEstimate are at most 40% of that
    bf16 copy. On GPU the temporaries are the per-tile partial states (one per 128 tokens, Q * G rows padded to a
    power of two)."""
    target = aot.target(target_name)
    chip = aot.on_chip(target)
    (kv_heads, heads_per_kv, d), queries, batch = EMU3_GEN, EMU3_PASSES[decoder], 2
    bits, blocks, block, group, cst = EMU3_SEGMENTS[layout]
    tokens, per_block = (batch, kv_heads, blocks * block), (batch, kv_heads, blocks, d)
    codes = aot.array((*tokens, d * bits // 8), jnp.uint8, chip)
    value_scale = aot.array((*tokens, d // (group or d)), jnp.float16, chip)
    stat = aot.array(per_block, jnp.float16, chip)
    segment = PackedSegment(codes, stat, stat, codes, value_scale, value_scale, stat if cst else None,
                            aot.array(tokens, jnp.int16, chip))
    args = (aot.array((batch, queries, kv_heads * heads_per_kv, d), jnp.bfloat16, chip), segment,
            aot.array((batch, queries), jnp.int32, chip), aot.array((batch,), jnp.int32, chip))
    attend = lambda q, segment, q_slots, starts: multi_query(q, segment, q_slots, starts, bits=bits, block=block,
                                                              group=group)
    compiled, report = aot.compile(attend, *args, target=target)
    hlo = compiled.as_text()
    bf16_copy = 2 * batch * kv_heads * blocks * block * d * 2
    kernel_bytes = sum(int(n) for n in re.findall(r'"bytes_accessed":"(\d+)"', hlo))
    record_property("temp_bytes", report.temp_bytes)
    record_property("compile_seconds", round(report.compile_seconds, 2))
    print(f"{target_name} {decoder} ({queries} queries) {layout} {bits}-bit {blocks}x{block}: compiled in "
          f"{report.compile_seconds:.1f}s, temp {report.temp_bytes} bytes, arguments {report.argument_bytes}, output "
          f"{report.output_bytes}, kernel reads {kernel_bytes} (a bf16 K/V copy: {bf16_copy})")
    assert CUSTOM_CALLS[target.kind] in hlo
    assert report.fits and report.temp_bytes < bf16_copy
    if target.kind == "tpu":
        assert 0 < kernel_bytes <= 0.4 * bf16_copy
        assert largest_float_buffer(hlo) < batch * kv_heads * blocks * block * d / 8  # the side rows: 1 + 2 groups
