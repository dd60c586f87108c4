"""The packed-code decode attention kernel against its jnp reference, in interpret mode and with the TPU interpreter.

Segments are built with zipjax.kv's own quantizer (channel-wise keys per block, token- or group-wise values, CST
scales), over bit widths, GQA group sizes (G = 1, 3, 4), empty slots, left padding and a sliding window; two
segments of different precision merged by log-sum-exp must equal attention over both at once. Both forms of the
kernel run interpreted: "tpu" (Mosaic's: tokens on lanes, aligned tiles with a partial last one, the state
accumulated over the tiles, float16 scales as uint16 bits) and "gpu" (Triton's: row-major tiles, the last window
shifted back inside the segment, one state per tile). Blocks of 60 and 300 tokens (a streaming window's split, a
prompt's salient count) make tiles cross block boundaries. Compiling for real chips is tests/test_aot_quantized.py.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from zipjax.kernels.common import compiling_for
from zipjax.kernels.quantized_attention import (
    PackedSegment,
    choose_tiling,
    decode_float16_bits,
    dequantize_segment,
    merge,
    reference,
    segment_attention,
)

from zipjax.kv.codec import channel_scale, grouped, pack, quantize

SEGMENT = ("k_codes", "k_step", "k_min", "v_codes", "v_step", "v_min", "v_scale")  # segment_attention's order


def make_segment(seed: int, bits: int, **shape) -> tuple[dict, jax.Array]:
    """A quantized segment plus its slots: [batch, heads, blocks * block, ...] arrays as the cache stores them, in
    segment_attention's argument order. shape: batch, heads, blocks, block, d, group, cst."""
    *arrays, slots = _segment_arrays(seed, bits=bits, **shape)
    return dict(zip(SEGMENT, arrays, strict=True)), slots


