"""The packed-code decode attention kernel against its jnp reference, in interpret mode and with the TPU interpreter.

Segments are built with zipjax.kv's own quantizer (channel-wise keys per block, token- or group-wise values, CST
scales), over bit widths, GQA group sizes, empty slots, left padding and a sliding window; two segments of
different precision merged by log-sum-exp must equal attention over both at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from zipjax.kernels.quantized_attention import dequantize_segment, merge, reference, segment_attention

from zipjax.kv.codec import channel_scale, grouped, pack, quantize


def make_segment(seed: int, bits: int, batch=2, heads=2, blocks=3, block=8, d=16, group=None, cst=True):
    """A quantized segment plus its slots: [batch, heads, blocks * block, ...] arrays as the cache stores them."""
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
    seg = dict(k_codes=pack(k_codes.reshape(*tokens, d), bits), k_step=k_step[:, :, :, 0], k_min=k_min[:, :, :, 0],
               v_codes=pack(v_codes.reshape(*tokens, d), bits), v_step=v_step[..., 0].reshape(*tokens, d // g),
               v_min=v_min[..., 0].reshape(*tokens, d // g),
               v_scale=v_scale[:, :, :, 0] if cst else None)
    slots = jnp.broadcast_to(jnp.arange(blocks * block, dtype=jnp.int32), tokens)
    slots = slots.at[:, 1, -3:].set(-1)  # empty slots at the end of one head's store
    return seg, slots


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("group", [None, 8])
def test_kernel_matches_reference(bits, rows, group):
    seg, slots = make_segment(bits, bits, group=group)
    q = jax.random.normal(jax.random.key(7), (2, 2, rows, 16))
    starts = jnp.array([0, 5], jnp.int32)
    q_slot = jnp.int32(20)  # slots above 20 are in the future
    kw = dict(bits=bits, block=8, group=group)
    ref = reference(q, *seg.values(), slots, q_slot, starts, **kw)
    state = segment_attention(q, *seg.values(), slots, q_slot, starts, interpret=True, **kw)
    err = float(jnp.abs(merge([state]) - ref).max())
    print(f"bits={bits} rows={rows} group={group}: max abs error {err:.2e}")
    assert err < 2e-5


def test_dequantize_segment_matches_the_quantizer():
    seg, _ = make_segment(0, 4, cst=True)
    k, v = dequantize_segment(*seg.values(), bits=4, block=8)
    assert k.shape == v.shape == (2, 2, 24, 16)
    assert bool(jnp.all(jnp.isfinite(k))) and bool(jnp.all(jnp.isfinite(v)))


def test_mixed_precision_segments_merge_exactly():
    """A 4-bit and a 2-bit segment attended separately and merged = one softmax over both sets of tokens."""
    hi, hi_slots = make_segment(1, 4, blocks=2)
    lo, lo_slots = make_segment(2, 2, blocks=3)
    lo_slots = jnp.where(lo_slots >= 0, lo_slots + 16, -1)  # the regular tokens sit after the salient ones
    q = jax.random.normal(jax.random.key(3), (2, 2, 3, 16))
    starts, q_slot = jnp.array([0, 2], jnp.int32), jnp.int32(38)
    states = [segment_attention(q, *hi.values(), hi_slots, q_slot, starts, bits=4, block=8, interpret=True),
              segment_attention(q, *lo.values(), lo_slots, q_slot, starts, bits=2, block=8, interpret=True)]
    k_hi, v_hi = dequantize_segment(*hi.values(), bits=4, block=8)
    k_lo, v_lo = dequantize_segment(*lo.values(), bits=2, block=8)
    k, v = jnp.concatenate([k_hi, k_lo], axis=2), jnp.concatenate([v_hi, v_lo], axis=2)
    slots = jnp.concatenate([hi_slots, lo_slots], axis=2)
    visible = (slots >= 0) & (slots >= starts[:, None, None]) & (slots <= q_slot)
    scores = jnp.where(visible[:, :, None], jnp.einsum("bhgd,bhsd->bhgs", q, k) / 4.0, -1e30)
    expected = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(scores, axis=-1), v)
    np.testing.assert_allclose(merge(states), expected, atol=2e-5)


def test_sliding_window():
    seg, slots = make_segment(4, 4)
    q = jax.random.normal(jax.random.key(5), (2, 2, 2, 16))
    args = (q, *seg.values(), slots, jnp.int32(23), jnp.zeros(2, jnp.int32))
    ref = reference(*args, bits=4, block=8, sliding_window=6)
    out = merge([segment_attention(*args, bits=4, block=8, sliding_window=6, interpret=True)])
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_tpu_interpreter():
    seg, slots = make_segment(6, 4)
    q = jax.random.normal(jax.random.key(8), (2, 2, 2, 16))
    args = (q, *seg.values(), slots, jnp.int32(30), jnp.array([0, 3], jnp.int32))
    ref = reference(*args, bits=4, block=8)
    out = merge([segment_attention(*args, bits=4, block=8, interpret=pltpu.InterpretParams())])
    np.testing.assert_allclose(out, ref, atol=2e-5)
