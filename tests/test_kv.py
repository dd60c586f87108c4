"""Quantized KV caches: packing and quantizers, ZipCache's saliency and ratio arithmetic, the cache pytree.

The model-level checks run on the shipped stdlib-llama checkpoint (trained weights, 2 KV heads of 32 channels):
attention of a trained model has real salient tokens, which random weights lack.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import has_primitive, teacher_forced

import zipjax
from zipjax import kv
from zipjax.errors import ZipjaxError
from zipjax.harness.kv_analysis import prompt_queries_keys
from zipjax.kv import QuantizedKVCache
from zipjax.kv.codec import dequantize, fake_quantize, pack, quantize, unpack
from zipjax.kv.dense import KVCache
from zipjax.kv.ratio import granularity_ratio, paper_ratio
from zipjax.kv.saliency import (
    accumulated_score,
    attention_probs,
    normalized_score,
    prompt_saliency,
)

ROOT = Path(__file__).resolve().parents[1]


def _normal(seed: int, *shape: int) -> jax.Array:
    """float32 normal samples drawn by numpy (jax.random.normal compiles for seconds on CPU, once per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture(scope="module")
def trained(stdlib_llama):
    return stdlib_llama


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = jnp.asarray(np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 64)), jnp.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantization_error_is_at_most_half_a_step(bits, axis):
    x = _normal(0, 4, 50, 64) * jnp.linspace(0.1, 30, 64)
    codes, step, minimum = quantize(x, bits, axis=axis)
    assert step.dtype == minimum.dtype == jnp.float16
    err = jnp.abs(dequantize(codes, step, minimum) - x)
    bound = step.astype(jnp.float32) / 2
    assert bool(jnp.all(err <= bound * (1 + 1e-3) + 1e-6)), float(jnp.max(err - bound))


def test_constant_group_is_exact_not_nan():
    x = jnp.full((2, 8), 3.25)
    codes, step, minimum = quantize(x, 2, axis=-1)
    np.testing.assert_array_equal(dequantize(codes, step, minimum), x)


def test_padding_is_left_out_of_the_statistics():
    x = jnp.array([[0.0, 1.0, 2.0, 3.0, 1000.0]])
    valid = jnp.array([[True, True, True, True, False]])
    codes, step, minimum = quantize(x, 2, axis=-1, valid=valid)  # 2 bits over [0, 3]: step 1, exact
    np.testing.assert_allclose(dequantize(codes, step, minimum)[0, :4], [0.0, 1.0, 2.0, 3.0], atol=1e-3)


def test_error_ordering_with_planted_channel_outliers():
    """Values with 2% of channels 20x larger: small groups <= channel-separable << token-wise."""
    x = _normal(0, 8, 256, 128)
    x = x * jnp.ones(128).at[jnp.arange(0, 128, 50)].set(20.0)
    rms = {name: float(jnp.sqrt(jnp.mean((fake_quantize(x, 2, mode, group) - x) ** 2)))
           for name, mode, group in [("token", "token", None), ("group8", "token", 8), ("group32", "token", 32),
                                     ("cst", "cst", None)]}
    print("2-bit RMS error:", {k: round(v, 3) for k, v in rms.items()})
    assert rms["group8"] <= rms["cst"] < 0.5 * rms["token"]
    assert rms["group32"] < 0.5 * rms["token"]


def test_paper_compression_ratios():
    """Appendix A's granularity ratios and the mixed-precision ratios of the result tables (notes §2.10)."""
    assert [round(granularity_ratio(k), 3) for k in ("group", "token", "zipcache")] == [3.2, 3.992, 3.995]
    published = {(0.6, 840): 4.98, (0.7, 840): 4.69, (0.6, 120): 4.94, (0.8, 120): 4.39, (0.8, 3072): 4.43,
                 (0.286, 840): 6.18}
    for (r, length), ratio in published.items():
        assert abs(paper_ratio(r, length) - ratio) <= 0.02, (r, length, paper_ratio(r, length))


