"""ZipAR, adaptive ZipAR and SJD over a compressed KV cache (zipjax.zipar.compressed): the band cache fed in ZipAR's
whole-row order holds exactly what the sequential cache holds, a whole-row window reproduces sequential decoding over
the same compressed cache token for token, passes do not depend on the cache, bad combinations are refused by name
before any compute. KIVI's band cache (zipjax.zipar.kivi_band) likewise, and in ZipAR's and SJD's orders it gives every
query KIVI's precision rule read at its own slot. On the shipped digits model (16x16 codes)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import has_primitive

import zipjax
from zipjax import zipar
from zipjax.image import Sequential
from zipjax.kv.codec import dequantize, grouped, quantize_key_blocks, unpack
from zipjax.kv.kivi import KIVICache, encode_values
from zipjax.kv.quantized import QuantizedKVCache
from zipjax.zipar.compressed import BandKVCache
from zipjax.zipar.kivi_band import KIVIBandCache

COMMON = dict(size=(16, 16), cfg_scale=3.0, negative_prompt="a handwritten digit", top_k=None, seed=0)
PROMPTS = ["a handwritten digit seven", "a handwritten digit two"]


def _row_order(tokens: int, cols: int) -> list[list[int]]:
    """The passes of ZipAR with a whole-row window over image slots 0 .. tokens - 1: one token per pass, except a
    row's last token and its end-of-line, fed together."""
    passes, t = [], 0
    while t < tokens:
        n = 2 if t % (cols + 1) == cols - 1 and t + 1 < tokens else 1
        passes.append(list(range(t, t + n)))
        t += n
    return passes


@jax.jit
def _sequential_step(cache, q, k, v):
    out, cache = cache.attend(0, q, k, v, None)
    return out, cache.advance(q.shape[1])


def _band_pass(cache, slots, q, k, v):
    out, cache = cache.at(slots, jnp.ones(slots.shape, bool)).attend(0, q, k, v, None)
    return out, cache.advance(q.shape[1])


_band_step = jax.jit(_band_pass)


def _random_pass_inputs(config, prompt: int, tokens: int):
    """Queries, keys and values [2, prompt + tokens, heads, head_dim] for one layer, and left padding [3, 0]."""
    b, h, heads, d = 2, config.num_kv_heads, config.num_heads, config.head_dim
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, prompt + tokens, heads, d))
    k, v = (jax.random.normal(key, (b, prompt + tokens, h, d)) for key in keys[1:])
    return q, k, v, jnp.array([3, 0], jnp.int32)


def _band_in_row_order(config, kv, prompt: int, cols: int, tokens: int, kernel: bool | None = None,
                       passes: list[list[int]] | None = None, step=_band_step):
    """The band cache (KIVI's for a KIVI method) fed the prompt, then image slots in whole-row passes (or `passes`):
    (per-slot outputs {slot: [batch, heads, head_dim]}, the cache after the last pass)."""
    q, k, v, starts = _random_pass_inputs(config, prompt, tokens)
    if isinstance(kv, zipjax.kv.KIVI):
        band = KIVIBandCache.init(config, kv, 2, 256, prompt, 40, starts, kernel=kernel)
    else:
        band = BandKVCache.init(config, kv, 2, 256, prompt + tokens + 2, prompt, 40, starts, kernel=kernel)
    _, band = step(band, jnp.arange(prompt), q[:, :prompt], k[:, :prompt], v[:, :prompt])
    outputs = {}
    for fed in passes or _row_order(tokens, cols):
        at = slice(prompt + fed[0], prompt + fed[-1] + 1)
        out, band = step(band, jnp.arange(at.start, at.stop), q[:, at], k[:, at], v[:, at])
        outputs.update({at.start + i: out[:, i] for i in range(len(fed))})
    return outputs, band


def _same_stores(ours, theirs) -> None:
    for mine, other in zip(ours, theirs, strict=True):
        for name, array in other.arrays().items():
            assert bool((getattr(mine, name) == array).all()), name


@pytest.mark.parametrize("kv", [zipjax.kv.ZipCache(buffer_len=16),
                                zipjax.kv.ZipCache(buffer_len=10, high_bits=8, low_bits=2, saliency_ratio=0.3),
                                zipjax.kv.Uniform(bits=4, buffer_len=16)],
                         ids=["zipcache-16", "zipcache-8-2-10", "uniform-16"])
