"""The flash attention kernel (prefill and length-bounded decode) against its jnp reference, and compiled ahead of
time for TPU v5e / v6e (Mosaic) and an H100 (Triton) at real model shapes.

Both kernels run in interpret mode here: the loop kernel (backend "cpu", the Triton kernel's shape) and the TPU grid
kernel (backend "tpu" with interpret=True, and once under the TPU interpreter). Interpret mode costs seconds per
call, so the shapes are small and the blocks too, to cross several blocks anyway.
"""

import ast
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from zipjax.kernels import flash_attention as fa
from zipjax.kernels.common import compiling_for

MIB = 1 << 20
# the two interpreted kernels: the fori_loop kernel (as on GPU) and the TPU grid kernel
KERNELS = {"loop": dict(backend="cpu"), "grid": dict(backend="tpu", interpret=True)}
# an interpreted kernel is a jnp program whose XLA:CPU compile is most of a test's time; unoptimised halves it
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _attend(entry, *args, **options):
    """entry(*args, **options) (a kernel entry point or the reference), compiled without XLA:CPU's optimisations."""
    return jax.jit(functools.partial(entry, **options)).lower(*args).compile(FAST_COMPILE)(*args)


def _case(seed, batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, max_len, head_dim)), dtype)
    return q, k, v, jnp.int32(cursor), jnp.asarray(starts, jnp.int32)


def _seen(q_len, cursor, starts) -> np.ndarray:
    """bool [batch, q_len]: the query sees at least one key (its own slot is not left padding)."""
    return (int(cursor) + np.arange(q_len))[None, :] >= np.asarray(starts)[:, None]