def test_normalized_score_by_hand():
    """3 queries, 3 keys, causal. Column sums 1.5, 1.0, 0.5 (accumulated: key 0 wins); seen by 3, 2, 1 queries,
    so the normalized scores are 0.5, 0.5, 0.5 for this uniform matrix, and key 2 wins once it takes more mass."""
    probs = jnp.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.0, 0.2, 0.8]])[None, None, None]  # [1, 1, 1, 3, 3]
    slots = jnp.arange(3)
    valid = jnp.ones((1, 3), bool)
    norm = normalized_score(probs, slots[None], slots, valid, "probe")
    np.testing.assert_allclose(norm[0, 0], [1.5 / 3, 0.7 / 2, 0.8 / 1], rtol=1e-6)
    acc = accumulated_score(probs, valid)
    np.testing.assert_allclose(acc[0, 0], [1.5, 0.7, 0.8], rtol=1e-6)
    assert int(jnp.argmax(acc[0, 0])) == 0 and int(jnp.argmax(norm[0, 0])) == 2


def test_attention_probs_are_causal_and_sum_to_one():
    q, k = _normal(1, 2, 6, 4, 8), _normal(2, 2, 6, 2, 8)
    slots = jnp.arange(6)
    valid = slots[None] >= jnp.array([[0], [2]])
    probs = attention_probs(q, k, jnp.broadcast_to(slots, (2, 6)), slots, valid)  # [2, 2, 2, 6, 6]
    assert probs.shape == (2, 2, 2, 6, 6)
    np.testing.assert_allclose(probs[1, :, :, 2:].sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(probs[0, 0, 0], 1)).max()) == 0.0
    assert float(jnp.abs(probs[1, ..., :2]).max()) == 0.0  # padding keys receive nothing


def _prompt_qk(model, length: int, layer: int = 1):
    """Layer `layer`'s queries and keys of a real text prompt (this repository's source) through the trained model."""
    ids = model.tokenizer.encode((ROOT / "zipjax" / "generate.py").read_text())[:length]
    return prompt_queries_keys(model, [ids])[layer]


def test_probe_saliency_ranks_like_the_exact_score(trained):
    """On trained attention the probe estimate selects most of the exact salient set (overlap printed)."""
    length = 256
    q, k = _prompt_qk(trained, length)
    starts = jnp.zeros((1,), jnp.int32)
    exact = prompt_saliency(q, k, starts, method="exact", probe_ratio=0.1, normalize="probe", key=jax.random.key(0))
    keep = int(0.4 * length)
    top_exact = set(np.asarray(jnp.argsort(-exact[0, 0])[:keep]).tolist())
    overlaps = {}
    for normalize in ("probe", "code"):
        probe = prompt_saliency(q, k, starts, method="probe", probe_ratio=0.1, normalize=normalize,
                                key=jax.random.key(0))
        top = set(np.asarray(jnp.argsort(-probe[0, 0])[:keep]).tolist())
        overlaps[normalize] = len(top & top_exact) / keep
    chance = keep / length
    print(f"top-40% overlap with the exact normalized score: {overlaps} (chance {chance:.2f})")
    assert max(overlaps.values()) > chance + 0.2


# --- the cache -------------------------------------------------------------------------------------------------


def test_bad_configurations_are_refused_when_built(trained):
    with pytest.raises(ZipjaxError, match="bit width"):
        kv.ZipCache(high_bits=3)
    with pytest.raises(ZipjaxError, match="saliency_ratio"):
        kv.ZipCache(saliency_ratio=0.0)
    with pytest.raises(ZipjaxError, match="saliency_ratio"):
        kv.ZipCache(saliency_ratio=1.5)
    with pytest.raises(ZipjaxError, match="low_bits"):
        kv.ZipCache(high_bits=2, low_bits=4)
    with pytest.raises(ZipjaxError, match="bit width"):
        kv.KIVI(bits=1)
    with pytest.raises(ZipjaxError, match="group"):
        QuantizedKVCache.init(trained.config, kv.Uniform(group=12), 1, 256, 16)
    odd = trained.config.__class__(**{**trained.config.__dict__, "head_dim": 6, "num_heads": 4, "num_kv_heads": 2})
    with pytest.raises(ZipjaxError, match="head_dim 6"):
        QuantizedKVCache.init(odd, kv.ZipCache(), 1, 256, 16)
    with pytest.raises(ZipjaxError, match="window"):
        zipjax.generate(trained, [[5, 6, 7]], 8, cache_length=64, kv=kv.ZipCache(buffer_len=128))
    with pytest.raises(ZipjaxError, match="kv must be"):
        zipjax.generate(trained, [[5, 6, 7]], 8, kv="zipcache")