def test_band_cache_in_row_order_holds_what_the_sequential_cache_holds(digits_emu3, kv):
    """Random queries, keys and values through one layer: the sequential cache token by token, the band cache in
    whole-row passes (a block ending at a row's last token is compressed in the pass that also feeds the row's EOL,
    which must already read it compressed). Same stores, code for code and slot for slot; same outputs up to float
    rounding. buffer_len 16 ends the first block at the first row's last token, 10 ends blocks anywhere."""
    config = digits_emu3.config
    prompt, cols, tokens = 16, 16, 4 * 17 - 1
    q, k, v, starts = _random_pass_inputs(config, prompt, tokens)
    sequential = QuantizedKVCache.init(config, kv, 2, prompt + tokens + 2, prompt, starts)
    _, sequential = _sequential_step(sequential, q[:, :prompt], k[:, :prompt], v[:, :prompt])
    expected = {}
    for s in range(prompt, prompt + tokens):
        out, sequential = _sequential_step(sequential, q[:, s:s + 1], k[:, s:s + 1], v[:, s:s + 1])
        expected[s] = out[:, 0]
    outputs, band = _band_in_row_order(config, kv, prompt, cols, tokens)
    for s, out in outputs.items():
        np.testing.assert_allclose(out, expected[s], atol=2e-6)
    assert not bool(band.overflow)
    assert [int(x) + 1 for x in band.blocks] == [int(sequential.blocks)] * 2
    _same_stores(band.layers[0].stores, sequential.layers[0].stores)


ZIPCACHE_8_2 = zipjax.kv.ZipCache(buffer_len=10, high_bits=8, low_bits=2, saliency_ratio=0.3)
PAIRS = [[t, t + 1] for t in range(0, 40, 2)]  # 40 image slots, two a pass (one compiled pass)


@pytest.fixture(scope="module")
def jnp_pairs(digits_emu3):
    """The jnp path's outputs and cache, ZipCache 8/2 fed PAIRS (the kernel tests' reference)."""
    return _band_in_row_order(digits_emu3.config, ZIPCACHE_8_2, 16, 16, 40, kernel=False, passes=PAIRS)


def test_band_attention_by_the_kernel_equals_the_jnp_path(digits_emu3, jnp_pairs):
    """ZipCache 8/2 (mixed split, blocks of 10 ending anywhere): the stores read by the packed-code multi-query
    kernel (interpreted on this CPU) and merged with the ring by log-sum-exp give the jnp path's outputs within
    float rounding, and rank, compress and store the same codes (the ring's probabilities feed the ranking). Two
    slots a pass (one compiled pass), 40 slots: blocks complete inside passes and at their ends."""
    jnp_out, jnp_band = jnp_pairs
    kernel_out, kernel_band = _band_in_row_order(digits_emu3.config, ZIPCACHE_8_2, 16, 16, 40, kernel=True,
                                                 passes=PAIRS)
    error = max(float(jnp.abs(kernel_out[s] - jnp_out[s]).max()) for s in jnp_out)
    print(f"band attention, kernel vs jnp: max abs error {error:.2e}")
    assert error < 2e-5
    assert [int(x) for x in kernel_band.blocks] == [int(x) for x in jnp_band.blocks] == [4, 4]
    _same_stores(kernel_band.layers[0].stores, jnp_band.layers[0].stores)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_band_cache_chooses_the_kernel_by_the_policy(digits_emu3, platform):
    """kernel=None traced for a TPU or GPU: ZipCache's stores go through the kernel (a pallas_call in the pass),
    Uniform's through jnp, chosen because Uniform has no kernel (its keys are token-wise), not by a failure; on
    this CPU kernel=None is jnp for both. (On a GPU a store shorter than Triton's 16-token tile, here the prompt's,
    takes the kernel's jnp reference, chosen by `kernel_takes`.) Traced only."""
    from zipjax.kernels.common import compiling_for

    config = digits_emu3.config
    q, k, v, starts = _random_pass_inputs(config, 16, 2)
    for kv, expected in ((zipjax.kv.ZipCache(buffer_len=16), True), (zipjax.kv.Uniform(buffer_len=16), False)):
        band = BandKVCache.init(config, kv, 2, 256, 100, 16, 40, starts).replace(prompt=False)
        args = (band, jnp.array([16, 17]), q[:, 16:], k[:, 16:], v[:, 16:])
        trace = lambda args=args: jax.make_jaxpr(lambda *a: _band_pass(*a))(*args).jaxpr  # new function: no cache
        with compiling_for(platform):
            assert has_primitive(trace()) is expected
        assert not has_primitive(trace())