@functools.partial(jax.jit, static_argnames=("bits", "batch", "heads", "blocks", "block", "d", "group", "cst"))
def _segment_arrays(seed, bits: int, batch=2, heads=2, blocks=3, block=8, d=16, group=None, cst=True):
    """make_segment's arrays as a tuple (jitted: one compilation per shape instead of one per operation)."""
    key_k, key_v = jax.random.split(jax.random.key(seed))
    shape = (batch, heads, blocks, block, d)
    k = jax.random.normal(key_k, shape) * jnp.linspace(0.5, 4.0, d)
    v = jax.random.normal(key_v, shape)
    k_codes, k_step, k_min = quantize(k, bits, axis=3)  # per block, per channel: [b, h, blocks, 1, d]
    v_scale = channel_scale(v, axis=3) if cst else None
    v_div = v / v_scale.astype(jnp.float32) if cst else v
    g = group or d
    v_codes, v_step, v_min = quantize(grouped(v_div, g), bits, axis=-1)
    tokens = (batch, heads, blocks * block)
    slots = jnp.broadcast_to(jnp.arange(blocks * block, dtype=jnp.int32), tokens)
    slots = slots.at[:, 1, -3:].set(-1)  # empty slots at the end of one head's store
    return (pack(k_codes.reshape(*tokens, d), bits), k_step[:, :, :, 0], k_min[:, :, :, 0],
            pack(v_codes.reshape(*tokens, d), bits), v_step[..., 0].reshape(*tokens, d // g),
            v_min[..., 0].reshape(*tokens, d // g), v_scale[:, :, :, 0] if cst else None, slots)


jitted_reference = jax.jit(reference, static_argnames=("bits", "block", "group", "sliding_window"))


def kernel_error(backend, bits, rows, group=None, blocks=3, block=8, d=16, cst=True, **kw) -> float:
    """Max abs difference between the merged kernel states and the reference; slots past 4 tokens before the end
    are in the future, the second sequence starts at slot 5."""
    seg, slots = make_segment(bits, bits, blocks=blocks, block=block, d=d, group=group, cst=cst)
    q = jax.random.normal(jax.random.key(7), (2, 2, rows, d))
    args = (q, PackedSegment(*seg.values(), slots), jnp.int32(blocks * block - 4), jnp.array([0, 5], jnp.int32))
    settings = dict(bits=bits, block=block, group=group, **kw)
    state = segment_attention(*args, backend=backend, interpret=True, **settings)
    err = float(jnp.abs(merge([state]) - jitted_reference(*args, **settings)).max())
    print(f"{backend} bits={bits} G={rows} group={group} {blocks}x{block} d={d} cst={cst}: max abs error {err:.2e}")
    return err


@pytest.mark.parametrize("backend, bits, rows, group, cst", [
    ("tpu", 4, 1, None, True), ("tpu", 2, 3, 8, True), ("tpu", 8, 3, None, False),
    ("gpu", 4, 3, 8, True), ("gpu", 2, 1, None, False), ("gpu", 8, 4, 8, True)])
def test_kernel_matches_reference(backend, bits, rows, group, cst):
    assert kernel_error(backend, bits, rows, group, cst=cst) < 2e-5


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits, group, blocks, block, cst", [(4, None, 1, 300, True), (2, 16, 5, 60, False)])
def test_non_power_of_two_blocks(backend, bits, group, blocks, block, cst):
    """A prompt-like single block of 300 tokens and five streaming blocks of 60 at G=3: tiles are 128-multiples
    (TPU) or powers of two (GPU), so they cross block boundaries and the last one is partial."""
    tiling = choose_tiling(backend, bits, 32, group or 32, block, blocks * block, 3, cst, compiled=False)
    assert tiling.tiles > 1 and (tiling.window > 1 or blocks == 1)
    assert kernel_error(backend, bits, 3, group, blocks=blocks, block=block, d=32, cst=cst) < 2e-5


def test_float16_bits_decode_exactly():
    """Mosaic cannot load float16, so on TPU the scales travel as uint16 bits: every pattern (zeros, subnormals,
    normals, infinities, NaN) decodes to float16's own float32 value."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    decoded = np.asarray(decode_float16_bits(jnp.asarray(bits, jnp.int32)))
    np.testing.assert_array_equal(decoded, bits.view(np.float16).astype(np.float32))


def test_dequantize_segment_matches_the_quantizer():
    seg, _ = make_segment(0, 4, cst=True)
    k, v = dequantize_segment(PackedSegment(*seg.values(), None), bits=4, block=8)
    assert k.shape == v.shape == (2, 2, 24, 16)
    assert bool(jnp.all(jnp.isfinite(k))) and bool(jnp.all(jnp.isfinite(v)))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_mixed_precision_segments_merge_exactly(backend):
    """A 4-bit and a 2-bit segment attended separately and merged = one softmax over both sets of tokens."""
    hi, hi_slots = make_segment(1, 4, blocks=2)
    lo, lo_slots = make_segment(2, 2, blocks=3)
    lo_slots = jnp.where(lo_slots >= 0, lo_slots + 16, -1)  # the regular tokens sit after the salient ones
    q = jax.random.normal(jax.random.key(3), (2, 2, 3, 16))
    starts, q_slot = jnp.array([0, 2], jnp.int32), jnp.int32(38)
    kw = dict(block=8, backend=backend, interpret=True)
    states = [segment_attention(q, PackedSegment(*hi.values(), hi_slots), q_slot, starts, bits=4, **kw),
              segment_attention(q, PackedSegment(*lo.values(), lo_slots), q_slot, starts, bits=2, **kw)]
    k_hi, v_hi = dequantize_segment(PackedSegment(*hi.values(), hi_slots), bits=4, block=8)
    k_lo, v_lo = dequantize_segment(PackedSegment(*lo.values(), lo_slots), bits=2, block=8)
    k, v = jnp.concatenate([k_hi, k_lo], axis=2), jnp.concatenate([v_hi, v_lo], axis=2)
    slots = jnp.concatenate([hi_slots, lo_slots], axis=2)
    visible = (slots >= 0) & (slots >= starts[:, None, None]) & (slots <= q_slot)
    scores = jnp.where(visible[:, :, None], jnp.einsum("bhgd,bhsd->bhgs", q, k) / 4.0, -1e30)
    expected = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(scores, axis=-1), v)
    np.testing.assert_allclose(merge(states), expected, atol=2e-5)


def test_sliding_window():
    seg, slots = make_segment(4, 4)
    q = jax.random.normal(jax.random.key(5), (2, 2, 2, 16))
    args = (q, PackedSegment(*seg.values(), slots), jnp.int32(23), jnp.zeros(2, jnp.int32))
    ref = jitted_reference(*args, bits=4, block=8, sliding_window=6)
    out = merge([segment_attention(*args, bits=4, block=8, sliding_window=6, interpret=True)])
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_tpu_interpreter():
    """Mosaic's form under the TPU interpreter (it models VMEM, the scratch and the sequential tile axis)."""
    seg, slots = make_segment(6, 4, blocks=5, block=60, d=32)
    q = jax.random.normal(jax.random.key(8), (2, 2, 2, 32))
    args = (q, PackedSegment(*seg.values(), slots), jnp.int32(290), jnp.array([0, 3], jnp.int32))
    ref = jitted_reference(*args, bits=4, block=60)
    out = merge([segment_attention(*args, bits=4, block=60, interpret=pltpu.InterpretParams())])
    np.testing.assert_allclose(out, ref, atol=2e-5)


def _pallas_call(jaxpr):
    """The pallas_call equation of a jaxpr, looking into nested jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            return eqn
        for param in eqn.params.values():
            found = _pallas_call(param.jaxpr) if hasattr(param, "jaxpr") else None
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("platform, params, interpret", [
    ("cpu", pltpu.CompilerParams, True), ("tpu", pltpu.CompilerParams, False), ("gpu", plt.CompilerParams, False)])
def test_backend_follows_the_platform_being_traced_for(platform, params, interpret):
    """segment_attention (backend=None) asks zipjax.kernels.common.platform(): Mosaic on tpu, Triton on gpu (explicit
    compiler parameters, else jax would pick Mosaic GPU), the TPU form interpreted on cpu. Traced only."""
    seg, slots = make_segment(0, 4)
    args = (jnp.ones((2, 2, 1, 16)), PackedSegment(*seg.values(), slots), jnp.int32(20), jnp.zeros(2, jnp.int32))
    with contextlib.nullcontext() if platform == "cpu" else compiling_for(platform):
        jaxpr = jax.make_jaxpr(lambda *a: segment_attention(*a, bits=4, block=8))(*args)
    eqn = _pallas_call(jaxpr.jaxpr)
    assert isinstance(eqn.params["compiler_params"], params)
    assert bool(eqn.params["interpret"]) is interpret


@pytest.mark.parametrize("name, change, message", [
    ("q", lambda a: {**a, "q": a["q"][0]}, "q must be float"),
    ("k_codes", lambda a: {**a, "k_codes": a["k_codes"][:, :, :23]}, "k_codes must be"),
    ("v_codes", lambda a: {**a, "v_codes": a["v_codes"].astype(jnp.int32)}, "v_codes must be uint8"),
    ("k_step", lambda a: {**a, "k_step": a["k_step"][:, :, :2]}, "k_step must be float of shape (2, 2, 3, 16)"),
    ("v_min", lambda a: {**a, "v_min": a["v_min"][..., 0]}, "v_min must be float of shape (2, 2, 24, 1)"),
    ("slots", lambda a: {**a, "slots": a["slots"].astype(jnp.float32)}, "slots must be int"),
    ("starts", lambda a: {**a, "starts": a["starts"][:1]}, "starts must be int of shape (2,)"),
])
def test_wrong_shapes_are_named(name, change, message):
    seg, slots = make_segment(0, 4)
    args = dict(q=jnp.ones((2, 2, 1, 16)), **seg, slots=slots, q_slot=jnp.int32(20), starts=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        a = change(args)
        segment = PackedSegment(*(a[name] for name in SEGMENT), a["slots"])
        segment_attention(a["q"], segment, a["q_slot"], a["starts"], bits=4, block=8, interpret=True)


@pytest.mark.parametrize("model", [4, 2], ids=["sequence_split", "heads_split"])
def test_kernel_per_shard_of_a_mesh_matches_the_reference(model):
    """zipjax.sharding.states_per_shard on a 1 x model CPU mesh (conftest's devices): 2 KV heads over a 4-way
    "model" axis split the segment by tokens (each shard's whole blocks; the shards' states combined across the
    axis), over a 2-way axis by KV head. Left padding, empty slots and a sliding window."""
    from zipjax.sharding import make_mesh, states_per_shard

    seg, slots = make_segment(6, 4, blocks=4, block=8, group=8)
    q = jax.random.normal(jax.random.key(8), (2, 2, 3, 16))
    q_slot, starts = jnp.int32(29), jnp.array([0, 11], jnp.int32)
    settings = dict(bits=4, block=8, group=8, sliding_window=13)
    ref = jitted_reference(q, PackedSegment(*seg.values(), slots), q_slot, starts, **settings)
    kernel = functools.partial(segment_attention, backend="tpu", interpret=True, **settings)
    args = (q, PackedSegment(*seg.values(), slots), q_slot, starts)
    with jax.set_mesh(make_mesh(data=1, model=model, devices=jax.devices()[:model])):
        attend = jax.jit(lambda q, arrays, q_slot, starts: states_per_shard(kernel, q, arrays, q_slot, starts))
        state = attend.lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
    assert state[0].shape == (2, 2, 1, 3)  # one state per (sequence, KV head): the shards' combined, or its own
    np.testing.assert_allclose(merge([state]), ref, atol=2e-5)


# Several queries per sequence (zipjax.kernels.quantized_multi_query): ZipAR's rows and SJD's drafts, each at its own
# slot; out and log-sum-exp per query and head against the jnp reference, both kernel forms interpreted.

def multi_query_case(seed: int, bits: int, heads: int, queries: int, **shape):
    """A segment of 2 KV heads (empty slots at one head's end) and `queries` queries per sequence at scattered slots:
    the second sequence starts at slot 5 and its first query (slot 3) sees nothing."""
    seg, slots = make_segment(seed, bits, **shape)
    length = slots.shape[-1]
    q = jax.random.normal(jax.random.key(seed + 1), (2, queries, heads, shape.get("d", 16)))
    q_slots = jnp.stack([jnp.linspace(2, length + 3, queries), jnp.linspace(3, length - 1, queries)]).astype(jnp.int32)
    return q, PackedSegment(*seg.values(), slots), q_slots, jnp.array([0, 5], jnp.int32)


def multi_query_error(backend, bits, heads, queries, group=None, sliding_window=None, **shape) -> float:
    from zipjax.kernels.quantized_multi_query import multi_query_attention, reference, state_output

    args = multi_query_case(bits + heads, bits, heads, queries, group=group, **shape)
    settings = dict(bits=bits, block=shape.get("block", 8), group=group, sliding_window=sliding_window)
    out, lse = state_output(multi_query_attention(*args, backend=backend, interpret=True, **settings), queries)
    ref_out, ref_lse = jax.jit(reference, static_argnames=tuple(settings))(*args, **settings)
    assert out.shape == ref_out.shape == (*args[0].shape[:3], args[0].shape[3]) and lse.shape == out.shape[:3]
    assert float(ref_lse[1, 0].max()) < -1e30 and float(jnp.abs(out[1, 0]).max()) == 0  # sees nothing: weighs 0
    seen = ref_lse > -1e30
    err = max(float(jnp.abs(out - ref_out).max()), float(jnp.abs(jnp.where(seen, lse - ref_lse, 0)).max()))
    print(f"multi-query {backend} bits={bits} heads={heads} Q={queries} group={group} window={sliding_window} "
          f"{shape}: max abs error {err:.2e}")
    return err


@pytest.mark.parametrize("backend, bits, heads, queries, group, cst, window", [
    ("tpu", 4, 8, 5, None, True, None), ("tpu", 2, 2, 3, 8, False, 7), ("tpu", 8, 6, 4, 8, True, None),
    ("gpu", 4, 8, 5, 8, True, None), ("gpu", 2, 6, 3, None, False, 7)])
def test_multi_query_kernel_matches_reference(backend, bits, heads, queries, group, cst, window):
    """G = 1, 3, 4 query heads per KV head, 3 to 5 queries per sequence (rows Q * G, padded to a power of two on
    GPU), a sliding window, empty slots, a sequence start and a query before it."""
    assert multi_query_error(backend, bits, heads, queries, group, window, cst=cst) < 2e-5


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_multi_query_tiles_cross_blocks(backend):
    """Five streaming blocks of 60 tokens, d = 32, 13 queries at G = 2 (a ZipAR window's rows): several tiles, each
    meeting several blocks, a partial last one."""
    assert multi_query_error(backend, 4, 4, 13, 16, blocks=5, block=60, d=32, cst=True) < 2e-5


def test_multi_query_with_one_query_is_the_decode_kernel():
    """Q = 1 with every query at the same slot equals the one-query kernel `segment_attention`, merged."""
    from zipjax.kernels.quantized_multi_query import multi_query_attention, state_output

    q, segment, _, starts = multi_query_case(3, 4, 6, 1)
    q_slot = jnp.int32(17)
    state = multi_query_attention(q, segment, jnp.full((2, 1), q_slot), starts, bits=4, block=8, interpret=True)
    decode = merge([segment_attention(q[:, 0].reshape(2, 2, 3, 16), segment, q_slot, starts, bits=4, block=8,
                                      interpret=True)])
    np.testing.assert_allclose(state_output(state, 1)[0][:, 0], decode.reshape(2, 6, 16), atol=1e-6)


def test_multi_query_merged_with_a_dense_band_is_attention_over_both():
    """The compressed rows by the kernel, the active band (dense keys at slots after them) in jnp, merged by
    `merge_lse` = one softmax over both sets of keys."""
    from zipjax.kernels.quantized_multi_query import merge_lse, multi_query

    q, segment, q_slots, starts = multi_query_case(5, 4, 4, 3)
    q_slots = q_slots + 6  # queries inside the band
    k_seg, v_seg = dequantize_segment(segment, bits=4, block=8)
    band = 8
    k_band, v_band = (jax.random.normal(jax.random.key(i), (2, 2, band, 16)) for i in (11, 12))
    band_slots = jnp.broadcast_to(24 + jnp.arange(band), (2, 2, band))
    parts = [multi_query(q, segment, q_slots, starts, bits=4, block=8, kernel=True)]

    def attend(k, v, slots):
        visible = (slots[:, :, None, :] >= jnp.maximum(starts, 0)[:, None, None, None]) & (slots[:, :, None, :] >= 0)
        visible &= slots[:, :, None, :] <= q_slots[:, None, :, None]  # [batch, kv_heads, queries, keys]
        scores = jnp.einsum("bqkgd,bksd->bkgqs", q.reshape(2, 3, 2, 2, 16), k) / 4.0
        scores = jnp.where(visible[:, :, None], scores, -1e30)
        top = scores.max(-1, keepdims=True)
        p = jnp.where(visible[:, :, None], jnp.exp(scores - top), 0.0)
        out = jnp.einsum("bkgqs,bksd->bqkgd", p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30), v)
        lse = (top + jnp.log(jnp.maximum(p.sum(-1, keepdims=True), 1e-30)))[..., 0].transpose(0, 3, 1, 2)
        return out.reshape(2, 3, 4, 16), jnp.where(lse > -1e29, lse, -1e30).reshape(2, 3, 4)

    parts.append(attend(k_band, v_band, band_slots))
    out, _ = merge_lse(parts)
    expected, _ = attend(jnp.concatenate([k_seg, k_band], 2), jnp.concatenate([v_seg, v_band], 2),
                         jnp.concatenate([segment.slots, band_slots], 2))
    np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("platform, kernel, runs_kernel", [
    ("cpu", None, False), ("cpu", False, False), ("cpu", True, True), ("tpu", None, True), ("tpu", False, False),
    ("gpu", None, True)])
def test_multi_query_follows_the_kernel_policy(platform, kernel, runs_kernel):
    """`multi_query(kernel=...)` by zipjax.platform.use_kernel: the kernel on TPU / GPU (or forced), jnp on a CPU
    (or forced). Traced only."""
    from zipjax.kernels.quantized_multi_query import multi_query

    args = multi_query_case(0, 4, 4, 3)
    with contextlib.nullcontext() if platform == "cpu" else compiling_for(platform):
        jaxpr = jax.make_jaxpr(lambda *a: multi_query(*a, bits=4, block=8, kernel=kernel))(*args)
    assert (_pallas_call(jaxpr.jaxpr) is not None) is runs_kernel


@pytest.mark.parametrize("change, message", [
    (lambda q, s, qs, st: (q[0], s, qs, st), "q must be float [batch, queries, heads, head_dim]"),
    (lambda q, s, qs, st: (q[:, :, :3], s, qs, st), "q's 3 heads must be a multiple of the segment's KV heads"),
    (lambda q, s, qs, st: (q, s, qs[:, :2], st), "q_slots must be int of shape (2, 3)"),
    (lambda q, s, qs, st: (q, s, qs.astype(jnp.float32), st), "q_slots must be int"),
    (lambda q, s, qs, st: (q, s._replace(k_step=s.k_step[:, :, :2]), qs, st), "k_step must be float of shape"),
    (lambda q, s, qs, st: (q, s, qs, st[:1]), "starts must be int of shape (2,)"),
])
@pytest.mark.parametrize("kernel", [True, False])
def test_multi_query_wrong_inputs_are_named(change, message, kernel):
    from zipjax.kernels.quantized_multi_query import multi_query

    args = change(*multi_query_case(0, 4, 4, 3))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        multi_query(*args, bits=4, block=8, kernel=kernel)


def test_merge_lse_weighs_parts_that_saw_nothing_zero():
    """A part whose queries saw no key (out 0, lse MASK_VALUE) changes nothing; all parts empty give 0, finite."""
    from zipjax.kernels.common import MASK_VALUE
    from zipjax.kernels.quantized_multi_query import merge_lse

    out = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    lse = jax.random.normal(jax.random.key(1), (2, 3, 4))
    empty = (jnp.zeros_like(out), jnp.full_like(lse, MASK_VALUE))
    merged, merged_lse = merge_lse([(out, lse), empty])
    np.testing.assert_allclose(merged, out, rtol=1e-6)
    np.testing.assert_allclose(merged_lse, lse, rtol=1e-6)
    nothing, nothing_lse = merge_lse([empty, empty])
    assert float(jnp.abs(nothing).max()) == 0 and bool(jnp.all(jnp.isfinite(nothing_lse)))
