"""The ZipAR attention kernel compiles for real accelerators, ahead of time on this CPU machine (zipjax.aot): TPU v5e
and v6e (Mosaic) and an H100 (Triton), at real model shapes, through the library's entry point
`zipar_attention(...)` (backend=None), which chooses the compiled kernel by the platform zipjax.aot compiles for.

Interpret mode (tests/test_pallas_zipar.py) checks the numbers; only compiling checks Mosaic's block rules, Triton's
power-of-two rule, VMEM/SMEM limits and the compiler's memory plan."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from zipjax.kernels.zipar_attention import zipar_attention

from zipjax import aot
from zipjax.shapes import cache_length
from zipjax.zipar.adaptive import query_slots
from zipjax.zipar.schedule import fixed_window

CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}
PROMPT_BUCKET = 64


def _cache_len(rows: int, cols: int) -> int:
    """As zipjax.zipar.fixed sizes it: prompt bucket + image tokens (an EOL per row) + the padding queries' slot."""
    return cache_length(PROMPT_BUCKET + fixed_window(rows, cols, 7).num_tokens + 1)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int  # 2: classifier-free guidance (conditional + unconditional)
    q_len: int  # queries per pass
    heads: int
    kv_heads: int
    head_dim: int
    max_len: int


SHAPES = {
    # Emu3-Gen (32 query heads, 8 KV heads, head_dim 128) at 90x90 codes: fixed window 7 and the adaptive decoder
    "emu3_90x90_window7": Shape(2, fixed_window(90, 90, 7).queries_per_pass, 32, 8, 128, _cache_len(90, 90)),
    "emu3_90x90_adaptive": Shape(2, query_slots(90, 4, 90), 32, 8, 128, _cache_len(90, 90)),
    # Speculative Jacobi Decoding's window of 16 at 90x90 (zipjax.zipar.sjd sizes its cache one window longer)
    "emu3_90x90_sjd16": Shape(2, 16, 32, 8, 128, cache_length(PROMPT_BUCKET + 90 * 91 + 16 + 1)),
    # 64 x 48 codes: 7 queries (28 rows), a cache length (3328) that is not a multiple of the TPU block
    "emu3_64x48_window7": Shape(2, fixed_window(64, 48, 7).queries_per_pass, 32, 8, 128, _cache_len(64, 48)),
    # SmolLM2-shaped: head_dim 64, 9 query heads on 3 KV heads (group 3: 39 rows)
    "smollm2_90x90_window7": Shape(2, fixed_window(90, 90, 7).queries_per_pass, 9, 3, 64, _cache_len(90, 90)),
}
TARGETS = ("v5e:1x1", "v6e:1x1", "h100")


@functools.cache
def _target(name: str) -> aot.Target:
    return aot.target(name)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("target_name", TARGETS)
def test_compiles_ahead_of_time(target_name, shape_name, record_property):
    s = SHAPES[shape_name]
    t = _target(target_name)
    chip = aot.on_chip(t)
    cache = aot.array((s.batch, s.kv_heads, s.max_len, s.head_dim), jnp.bfloat16, chip)
    args = (aot.array((s.batch, s.q_len, s.heads, s.head_dim), jnp.bfloat16, chip), cache, cache,
            aot.array((s.batch, s.q_len), jnp.int32, chip), aot.array((s.batch, s.max_len), jnp.bool_, chip),
            aot.array((s.batch,), jnp.int32, chip))
    compiled, report = aot.compile(zipar_attention, *args, target=t)
    record_property("compile_seconds", round(report.compile_seconds, 2))
    record_property("temp_bytes", report.temp_bytes)
    assert CUSTOM_CALL[t.kind] in compiled.as_text()
    assert report.fits
    # no [queries, max_len] score matrix: that alone is what the jnp path keeps (float32), the kernel a few MiB
    scores = 4 * s.batch * s.heads * s.q_len * s.max_len
    assert report.temp_bytes < scores / 2
    if t.kind == "tpu":  # XLA sees the kernel's cost estimate: both matmuls over every slot, rows padded
        useful = 4 * s.batch * s.heads * s.q_len * s.max_len * s.head_dim
        assert useful <= report.flops < 1.5 * useful