def test_band_attention_by_the_kernel_per_shard_of_a_mesh(digits_emu3, jnp_pairs):
    """On a 2 x 2 CPU mesh (conftest's devices) the kernel runs per shard, batch over "data" and the 2 KV heads over
    "model" (a shard_map in the pass), and gives the jnp path's outputs and codes without a mesh."""
    from zipjax.sharding import make_mesh

    config = digits_emu3.config
    expected, expected_band = jnp_pairs
    step = jax.jit(lambda *a: _band_pass(*a))  # traced under the mesh: its own cache
    with jax.set_mesh(make_mesh(data=2, model=2, devices=jax.devices()[:4])):
        outputs, band = _band_in_row_order(config, ZIPCACHE_8_2, 16, 16, 40, kernel=True, passes=PAIRS, step=step)
        q, k, v, _ = _random_pass_inputs(config, 16, 40)
        last = slice(54, 56)  # a pass's shape (what it writes does not matter: traced only)
        jaxpr = jax.make_jaxpr(lambda *a: _band_pass(*a))(band, jnp.array([54, 55]), q[:, last], k[:, last],
                                                          v[:, last]).jaxpr
    assert has_primitive(jaxpr, "shard_map") and has_primitive(jaxpr)
    error = max(float(jnp.abs(outputs[s] - expected[s]).max()) for s in expected)
    print(f"band attention, kernel per shard of a 2x2 mesh vs jnp: max abs error {error:.2e}")
    assert error < 2e-5
    _same_stores(band.layers[0].stores, expected_band.layers[0].stores)


@pytest.fixture(scope="module")
def tiny(digits_emu3) -> zipjax.Model:
    """The digits model's first two layers (and its embedding, head and vision tokenizer): what the decoders compile
    is per layer, and what these tests check (tokens equal between decoders over the same cache, passes, layout,
    bytes) holds for any model; two layers keep the cache's per-layer state in play."""
    params = {name: p for name, p in digits_emu3.params.items() if name not in ("layer_2", "layer_3")}
    return dataclasses.replace(digits_emu3, config=dataclasses.replace(digits_emu3.config, num_layers=2),
                               params=params)


@pytest.fixture(scope="module")
def dense_lag4(tiny):
    return zipjax.generate_image(tiny, PROMPTS, decoder=zipar.FixedWindow(4), **COMMON)


ZIPCACHE = zipjax.kv.ZipCache(buffer_len=16)


@pytest.mark.slow
@pytest.mark.parametrize("kv,temperature", [(zipjax.kv.Uniform(bits=4, buffer_len=16), 1.0),
                                            (zipjax.kv.ZipCache(buffer_len=16, saliency_ratio=1.0), 0.0),
                                            (zipjax.kv.KIVI(bits=2, group=16, residual=32), 1.0),
                                            (zipjax.kv.KIVI(bits=4, group=16, residual=32), 0.0)],
                         ids=["uniform-sampled", "zipcache-greedy", "kivi2-sampled", "kivi4-greedy"])
def test_window_of_a_row_reproduces_sequential_decoding_over_the_same_cache(tiny, dense_lag4, kv, temperature):
    """ZipAR with a lag of the image's width and adaptive ZipAR with a row-wide minimum equal sequential decoding
    over the same compressed cache, token for token; ZipAR's pass count is its formula whatever the cache; the band
    cache holds fewer bytes than the dense scatter cache (same slots: the cache length does not depend on the lag).
    (ZipCache is run with every token salient: with a mixed split, which tokens of near-equal attention go to high
    bits follows float rounding, which differs between any two implementations; the tests above check the
    mixed-precision stores code for code.)"""
    args = dict(COMMON, temperature=temperature)
    sequential = zipjax.generate_image(tiny, PROMPTS, decoder=Sequential(kv=kv), **args)
    row = zipjax.generate_image(tiny, PROMPTS, decoder=zipar.FixedWindow(16, kv=kv), **args)
    np.testing.assert_array_equal(row.tokens, sequential.tokens)
    assert row.num_forward_passes == zipar.passes(16, 16, 16)
    assert 0 < row.kv_nbytes < dense_lag4.kv_nbytes
    adaptive = zipjax.generate_image(tiny, PROMPTS, decoder=zipar.AdaptiveWindow(16, kv=kv), **args)
    np.testing.assert_array_equal(adaptive.tokens, sequential.tokens)