@pytest.fixture(scope="module")
def forced(trained):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, trained.config.vocab_size, (2, 64 + 40)), jnp.int32)
    starts = jnp.asarray([0, 9], jnp.int32)
    dense, _ = teacher_forced(trained, KVCache.init(trained.config, 2, 104, starts), ids, 64)
    return ids, starts, dense


def test_full_precision_window_is_exact(trained, forced):
    """While every decode token is still in the buffer, only the prompt is quantized: at 8 bits the logits stay
    close to the dense cache, and steps are reproducible."""
    ids, starts, dense = forced
    cache = QuantizedKVCache.init(trained.config, kv.Uniform(bits=8, buffer_len=40), 2, 104, 64, starts)
    ours, cache = teacher_forced(trained, cache, ids, 64)
    err = np.abs(ours - dense).max()
    print(f"8-bit prompt, full-precision window: max logit error {err:.2e}")
    assert err < 0.05
    assert int(cache.blocks) == 1 and int(cache.buffered) == 39


@pytest.mark.parametrize("method", [kv.ZipCache(high_bits=8, low_bits=8, buffer_len=8),
                                    kv.Uniform(bits=8, group=16, buffer_len=8)], ids=lambda m: type(m).__name__)
def test_streaming_8_bit_caches_track_the_dense_cache(trained, forced, method):
    ids, starts, dense = forced
    cache = QuantizedKVCache.init(trained.config, method, 2, 104, 64, starts)
    ours, cache = teacher_forced(trained, cache, ids, 64)
    err = np.abs(ours - dense).max()
    print(f"{method}: max logit error {err:.2e} over {ours.shape[1]} steps")
    assert err < 0.05
    assert int(cache.blocks) == 1 + (39 - 1) // 8 and int(cache.buffered) == 39 - 8 * ((39 - 1) // 8)


@pytest.mark.parametrize("method", [kv.ZipCache(buffer_len=8)], ids=lambda m: type(m).__name__)
def test_pallas_decode_attention_equals_the_jnp_path(trained, forced, method):
    """The cache with kernel=True (Pallas over packed codes, interpreted on CPU) gives the jnp path's logits and
    the same cache, through prefill and several flushes: 2-bit codes, mixed precision, left padding."""
    ids, starts, _ = forced
    jnp_cache = QuantizedKVCache.init(trained.config, method, 2, 104, 64, starts)
    ours_jnp, jnp_cache = teacher_forced(trained, jnp_cache, ids[:, :80], 64)
    method = dataclasses.replace(method, kernel=True)
    kernel_cache = QuantizedKVCache.init(trained.config, method, 2, 104, 64, starts)
    ours_kernel, kernel_cache = teacher_forced(trained, kernel_cache, ids[:, :80], 64)
    err = np.abs(ours_kernel - ours_jnp).max()
    print(f"{method}: kernel vs jnp path, max logit difference {err:.2e}")
    assert err < 1e-3
    assert int(kernel_cache.blocks) == 2
    np.testing.assert_array_equal(kernel_cache.layers[2].stores[0].slots, jnp_cache.layers[2].stores[0].slots)