@pytest.mark.parametrize("target_name", ["v5e:2x2"])
def test_the_decoders_cache_runs_the_kernel_per_shard_of_a_tpu_mesh(target_name):
    """ScatterKVCache.attend (every ZipAR / SJD pass over a dense cache) with kernel=None, compiled for a 1x4 mesh of
    v5e chips at Emu3-Gen's heads (32 on 8 KV heads, d 128), 90x90 with guidance: a Mosaic call is never partitioned
    by XLA ("Mosaic kernels cannot be automatically partitioned"), so the cache runs it per KV-head shard; each chip
    holds a quarter of the cache and the kernel's custom call is in the program."""
    import jax
    from jax.sharding import NamedSharding

    from zipjax.config import ModelConfig
    from zipjax.sharding import tree_shardings
    from zipjax.zipar.cache import ScatterKVCache

    s = SHAPES["emu3_90x90_window7"]
    t = _target(target_name)
    mesh = aot.mesh(t, 1, 4)
    config = ModelConfig("llama", vocab_size=256, hidden_size=s.heads * s.head_dim, intermediate_size=256, num_layers=1,
                         num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
                         max_position_embeddings=s.max_len, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: ScatterKVCache.init(config, s.batch, s.max_len, jnp.zeros(s.batch, jnp.int32)))
    cache = aot.abstract(shapes, tree_shardings(shapes, shapes.logical_axes(), mesh))
    heads = NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model", None))
    q = aot.array((s.batch, s.q_len, s.heads, s.head_dim), jnp.bfloat16, heads)
    new = aot.array((s.batch, s.q_len, s.kv_heads, s.head_dim), jnp.bfloat16, heads)
    slots = aot.array((s.batch, s.q_len), jnp.int32, NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def attend(cache, q, k_new, v_new, slots):
        return cache.at(slots, slots >= 0).attend(0, q, k_new, v_new, None)

    with jax.set_mesh(mesh):
        compiled, report = aot.compile(attend, cache, q, new, new, slots, target=t)
    assert CUSTOM_CALL["tpu"] in compiled.as_text()
    assert report.fits
    per_chip = s.batch * s.kv_heads * s.max_len * s.head_dim * 2 // 4
    assert report.argument_bytes < 3 * per_chip, (report.argument_bytes, per_chip)


# A ZipAR pass over the compressed band cache (zipjax.zipar.compressed): the stores read by the packed-code kernel for
# several queries per sequence, picked by kernel=None when compiling for the chip, the ring in jnp.
# v5e: ZipCache 4/2 (four stores a layer); H100: every token at 4 bits (two stores), as Triton's compile of the
# 2-bit kernel over short blocks took over five minutes on 2 busy cores (the 4-bit pass: about two)
BAND_TARGETS = {"v5e:1x1": 0.6, "h100": 1.0}  # target: ZipCache's saliency_ratio


@pytest.mark.parametrize("target_name", list(BAND_TARGETS))
def test_band_cache_pass_compiles_with_the_multi_query_kernel(target_name, record_property):
    """One layer of an Emu3-Gen-shaped model (32 query heads, 8 KV heads, head_dim 128) over ZipCache at 32x32
    codes with guidance, ZipAR lag 7 (5 queries a pass, blocks of a row and its EOL): the pass's attention and
    block compression compile, the stores go through the kernel's custom call, and the temporaries stay below a
    quarter of a float32 copy of the stores (the jnp path's dequantized keys and values)."""
    from zipjax.config import PUBLISHED
    from zipjax.kv import ZipCache
    from zipjax.zipar.compressed import BandRecipe
    from zipjax.zipar.schedule import band_length

    t = _target(target_name)
    chip = aot.on_chip(t)
    rows = cols = 32
    schedule = fixed_window(rows, cols, 7, eol=True)
    config = dataclasses.replace(PUBLISHED["emu3-gen"], num_layers=1)
    kv = ZipCache(high_bits=4, low_bits=2, buffer_len=cols + 1, saliency_ratio=BAND_TARGETS[target_name])
    max_len = cache_length(PROMPT_BUCKET + schedule.num_tokens + 1)
    recipe = BandRecipe(config, kv, 2, max_len, PROMPT_BUCKET + schedule.num_tokens + 1, PROMPT_BUCKET,
                        band_length(schedule, kv.buffer_len))
    cache = jax.eval_shape(recipe, jax.ShapeDtypeStruct((2,), jnp.int32)).replace(prompt=False)
    q_len, d = schedule.queries_per_pass, config.head_dim
    compiled, report = _compile_band_pass(cache, config, q_len, t, chip)
    hlo = compiled.as_text()
    record_property("compile_seconds", round(report.compile_seconds, 2))
    record_property("temp_bytes", report.temp_bytes)
    dequantized = sum(store.slots.size for store in cache.layers[0].stores) * d * 2 * 4  # float32 K and V
    print(f"{target_name} band pass ({q_len} queries, band {cache.band}, {recipe.max_len} slots): compiled in "
          f"{report.compile_seconds:.1f}s, temp {report.temp_bytes} bytes, arguments "
          f"{report.argument_bytes}, a float32 copy of the stores {dequantized}")
    assert CUSTOM_CALL[t.kind] in hlo
    assert report.fits
    assert report.temp_bytes < dequantized / 4


def test_kivi_band_pass_compiles_with_the_multi_query_kernel(record_property):
    """The same Emu3-Gen-shaped pass (one layer, 32x32 codes, guidance, ZipAR lag 7) over KIVI-2's band cache
    (zipjax.zipar.kivi_band) for v5e: the slot-addressed store read by the packed-code kernel's custom call, picked
    by kernel=None for the chip, and temporaries below a quarter of a float32 copy of the store."""
    from zipjax.config import PUBLISHED
    from zipjax.kv import KIVI
    from zipjax.zipar.compressed import band_margin
    from zipjax.zipar.kivi_band import KIVIBandRecipe
    from zipjax.zipar.schedule import band_length

    t = _target("v5e:1x1")
    chip = aot.on_chip(t)
    rows = cols = 32
    schedule = fixed_window(rows, cols, 7, eol=True)
    config = dataclasses.replace(PUBLISHED["emu3-gen"], num_layers=1)
    kv = KIVI(bits=2)
    align, behind = band_margin(kv)
    max_len = cache_length(PROMPT_BUCKET + schedule.num_tokens + 1)
    recipe = KIVIBandRecipe(config, kv, 2, max_len, PROMPT_BUCKET, band_length(schedule, align) + behind)
    cache = jax.eval_shape(recipe, jax.ShapeDtypeStruct((2,), jnp.int32)).replace(prompt=False)
    q_len, d = schedule.queries_per_pass, config.head_dim
    compiled, report = _compile_band_pass(cache, config, q_len, t, chip)
    record_property("compile_seconds", round(report.compile_seconds, 2))
    record_property("temp_bytes", report.temp_bytes)
    dequantized = 2 * config.num_kv_heads * max_len * d * 2 * 4  # float32 K and V of every slot
    print(f"v5e KIVI-2 band pass ({q_len} queries, band {cache.band}, {max_len} slots): compiled in "
          f"{report.compile_seconds:.1f}s, temp {report.temp_bytes} bytes, a float32 copy of the store {dequantized}")
    assert CUSTOM_CALL[t.kind] in compiled.as_text()
    assert report.fits
    assert report.temp_bytes < dequantized / 4


def _compile_band_pass(cache, config, q_len: int, t: aot.Target, chip):
    """One pass of `q_len` queries (2 sequences: guidance) over a band cache, compiled for `t`: its attention, block
    compression and advance."""
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim

    def one_pass(cache, slots, valid, q, k, v):
        out, cache = cache.at(slots, valid).attend(0, q, k, v, None)
        return out, cache.advance(q_len)

    args = (aot.abstract(cache, chip), aot.array((q_len,), jnp.int32, chip), aot.array((q_len,), jnp.bool_, chip),
            aot.array((2, q_len, heads, d), jnp.bfloat16, chip), aot.array((2, q_len, kv_heads, d), jnp.bfloat16, chip),
            aot.array((2, q_len, kv_heads, d), jnp.bfloat16, chip))
    return aot.compile(one_pass, *args, target=t)