def _valid_layout(result, rows: int = 16, cols: int = 16) -> None:
    grid = result.tokens[:, :rows * (cols + 1)].reshape(len(result.tokens), rows, cols + 1)
    assert (grid[:, :, cols] == grid[0, 0, cols]).all()
    assert result.codes.min() >= 0 and result.images.shape[1:3] == (16, 16)


@pytest.mark.slow
def test_parallel_decoders_over_zipcache_keep_their_passes_and_layout(tiny, dense_lag4):
    """ZipAR s=4, adaptive ZipAR and SJD over ZipCache 4/2: valid images, the fixed schedule's pass count, the band
    never overrun (checked after every decode), fewer KV bytes than the dense scatter cache."""
    zipcache_lag4 = zipjax.generate_image(tiny, PROMPTS, decoder=zipar.FixedWindow(4, kv=ZIPCACHE), **COMMON)
    assert zipcache_lag4.num_forward_passes == dense_lag4.num_forward_passes == zipar.passes(16, 16, 4)
    assert zipcache_lag4.kv_nbytes < dense_lag4.kv_nbytes
    _valid_layout(zipcache_lag4)
    for decoder in (zipar.AdaptiveWindow(2, kv=ZIPCACHE), zipar.SJD(8, kv=ZIPCACHE)):
        result = zipjax.generate_image(tiny, PROMPTS, decoder=decoder, **COMMON)
        _valid_layout(result)
        assert result.num_forward_passes < 16 * 17


KIVI_2 = zipjax.kv.KIVI(bits=2, group=16, residual=32)


@pytest.mark.slow
def test_parallel_decoders_over_kivi_keep_their_passes_and_layout(tiny, dense_lag4):
    """ZipAR s=4, adaptive ZipAR and SJD over KIVI-2 (runs of 16 keys, residual 32, as benchmarks/zipar_kv.py):
    valid images, the fixed schedule's pass count (the dense run's), the band never overrun (checked after every
    decode), fewer KV bytes than the dense scatter cache. Adaptive ZipAR's and SJD's pass counts follow the tokens
    they sample, which any cache changes: bounded here, compared with dense in benchmarks/zipar_kv.py."""
    kivi_lag4 = zipjax.generate_image(tiny, PROMPTS, decoder=zipar.FixedWindow(4, kv=KIVI_2), **COMMON)
    assert kivi_lag4.num_forward_passes == dense_lag4.num_forward_passes == zipar.passes(16, 16, 4)
    assert 0 < kivi_lag4.kv_nbytes < dense_lag4.kv_nbytes
    _valid_layout(kivi_lag4)
    for decoder in (zipar.AdaptiveWindow(2, kv=KIVI_2), zipar.SJD(8, kv=KIVI_2)):
        result = zipjax.generate_image(tiny, PROMPTS, decoder=decoder, **COMMON)
        _valid_layout(result)
        assert result.num_forward_passes < 16 * 17
        assert 0 < result.kv_nbytes < dense_lag4.kv_nbytes


@pytest.mark.slow
def test_zipar_over_zipcache_with_the_kernel_decodes_the_same_image(digits_emu3):
    """ZipAR s=4 (several queries a pass, each at its own slot; padding queries) over ZipCache with the packed-code
    kernel, interpreted on this CPU, samples the same tokens as the jnp path. On the digits model's first layer with
    every token salient (two stores a layer): an interpreted kernel compiles slowly, and the test above covers the
    mixed split's four stores."""
    one_layer = dataclasses.replace(digits_emu3, config=dataclasses.replace(digits_emu3.config, num_layers=1),
                                    params={name: p for name, p in digits_emu3.params.items()
                                            if name not in ("layer_1", "layer_2", "layer_3")})
    kv = zipjax.kv.ZipCache(buffer_len=16, saliency_ratio=1.0)
    jnp_path, kernel = (zipjax.generate_image(one_layer, PROMPTS, decoder=zipar.FixedWindow(4, kv=kv, kernel=k),
                                              **COMMON) for k in (False, True))
    np.testing.assert_array_equal(kernel.tokens, jnp_path.tokens)
    assert kernel.num_forward_passes == jnp_path.num_forward_passes == zipar.passes(16, 16, 4)