def test_every_compressed_slot_is_stored_exactly_once(trained, forced):
    """After prefill and several flushes each (sequence, KV head) holds each real slot once, across both subsets
    and the buffer, and no padding slot."""
    ids, starts, _ = forced
    cache = QuantizedKVCache.init(trained.config, kv.ZipCache(buffer_len=8), 2, 104, 64, starts)
    _, cache = teacher_forced(trained, cache, ids, 64)
    compressed = 64 + 8 * (int(cache.blocks) - 1)
    layer = cache.layers[1]
    slots = np.concatenate([np.asarray(s.slots) for s in layer.stores], axis=2)  # [batch, kv_heads, capacity]
    for b, start in enumerate(np.asarray(starts)):
        for h in range(slots.shape[1]):
            held = np.sort(slots[b, h][slots[b, h] >= 0])
            np.testing.assert_array_equal(held, np.arange(start, compressed))


def test_salient_tokens_get_the_high_bits(trained):
    """With exact saliency, the salient subset is the top-r of the normalized score of each head."""
    length = 64
    q, k = _prompt_qk(trained, length)
    spec = kv.ZipCache(saliency="exact", saliency_ratio=0.25)
    cache = QuantizedKVCache.init(trained.config, spec, 1, 256, length)
    _, cache = jax.jit(lambda c: c.attend(1, q, k, k, None))(cache)  # one program, not one per jnp op
    saliency = jax.jit(prompt_saliency, static_argnames=("method", "probe_ratio", "normalize"))
    score = saliency(q, k, cache.starts, method="exact", probe_ratio=0.1, normalize="probe", key=jax.random.key(0))
    salient = np.asarray(cache.layers[1].stores[0].slots[0, :, :16])  # the prompt block: 16 salient per head
    for h in range(salient.shape[0]):
        top = np.sort(np.asarray(jnp.argsort(-score[0, h])[:16]))
        np.testing.assert_array_equal(salient[h], top)


def test_nbytes_counts_the_arrays_and_compresses(trained):
    cfg = trained.config
    dense = KVCache.init(cfg, 2, 1024, dtype=jnp.float16)
    for method, low, high in [(kv.ZipCache(), 2.5, 8.0), (kv.KIVI(bits=2, residual=32), 3.0, 8.0),
                              (kv.Uniform(bits=4), 2.0, 4.0)]:
        spec = method
        cache = jax.jit(lambda s, spec=spec: kv.init_cache(spec, cfg, 2, 1024, 512, s, jnp.float16))(
            jnp.zeros(2, jnp.int32))
        assert cache.nbytes() == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
        ratio = dense.nbytes() / cache.nbytes()
        print(f"{method}: {cache.nbytes()} bytes, {ratio:.2f}x smaller than fp16")
        assert low < ratio < high


def test_generate_with_a_quantized_cache(trained):
    """Greedy generation runs through the jitted loop and the streaming twin; at 8 bits it reproduces the dense
    cache's tokens on this prompt. (The kernel path's equality with the jnp path is tested per step above, and it
    generates end to end in the CLI test below: a whole interpreted-kernel generate loop costs a minute to compile.)"""
    prompts = [trained.tokenizer.encode("def fibonacci(n):"), trained.tokenizer.encode("import os\n")]
    dense = zipjax.generate(trained, prompts, 40, stop_tokens=())
    eight = zipjax.generate(trained, prompts, 40, stop_tokens=(),
                            kv=kv.ZipCache(high_bits=8, low_bits=8, buffer_len=16))
    np.testing.assert_array_equal(eight, dense)
    for method in (kv.ZipCache(buffer_len=16), kv.KIVI(group=16, residual=16), kv.Uniform(bits=2, buffer_len=16)):
        out = zipjax.generate(trained, prompts, 40, stop_tokens=(), kv=method)
        assert out.shape == dense.shape
        if not isinstance(method, kv.Uniform):  # the streaming loop is the same for every cache: two suffice
            streamed = np.stack(list(zipjax.generate_stream(trained, prompts, 40, stop_tokens=(), kv=method)), 1)
            np.testing.assert_array_equal(out[:, -40:], streamed)