def _errors(out, ref, seen) -> tuple[float, float]:
    """(max |out - ref| on rows that see a key, max |out| on rows that see none)."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    unseen = np.abs(out[~seen]).max(initial=0.0)
    return float(np.abs(out - ref)[seen].max()), float(unseen)


# batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts, window, block_rows, block_k
CASES = {
    "group1_left_padding": (2, 24, 2, 2, 32, 64, 0, [0, 7], None, 16, 16),
    # a second chunk after a first of 23 tokens; 63 rows and 80 slots (neither whole blocks); seq 2 starts inside it
    "group3_second_chunk_window": (3, 21, 6, 2, 32, 80, 23, [0, 5, 30], 12, 16, 32),
    "group4_prefill_window": (2, 30, 8, 2, 32, 96, 0, [3, 0], 8, 32, 16),
    "decode_mostly_empty": (4, 1, 8, 2, 32, 256, 5, [0, 2, 5, 6], None, None, 32),  # seq 3 sees no key yet
    "decode_group3_window": (2, 1, 9, 3, 64, 200, 150, [0, 100], 32, None, 64),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, kernel):
    batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts, window, block_rows, block_k = CASES[name]
    args = _case(0, batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts)
    out = _attend(fa.flash_attention, *args, sliding_window=window, blocks=fa.Blocks(block_rows, block_k),
                  **KERNELS[kernel])
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    error, unseen = _errors(out, _attend(fa.reference, *args, sliding_window=window), _seen(q_len, cursor, starts))
    assert error <= 1e-5
    assert unseen == 0.0  # a left-padding query outputs zeros


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bfloat16(kernel):
    """bf16 in and out; the reference runs in float32 on the same bf16 values."""
    args = _case(1, 2, 20, 8, 2, 128, 256, 10, [0, 12], dtype=jnp.bfloat16)
    out = _attend(fa.flash_attention, *args, sliding_window=16, **KERNELS[kernel])
    assert out.dtype == jnp.bfloat16
    ref = _attend(fa.reference, *(x.astype(jnp.float32) for x in args[:3]), *args[3:], sliding_window=16)
    error, _ = _errors(out, ref, _seen(20, 10, [0, 12]))
    assert error <= 2e-2


def test_tpu_interpreter():
    """The TPU kernel under the interpreter that simulates its DMAs and VMEM (scratch starts as NaN)."""
    args = _case(2, 1, 20, 4, 1, 32, 256, 10, [12])  # 3 query blocks x 2 key blocks
    out = _attend(fa.flash_attention, *args, sliding_window=16, backend="tpu", blocks=fa.Blocks(32, 128),
                  interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
    error, unseen = _errors(out, _attend(fa.reference, *args, sliding_window=16), _seen(20, 10, [12]))
    assert error <= 1e-5 and unseen == 0.0


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_decode_reads_only_the_filled_extent(kernel):
    """NaN in every slot no query may see (past the cursor, before the window, left padding) changes nothing."""
    q, k, v, cursor, starts = _case(3, 2, 1, 8, 2, 32, 256, 70, [0, 60])
    slots = np.arange(256)[None, :]
    hidden = (slots > 70) | (slots <= 70 - 24) | (slots < np.asarray(starts)[:, None])  # [batch, max_len]
    hidden = jnp.asarray(hidden)[:, None, :, None]
    dirty_k, dirty_v = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
    out = _attend(fa.flash_decode, q, dirty_k, dirty_v, cursor, starts, sliding_window=24, blocks=fa.Blocks(k=32),
                  **KERNELS[kernel])
    error, _ = _errors(out, _attend(fa.reference, q, k, v, cursor, starts, sliding_window=24), _seen(1, 70, [0, 60]))
    assert error <= 1e-5


@pytest.mark.parametrize("q_len,cursor,start,window", [
    (1, 0, 0, None), (1, 700, 0, None), (1, 5000, 3000, None), (1, 8191, 0, 1000),  # decode steps
    (1000, 0, 100, None), (1000, 2000, 2100, 300),  # a prompt, and a later chunk with a window
    (1000, 0, 600, None),  # the first query blocks are all left padding
])
def test_tpu_grid_maps_only_visible_key_blocks(q_len, cursor, start, window):
    """The TPU k/v index map over the grid: along each query block's k axis the blocks it names (a DMA whenever
    the index changes) are exactly those holding a slot some row of the block sees, each fetched once. A block of
    left-padding queries only names one block (the pipeline fetches it; pl.when skips its compute)."""
    group, block_rows, block_k, max_len = 4, 512, 512, 8192
    q_blocks = -(-q_len * group // block_rows)
    g = fa.Tiling(group, q_len, block_rows, block_k, max_len // block_k, window, max_len)
    named = np.asarray(fa._key_block(jnp.arange(q_blocks)[:, None], jnp.arange(g.k_blocks)[None, :],
                                     jnp.int32(cursor), jnp.int32(start), g))  # [q_blocks, k_blocks]
    slots, queries = np.arange(max_len), cursor + np.arange(q_len)[:, None]
    sees = (slots >= start) & (slots <= queries)  # [q_len, max_len], as in the reference
    if window is not None:
        sees &= queries - slots < window
    for i, row in enumerate(named):
        block_queries = np.arange(i * block_rows, min((i + 1) * block_rows, q_len * group)) // group
        seen = np.flatnonzero(sees[block_queries].any(axis=0)) // block_k
        fetched = [b for j, b in enumerate(row) if j == 0 or b != row[j - 1]]
        assert fetched == (sorted(set(seen.tolist())) or fetched[:1]), i


def test_platform_choice_and_argument_errors():
    args = _case(4, 1, 3, 4, 2, 16, 32, 0, [0])
    np.testing.assert_array_equal(np.asarray(fa.flash_attention(*args)),  # platform() is "cpu" here
                                  np.asarray(fa.flash_attention(*args, backend="cpu")))
    q, k, v, cursor, starts = args
    with pytest.raises(ValueError, match=r"k: .*\(1, 2, 32, 8\)"):
        fa.flash_attention(q, k[..., :8], v, cursor, starts)
    with pytest.raises(ValueError, match=r"starts: .*\(2,\)"):
        fa.flash_attention(q, k, v, cursor, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="interpret"):
        fa.flash_attention(*args, backend="cpu", interpret=False)
    with pytest.raises(ValueError, match="backend"):
        fa.flash_attention(*args, backend="metal")
    with pytest.raises(ValueError, match=r"q: a decode step .*\(1, 3, 4, 16\)"):
        fa.flash_decode(*args)
    with pytest.raises(ValueError, match=r"q: a prefill .*\(1, 1, 4, 16\)"):
        fa.flash_prefill(q[:, :1], k, v, cursor, starts)
    with compiling_for("tpu"), pytest.raises(ValueError, match="Mosaic"):
        fa.flash_attention(*args, blocks=fa.Blocks(k=64))  # checked before anything is traced for the TPU


def test_imports_only_jax_numpy_stdlib_and_the_kernels_leaf():
    tree = ast.parse(Path(fa.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {*sys.stdlib_module_names, "__future__", "jax", "numpy"}
    assert {m for m in modules if m.split(".")[0] not in allowed} == {"zipjax.kernels.common"}


# name: (batch, q_len, heads, kv_heads, head_dim, max_len, sliding_window)
MODELS = {
    "llama3_8b_prefill_8k": (1, 8192, 32, 8, 128, 8192, None),
    "llama3_8b_decode_8k": (8, 1, 32, 8, 128, 8192, None),
    "mistral_7b_prefill_32k": (1, 32768, 32, 8, 128, 32768, 4096),
    "smollm2_135m_prefill_2k": (1, 2048, 9, 3, 64, 2048, None),
    "smollm2_135m_decode_2k": (8, 1, 9, 3, 64, 2048, None),
}
COMPILES = [("v5e:1x1", "llama3_8b_prefill_8k"), ("v5e:1x1", "mistral_7b_prefill_32k"),
            ("v6e:1x1", "llama3_8b_decode_8k"), ("v6e:1x1", "smollm2_135m_prefill_2k"),
            ("h100", "llama3_8b_prefill_8k"), ("h100", "smollm2_135m_decode_2k")]


@functools.cache
def _target(name):
    from zipjax import aot

    return aot.target(name)


@pytest.mark.parametrize("target,model", COMPILES)
def test_compiles_ahead_of_time(target, model, record_property):
    from zipjax import aot

    batch, q_len, heads, kv_heads, head_dim, max_len, window = MODELS[model]
    t = _target(target)
    on_chip = aot.on_chip(t)
    cache = aot.array((batch, kv_heads, max_len, head_dim), jnp.bfloat16, on_chip)
    args = [aot.array((batch, q_len, heads, head_dim), jnp.bfloat16, on_chip), cache, cache,
            aot.array((), jnp.int32, on_chip), aot.array((batch,), jnp.int32, on_chip)]
    compiled, report = aot.compile(functools.partial(fa.flash_attention, sliding_window=window), *args, target=t)
    record_property("compile_seconds", round(report.compile_seconds, 2))
    record_property("temp_bytes", report.temp_bytes)
    text = compiled.as_text()
    assert ("tpu_custom_call" in text) if t.kind == "tpu" else ("__gpu$xla.gpu.triton" in text)
    # no [q_len, max_len] score matrix (2 GiB per head at 8k), at most one relaid-out copy of q or of the output
    assert report.temp_bytes <= batch * q_len * heads * head_dim * 2 + 16 * MIB
    if model == "llama3_8b_prefill_8k":
        assert report.temp_bytes < 256 * MIB
    if t.kind == "tpu" and q_len > 1 and window is None:  # the kernel's cost estimate: about half the square
        square = 4 * batch * heads * head_dim * q_len * max_len
        assert 0.5 * square < report.flops < 0.7 * square


# batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts, window, block_k: 4 sequence shards of the cache
SHARDED_CASES = {
    # a decode step: sequence 1 left-padded past shard 0, the window reaching back into shard 2 only
    "decode_window": (2, 1, 4, 2, 16, 64, 50, [0, 21], 9, 8),
    # a prefill chunk spanning shards 1 and 2, queries past shard 1's end; shards of 12 slots in blocks of 8 (padded)
    "prefill_chunk_padded_blocks": (2, 7, 6, 2, 16, 48, 10, [3, 14], 6, 8),
}


@pytest.mark.parametrize("name", list(SHARDED_CASES))
def test_sequence_sharded_kernel_and_jnp_path_match_the_reference(name):
    """A cache split by sequence over a 4-way "model" axis of a 2x4 CPU mesh (2 KV heads: the axis does not divide
    them): the flash kernel (interpreted) and `chunked_attention` each run per shard over the shard's slots, and
    their partial states combined across the axis equal attention over the whole cache."""
    from jax.sharding import NamedSharding, PartitionSpec

    from zipjax.attention import chunked_attention_state
    from zipjax.sharding import make_mesh, per_shard, sequence_split

    batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts, window, block_k = SHARDED_CASES[name]
    q, k, v, cursor, starts = _case(3, batch, q_len, heads, kv_heads, head_dim, max_len, cursor, starts)
    mesh = make_mesh(data=2, model=4)
    k, v = (jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, "model"))) for x in (k, v))
    ref = _attend(fa.reference, q, k, v, cursor, starts, sliding_window=window)
    partials = {"flash": functools.partial(fa.flash_attention_state, backend="cpu", blocks=fa.Blocks(k=block_k)),
                "jnp": functools.partial(chunked_attention_state, block_k=block_k)}
    if q_len == 1:  # the TPU grid kernel's state outputs too (lane-replicated max and sum)
        partials["grid"] = functools.partial(fa.flash_attention_state, backend="tpu", interpret=True,
                                             blocks=fa.Blocks(k=block_k))
    with jax.set_mesh(mesh):
        assert sequence_split(k.shape)
        for label, partial in partials.items():
            attend = functools.partial(per_shard, None, partial=functools.partial(partial, sliding_window=window))
            out = jax.jit(attend).lower(q, k, v, cursor, starts).compile(FAST_COMPILE)(q, k, v, cursor, starts)
            error, unseen = _errors(out, ref, _seen(q_len, int(cursor), starts))
            print(f"{name} {label}: max abs error {error:.1e}")
            assert error <= 1e-5 and unseen == 0.0, label