def test_bad_combinations_are_refused_by_name_before_any_compute(digits_emu3):
    for kv, name in ((zipjax.kv.ZipVL(), "zipvl"), (zipjax.kv.MiniCache(), "minicache")):
        for make in (lambda kv: zipar.FixedWindow(4, kv=kv), lambda kv: zipar.AdaptiveWindow(2, kv=kv),
                     lambda kv: zipar.SJD(8, kv=kv)):
            with pytest.raises(zipjax.ZipjaxError, match=f"cannot decode over a {name} KV cache"):
                make(kv)
    with pytest.raises(zipjax.ZipjaxError, match="FixedWindow kernel=True over a uniform KV cache: uniform has no "
                                                 "packed-code kernel"):
        zipar.FixedWindow(4, kernel=True, kv=zipjax.kv.Uniform())
    with pytest.raises(zipjax.ZipjaxError, match="SJD kernel=False but its zipcache cache kernel=True"):
        zipar.SJD(4, kernel=False, kv=zipjax.kv.ZipCache(kernel=True))
    zipar.FixedWindow(4, kernel=True, kv=zipjax.kv.ZipCache())  # the kernel over the packed codes: accepted
    zipar.SJD(4, kv=zipjax.kv.ZipCache(kernel=True))
    zipar.FixedWindow(4, kernel=True, kv=zipjax.kv.KIVI())  # KIVI's store is the kernel's segment: accepted
    zipar.AdaptiveWindow(2, kv=zipjax.kv.KIVI(bits=4))
    with pytest.raises(zipjax.ZipjaxError, match="SJD kernel=True but its kivi cache kernel=False"):
        zipar.SJD(4, kernel=True, kv=zipjax.kv.KIVI(kernel=False))
    with pytest.raises(zipjax.ZipjaxError, match=r"kv must be None or a zipjax\.kv method"):
        zipar.FixedWindow(4, kv="zipcache")
    # a block longer than the image's slots: refused where the geometry is checked, before the prefill
    with pytest.raises(zipjax.ZipjaxError, match="buffer_len=400"):
        zipjax.generate_image(digits_emu3, PROMPTS[:1], decoder=zipar.FixedWindow(4, kv=zipjax.kv.ZipCache(
            buffer_len=400)), **COMMON)


def test_band_of_the_fixed_schedule():
    """The ring a whole-row window needs is about a block and a row; a lag of 1 keeps every row in flight."""
    whole = zipar.schedule.band_length(zipar.fixed_window(16, 16, 16), 16)
    assert 16 <= whole <= 16 + 2 * 17
    assert zipar.schedule.band_length(zipar.fixed_window(16, 16, 1), 16) > 8 * 17


KIVIS = [zipjax.kv.KIVI(bits=2, group=8, residual=16), zipjax.kv.KIVI(bits=4, group=None, residual=32)]
KIVI_IDS = ["kivi2-8-16", "kivi4-none-32"]