def test_cli_generates_with_a_quantized_cache(capsys):
    from zipjax.cli import main

    assert main(["generate", "--kv", "zipcache", "--max-new-tokens", "12", "def read_config(path):"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("def read_config(path):") and len(out.strip()) > len("def read_config(path):")
    assert main(["generate", "--kv", "kivi", "--kv-kernel", "--max-new-tokens", "4", "import os"]) in (0, None)
    assert capsys.readouterr().out.startswith("import os")
    assert main(["generate", "--kv", "zipcash", "x"]) == 2  # one error line, no usage block
    assert "invalid choice: 'zipcash'" in capsys.readouterr().err
    assert main(["generate", "--kv", "uniform", "--kv-kernel", "x"]) == 2
    assert "--kv-kernel needs" in capsys.readouterr().err


def test_cli_reads_the_method_registry(capsys):
    """`--kv` offers every method of zipjax.kv.METHODS (zipvl and minicache included), and `--kv-kernel` asks the
    method whether it has a kernel."""
    from zipjax.cli import build_parser, main

    kv_action = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                     if a.dest == "kv")
    assert tuple(kv_action.choices) == ("dense", *kv.METHODS)
    for name in ("zipvl", "minicache"):
        assert main(["generate", "--kv", name, "--max-new-tokens", "3", "import os"]) in (0, None)
        assert capsys.readouterr().out.startswith("import os")
    for name in ("dense", "minicache"):
        assert main(["generate", "--kv", name, "--kv-kernel", "x"]) == 2
        err = capsys.readouterr().err
        assert "--kv-kernel needs --kv zipcache or --kv kivi or --kv zipvl" in err and f"the {name} cache" in err


def test_a_segment_shorter_than_tritons_tile_takes_the_reference_state(trained):
    """After a 16-token prompt ZipCache keeps 10 salient and 6 other prompt tokens per head: fewer than the 16 tokens
    a Triton tile needs. Traced for a GPU, those segments take `reference_state` (the kernel's state, by
    dequantizing) and the longer decode segments the kernel (before: "the GPU kernel needs >= 16 tokens" for any
    short prompt); `reference_state` equals the kernel's state (TPU form, interpreted) on the same segment."""
    from zipjax.kernels.common import combine, compiling_for
    from zipjax.kernels.quantized_attention import PackedSegment, reference_state, segment_attention

    length = 16
    q, k = _prompt_qk(trained, length)  # [1, 16, heads, d], [1, 16, kv_heads, d]
    cache = QuantizedKVCache.init(trained.config, kv.ZipCache(), 1, 128, length)
    _, cache = jax.jit(lambda c: c.attend(1, q, k, k, None))(cache)
    cache = cache.advance(length)
    capacities = [seg.capacity for seg in cache.geometry.segments()]
    assert min(capacities) < 16 <= max(capacities), capacities
    decode = lambda c: c.attend(1, q[:, -1:], k[:, -1:], k[:, -1:], None)[0]
    with compiling_for("gpu"):
        jaxpr = jax.make_jaxpr(decode)(cache).jaxpr
    assert has_primitive(jaxpr)

    layer, seg = cache.layers[1], cache.geometry.segments()[0]
    st = layer.stores[0]
    v_scale = jax.lax.slice_in_dim(layer.v_scale, seg.first_block, seg.first_block + seg.blocks, axis=2)
    segment = PackedSegment(st.k_codes, st.k_step, st.k_min, st.v_codes, st.v_step, st.v_min, v_scale, st.slots)
    b, h, d = 1, trained.config.num_kv_heads, trained.config.head_dim
    qg = q[:, -1].reshape(b, h, -1, d).astype(jnp.float32)  # [batch, kv_heads, group, head_dim]
    args = (qg, segment, jnp.int32(length), cache.starts)
    settings = dict(bits=seg.bits, block=seg.size, group=None)
    ours = combine([reference_state(*args, **settings)])  # (out, max, sum)
    kernels = combine([segment_attention(*args, **settings, interpret=True)])
    for a, e in zip(ours, kernels, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