@pytest.mark.parametrize("kv", KIVIS, ids=KIVI_IDS)
def test_kivi_band_in_row_order_holds_what_the_sequential_kivi_cache_holds(digits_emu3, kv):
    """Random queries, keys and values through one layer: sequential KIVI token by token, KIVI's band cache in
    whole-row passes (a row's last token and its EOL together: the EOL's query must already read a key residual the
    last token completed as quantized). Same outputs up to float rounding; the same codes and statistics wherever
    the sequential cache has quantized (keys below floor(T / R) R, values below T - R), the same store marks."""
    config = digits_emu3.config
    prompt, cols, tokens = 16, 16, 4 * 17 - 1
    q, k, v, starts = _random_pass_inputs(config, prompt, tokens)
    sequential = KIVICache.init(config, kv, 2, prompt + tokens + 2, prompt, starts)
    _, sequential = _sequential_step(sequential, q[:, :prompt], k[:, :prompt], v[:, :prompt])
    expected = {}
    for s in range(prompt, prompt + tokens):
        out, sequential = _sequential_step(sequential, q[:, s:s + 1], k[:, s:s + 1], v[:, s:s + 1])
        expected[s] = out[:, 0]
    outputs, band = _band_in_row_order(config, kv, prompt, cols, tokens)
    error = max(float(jnp.abs(out - expected[s]).max()) for s, out in outputs.items())
    assert error < 2e-6, error
    assert not bool(band.overflow)
    end, r, kb = prompt + tokens, kv.residual, kv.key_block
    keys, values = end // r * r, end - r
    mine, theirs = band.layers[0].store, sequential.layers[0].store
    for name, stop in (("k_codes", keys), ("k_step", keys // kb), ("k_min", keys // kb), ("v_codes", values),
                       ("v_step", values), ("v_min", values), ("slots", values)):
        assert bool((getattr(mine, name)[:, :, :stop] == getattr(theirs, name)[:, :, :stop]).all()), name


@functools.partial(jax.jit, static_argnums=0)
def _kivi_rule(kv, keys, values, written, starts, slots, q):
    """KIVI's rule at each query's slot, computed directly: keys, values float32 [batch, kv_heads, n, head_dim] (the
    tokens each slot holds now), written bool [batch, n], slots int [batch, q]. A query at slot c attends over
    written slots s in [start, c], the key quantized iff s < floor(c / R) R and its run is complete, the value iff
    s < c - R. Returns float32 [batch, q, heads, head_dim]."""
    from zipjax.attention import group_queries, ungroup

    bits, kb, r = kv.bits, kv.key_block, kv.residual
    b, h, n, d = keys.shape
    s = jnp.arange(n)
    real = jnp.broadcast_to((s >= starts[:, None])[:, None], (b, h, n))
    codes, step, minimum = quantize_key_blocks(keys, bits, kb, real)
    keys_q = dequantize(codes, *(jnp.repeat(x, kb, axis=2)[:, :, :n] for x in (step, minimum)))
    codes, step, minimum = encode_values(values, bits, kv.group)
    values_q = dequantize(grouped(unpack(codes, bits), kv.group or d), step[..., None], minimum[..., None])
    runs = jnp.pad(written, ((0, 0), (0, -n % kb))).reshape(b, -1, kb).all(axis=2)
    complete = jnp.repeat(runs, kb, axis=1)[:, :n]
    c = slots[:, :, None]
    visible = written[:, None] & (s >= starts[:, None, None]) & (s <= c)  # [batch, q, n]
    key_q = (complete[:, None] & (s < c // r * r))[:, None, :, :, None]
    value_q = (s < c - r)[:, None, :, :, None]
    k = jnp.where(key_q, keys_q[:, :, None], keys[:, :, None])  # [batch, kv_heads, q, n, head_dim]
    v = jnp.where(value_q, values_q.reshape(keys.shape)[:, :, None], values[:, :, None])
    scores = jnp.einsum("bhgqd,bhqnd->bhgqn", group_queries(q, h), k) * d**-0.5
    p = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    return ungroup(jnp.einsum("bhgqn,bhqnd->bhgqd", p, v))


def _zipar_lag4(prompt: int, tokens: int):
    schedule = zipar.fixed_window(tokens // 17, 16, 4, eol=True)
    return [(prompt + slots, sources >= 0, None) for slots, sources in zip(schedule.slot, schedule.source,
                                                                         strict=True)]


def _sjd_like(prompt: int, tokens: int, window: int = 4):
    """SJD's pattern: each pass rewrites the window from the first unsettled slot, a random number accepted."""
    rng, cursor, passes = np.random.default_rng(0), 0, []
    while cursor < tokens:
        slots = cursor + np.arange(window)
        passes.append((prompt + np.minimum(slots, tokens - 1), slots < tokens, prompt + cursor))
        cursor += int(rng.integers(1, window))
    return passes


@jax.jit
def _kivi_pass(cache, slots, valid, settled, q, k, v):
    out, cache = cache.at(slots, valid, settled).attend(0, q, k, v, None)
    return out, cache.advance(q.shape[1])


@pytest.mark.parametrize("order", [_zipar_lag4, _sjd_like], ids=["zipar-lag4", "sjd-rewrites"])
def test_kivi_band_gives_each_query_kivis_rule_at_its_slot(digits_emu3, order):
    """ZipAR s=4's schedule (several rows in flight: key runs with unwritten slots above the query's residual
    boundary) and SJD's (drafted slots rewritten with new keys and values, rewriting complete runs): every query's
    output is the attention KIVI's rule gives at its slot over the tokens the slots hold then, computed directly;
    the band is never overrun."""
    config, kv = digits_emu3.config, KIVIS[0]
    prompt, tokens = 16, 4 * 17
    rng = np.random.default_rng(1)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    b, h, heads, d = 2, config.num_kv_heads, config.num_heads, config.head_dim
    starts = np.array([3, 0], np.int32)
    keys, values = normal(b, h, 128, d), normal(b, h, 128, d)
    written = np.zeros((b, 128), bool)
    written[:, :prompt] = True
    passes = order(prompt, tokens)
    span = max(int(slots[valid].max()) - int(slots[valid].min()) for slots, valid, _ in passes)
    band = KIVIBandCache.init(config, kv, b, 128, prompt, kv.residual + 3 * span + 8, starts)
    to_cache = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # [b, h, n, d] -> [b, n, h, d]
    _, band = _kivi_pass(band, jnp.arange(prompt), jnp.ones(prompt, bool), None, normal(b, prompt, heads, d),
                         to_cache(keys[:, :, :prompt]), to_cache(values[:, :, :prompt]))
    error = 0.0
    for slots, valid, settled in passes:
        q, k, v = normal(b, len(slots), heads, d), normal(b, h, len(slots), d), normal(b, h, len(slots), d)
        fed = slots[valid]
        keys[:, :, fed], values[:, :, fed], written[:, fed] = k[:, :, valid], v[:, :, valid], True
        settled = None if settled is None else jnp.full((b,), settled, jnp.int32)
        out, band = _kivi_pass(band, jnp.asarray(slots), jnp.asarray(valid), settled, q, to_cache(k), to_cache(v))
        rule = _kivi_rule(kv, keys, values, written, starts, np.broadcast_to(slots, (b, len(slots))), q)
        error = max(error, float(jnp.abs(out - rule)[:, valid].max()))
    print(f"KIVI band vs the rule computed directly ({order.__name__}): max abs error {error:.2e}")
    assert error < 2e-5
    assert not bool(band.overflow)


def test_kivi_band_attention_by_the_kernel_equals_the_jnp_path(digits_emu3):
    """KIVI-2 (runs of 8 keys, residual 16): the store read by the packed-code multi-query kernel (interpreted on
    this CPU; KIVI's store is its segment, blocks of one key run) and merged with the ring by log-sum-exp gives the
    jnp path's outputs within float rounding and the same codes; kernel=None traced for a TPU or a GPU chooses the
    kernel (a pallas_call in the pass), on this CPU jnp."""
    from zipjax.kernels.common import compiling_for

    config, kv = digits_emu3.config, KIVIS[0]
    jnp_out, jnp_band = _band_in_row_order(config, kv, 16, 16, 40, kernel=False, passes=PAIRS)
    kernel_out, kernel_band = _band_in_row_order(config, kv, 16, 16, 40, kernel=True, passes=PAIRS)
    error = max(float(jnp.abs(kernel_out[s] - jnp_out[s]).max()) for s in jnp_out)
    print(f"KIVI band attention, kernel vs jnp: max abs error {error:.2e}")
    assert error < 2e-5
    _same_stores([kernel_band.layers[0].store], [jnp_band.layers[0].store])
    q, k, v, starts = _random_pass_inputs(config, 16, 2)
    band = KIVIBandCache.init(config, kv, 2, 256, 16, 40, starts).replace(prompt=False)
    args = (band, jnp.array([16, 17]), q[:, 16:], k[:, 16:], v[:, 16:])
    trace = lambda: jax.make_jaxpr(lambda *a: _band_pass(*a))(*args).jaxpr  # new function: no cache
    for platform in ("tpu", "gpu"):
        with compiling_for(platform):
            assert has_primitive(trace())
    assert not has_primitive(trace())
