"""ZipAR: the fixed-window schedule (pass counts, raster-causal conditioning checked by simulation), the scatter KV
cache against plain causal attention, and the pipeline on a tiny random Emu3 (identical to sequential decoding when
the window covers a row, valid layouts and decodable images when it does not)."""

import signal

import numpy as np
import pytest
import torch  # noqa: F401  (the random Emu3 is built with transformers)
from random_hf import save_random_emu3
from zipjax.convert import convert

import zipjax
from zipjax.emu3.decoding import ImageLayout
from zipjax.image import generate_image
from zipjax.zipar import SJD, AdaptiveWindow, FixedWindow
from zipjax.zipar.cache import ScatterKVCache
from zipjax.zipar.schedule import fixed_window, max_tokens_per_pass, passes


@pytest.mark.parametrize("rows,cols,window,expected", [
    (90, 90, 7, 713), (90, 90, 90, 8100), (48, 48, 15, 753), (48, 48, 11, 565), (16, 16, 4, 76), (1, 5, 2, 5),
    (5, 1, 1, 5), (4, 6, 100, 24),
])
def test_pass_counts_follow_the_formula(rows, cols, window, expected):
    assert passes(rows, cols, window) == expected
    assert fixed_window(rows, cols, window).num_passes == expected
    assert fixed_window(rows, cols, window, eol=False).num_passes == expected


def test_sequential_emu3_image_is_8190_passes():
    assert ImageLayout(90, 90, 0, 0, 1).num_tokens == 8190
    assert max_tokens_per_pass(90, 90, 7) == 13


def _simulate(schedule) -> None:
    """Replay a schedule: each image token is sampled once, in pass 1 + i*s + j, from the query at its raster
    predecessor; nothing is fed before it exists; the query for (i, j) sees exactly the first min((i - r) * s + j, W)
    tokens of each row r <= i (the row above: j + s, the window) plus the EOLs above it (without EOL: the last slot
    of each row above, which holds a proxy until the real token is refreshed in)."""
    rows, cols, s, eol = schedule.rows, schedule.cols, schedule.lag, schedule.eol
    width = cols + eol
    exists = {0} | ({i * width + cols for i in range(rows)} if eol else set())  # the prefill's token, EOLs
    holds = {}  # cache slot -> index of the token whose value it holds (a proxy holds another token's value)
    sampled = {0}
    for p in range(schedule.source.shape[0]):
        t, new = p + 2, []
        for src, slot in zip(schedule.source[p], schedule.slot[p], strict=True):
            if src >= 0:
                assert src in exists, f"pass {t} feeds token {src} before it exists"
                holds[slot] = src
        for slot, tgt in zip(schedule.slot[p], schedule.target[p], strict=True):
            if tgt < 0:
                continue
            row, col = divmod(int(tgt), width)
            assert tgt == slot + 1 and col < cols and t == 1 + row * s + col and tgt not in sampled
            visible = {k for k in holds if k <= slot}
            # row r (r <= row) has its first (row - r) * s + col tokens in the cache, EOLs of rows above too
            required = {r * width + c for r in range(row + 1) for c in range(min((row - r) * s + col, cols))}
            if eol:
                required |= {r * width + cols for r in range(row)}
            else:  # the last slot of every row above holds a proxy from that row's successor's start until refreshed
                required |= {r * width + cols - 1 for r in range(row)}
            assert required == visible, (t, int(tgt))
            new.append(int(tgt))
        sampled |= set(new)
        exists |= set(new)
    assert sorted(sampled) == [i * width + j for i in range(rows) for j in range(cols)]
    assert all(k == v for k, v in holds.items()), "a proxy was never replaced by the real token"


@pytest.mark.parametrize("rows,cols,window", [(4, 5, 2), (6, 6, 1), (5, 7, 3), (3, 4, 4), (7, 3, 9)])
@pytest.mark.parametrize("eol", [True, False])
def test_schedule_is_raster_causal(rows, cols, window, eol):
    _simulate(fixed_window(rows, cols, window, eol=eol))


def test_scatter_cache_matches_causal_attention(tiny_models):
    """Several tokens per pass, in any order within the pass, at scattered slots: the logits of one causal pass.
    And a slot not written yet is invisible: a token fed past a gap sees exactly what precedes it."""
    import jax.numpy as jnp

    model = tiny_models["llama_gqa"].load()
    cfg = model.config
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    reference = np.asarray(model.logits(ids))

    def run(passes):
        cache = ScatterKVCache.init(cfg, 2, 17, jnp.zeros((2,), jnp.int32))
        out = {}
        for slots in passes:
            order = np.array(slots)
            positions = jnp.asarray(np.broadcast_to(order, (2, len(order))))
            cache = cache.at(jnp.asarray(order), jnp.ones(len(order), bool))
            logits, cache = model.apply(jnp.asarray(ids[:, order]), positions, cache)
            out.update({int(k): np.asarray(logits[:, i]) for i, k in enumerate(order)})
        return out

    out = run([[0, 2, 4, 1, 3], [5, 7, 6], [8], [9, 11, 10]])
    err = max(np.abs(out[k] - reference[:, k]).max() for k in range(12))
    assert err <= 1e-5, err
    gap = run([[0, 1, 2, 3, 4, 5], [8]])[8]
    keep = [0, 1, 2, 3, 4, 5, 8]
    expected, _ = model.apply(jnp.asarray(ids[:, keep]), jnp.asarray(np.broadcast_to(keep, (2, 7))))
    assert np.abs(gap - np.asarray(expected[:, -1])).max() <= 1e-5


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    root = tmp_path_factory.mktemp("zipar")
    return zipjax.load(convert(save_random_emu3(root / "hf"), root / "zj", progress=False))


PROMPTS = ["a photo of a cat", "a red sofa"]
GREEDY, SAMPLED = dict(temperature=0.0), dict(temperature=1.0, top_k=8, seed=5)


def _args(sampling: dict) -> dict:
    """The 4x6-code images the decoders are compared on, guided, with `sampling`."""
    return dict(size=(8, 12), cfg_scale=3.0, negative_prompt="blurry", **sampling)


@pytest.fixture(scope="module")
def sequential(emu3):
    """Sequential decoding of PROMPTS with `_args(sampling)`, run once per sampling for the module (the reference
    every decoder below is compared with)."""
    done = {}

    def decoded(sampling: dict):
        key = tuple(sorted(sampling.items()))
        if key not in done:
            done[key] = generate_image(emu3, PROMPTS, **_args(sampling))
        return done[key]
    return decoded


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_window_of_a_row_reproduces_sequential_decoding(emu3, sequential, sampling):
    reference = sequential(sampling)
    for window in (6, 50):
        parallel = generate_image(emu3, PROMPTS, decoder=FixedWindow(window), **_args(sampling))
        np.testing.assert_array_equal(parallel.tokens, reference.tokens)
        assert parallel.num_forward_passes == 4 * 6 < reference.num_forward_passes == 4 * 7


@pytest.mark.parametrize("window", [1, 4])  # a lag of 1 (every row in flight) and a longer one; 2 runs below
def test_parallel_decoding_layout(emu3, window):
    result = generate_image(emu3, ["mountains at sunset"] * 3, size=(10, 12), decoder=FixedWindow(window), top_k=16,
                            seed=1)
    vocab, rows, cols = emu3.vocab, 5, 6
    assert result.num_forward_passes == (rows - 1) * window + cols
    body = result.tokens[:, : rows * (cols + 1)].reshape(3, rows, cols + 1)
    assert np.all(body[..., -1] == vocab.eol)
    assert np.all((body[..., :-1] >= vocab.visual_offset) & (body[..., :-1] < vocab.visual_offset + 64))
    np.testing.assert_array_equal(result.tokens[:, -3:], [[vocab.eof, vocab.eoi, vocab.eos]] * 3)
    assert result.images.shape == (3, 10, 12, 3) and result.images.dtype == np.uint8


def test_fixed_window_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, "adaptive-ish", True):
        with pytest.raises(zipjax.ZipjaxError, match="FixedWindow lag"):
            FixedWindow(bad)


def test_pallas_kernel_path_gives_the_same_image(emu3):
    args = dict(size=(8, 10), negative_prompt="blurry", temperature=0.0)
    jnp_path = generate_image(emu3, ["a cat", "a red sofa"], decoder=FixedWindow(2, kernel=False), **args)
    kernel = generate_image(emu3, ["a cat", "a red sofa"], decoder=FixedWindow(2, kernel=True), **args)
    np.testing.assert_array_equal(kernel.tokens, jnp_path.tokens)


def test_acceptance_rule_gives_the_new_distribution():
    """Drafts from p_old, verified against p_new: the tokens kept or resampled are distributed as p_new."""
    import jax
    import jax.numpy as jnp

    from zipjax.zipar.acceptance import accept_or_resample

    p_old = jnp.asarray([0.5, 0.3, 0.1, 0.1, 0.0])
    p_new = jnp.asarray([0.1, 0.2, 0.3, 0.25, 0.15])  # mass where p_old has none must be reached by resampling
    n = 200_000
    draft_key, verify_key = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(draft_key, jnp.log(jnp.broadcast_to(p_old, (n, 5))), axis=-1).astype(jnp.int32)
    tokens, accepted = accept_or_resample(verify_key, drafts, jnp.broadcast_to(p_old, (n, 5)),
                                          jnp.broadcast_to(p_new, (n, 5)))
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    assert np.abs(freq - np.asarray(p_new)).max() < 0.005, freq
    # acceptance rate is sum_x min(p_old, p_new) = 0.1 + 0.2 + 0.1 + 0.1 + 0 = 0.5
    assert abs(float(accepted.mean()) - 0.5) < 0.005
    same, kept = accept_or_resample(verify_key, drafts[:1000], jnp.broadcast_to(p_new, (1000, 5)),
                                    jnp.broadcast_to(p_new, (1000, 5)))
    assert bool(kept.all()) and np.array_equal(np.asarray(same), np.asarray(drafts[:1000]))


def test_adaptive_chain_output_matches_its_target():
    """Adaptive ZipAR's chain on a toy: a draft from q, checked against p2 (row above incomplete: kept tokens are
    committed), a replacement checked against p3 at the final check. Reaching the final check, the token must be an
    exact draw from p3, so the output is min(q, p2) + (1 - sum min(q, p2)) p3. The redraw is verified against the
    residual it was drawn from; verifying it against p2 instead (the old rule) gives [0, 0.3, 0.7] at the end."""
    import jax
    import jax.numpy as jnp

    from zipjax.zipar.adaptive import verify_draft

    q, p2, p3 = (jnp.asarray(x) for x in ([0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]))
    n = 200_000
    keys = jax.random.split(jax.random.key(1), 3)
    drafts = jax.random.categorical(keys[0], jnp.log(q), shape=(n,)).astype(jnp.int32)
    check = jax.vmap(verify_draft, in_axes=(0, 0, None, None))
    token, kept, residual = check(jax.random.split(keys[1], n), drafts, q, p2)
    final = jax.vmap(verify_draft)(jax.random.split(keys[2], n), token, residual, jnp.broadcast_to(p3, (n, 3)))[0]
    old_rule = check(jax.random.split(keys[2], n), token, p2, p3)[0]
    kept, reached = np.asarray(kept), ~np.asarray(kept)
    out = np.where(kept, np.asarray(token), np.asarray(final))
    freq = lambda x: np.bincount(x, minlength=3) / len(x)
    overlap = np.minimum(q, p2)
    target = np.asarray(overlap + (1 - overlap.sum()) * p3)
    print("final check:", freq(np.asarray(final)[reached]), "old rule:", freq(np.asarray(old_rule)[reached]))
    assert np.abs(freq(np.asarray(final)[reached]) - np.asarray(p3)).max() < 0.006  # ~100k draws: 5 sigma
    assert np.abs(freq(out) - target).max() < 0.005
    assert np.abs(freq(np.asarray(old_rule)[reached]) - np.asarray(p3)).max() > 0.09  # the test sees the old bug


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_adaptive_with_a_row_wide_minimum_is_sequential(emu3, sequential, sampling):
    adaptive = generate_image(emu3, PROMPTS, decoder=AdaptiveWindow(6), **_args(sampling))
    np.testing.assert_array_equal(adaptive.tokens, sequential(sampling).tokens)
    assert adaptive.num_forward_passes == 4 * 6


def test_adaptive_with_a_minimum_wider_than_the_image_is_sequential(emu3, sequential):
    """A minimum past the row width used to leave every row after the first waiting forever (the rule held only at
    equality); it now decodes row after row, and a loop that stops progressing ends in an error, not a hang. The
    alarm bounds the test even if both regressed."""
    def too_slow(signum, frame):
        raise TimeoutError("adaptive ZipAR with a minimum window past the width did not finish in 600 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(600)
    try:
        wide = generate_image(emu3, PROMPTS, decoder=AdaptiveWindow(50), **_args(GREEDY))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    np.testing.assert_array_equal(wide.tokens, sequential(GREEDY).tokens)
    assert wide.num_forward_passes == 4 * 6


@pytest.mark.parametrize("min_window", [1, 2])
def test_adaptive_layout_and_pass_bounds(emu3, min_window):
    rows, cols = 5, 6
    result = generate_image(emu3, ["mountains at sunset", "a cat", "a red sofa"], size=(10, 12), top_k=16, seed=2,
                            decoder=AdaptiveWindow(min_window))
    vocab = emu3.vocab
    body = result.tokens[:, : rows * (cols + 1)].reshape(3, rows, cols + 1)
    assert np.all(body[..., -1] == vocab.eol)
    assert np.all((body[..., :-1] >= vocab.visual_offset) & (body[..., :-1] < vocab.visual_offset + 64))
    # every row starts at the earliest one verification after the draft, at the latest when the row above ends
    assert (rows - 1) * (min_window + 1) + cols <= result.num_forward_passes <= rows * cols
    greedy = generate_image(emu3, "a cat", size=(10, 12), temperature=0.0, decoder=AdaptiveWindow(min_window))
    assert greedy.num_forward_passes <= rows * cols
    if min_window == 2:  # the interpreted kernel costs most of this test's time: one schedule suffices
        kernel = generate_image(emu3, "a cat", size=(10, 12), temperature=0.0,
                                decoder=AdaptiveWindow(min_window, kernel=True))
        np.testing.assert_array_equal(kernel.tokens, greedy.tokens)


def test_speculative_jacobi_decoding_peer(emu3, sequential):
    """SJD commits exact draws: greedy it reproduces sequential decoding, in fewer passes; sampled it keeps the
    layout."""
    reference = sequential(GREEDY)
    for window in (2, 8):
        sjd = generate_image(emu3, PROMPTS, decoder=SJD(window), **_args(GREEDY))
        np.testing.assert_array_equal(sjd.tokens, reference.tokens)
        assert sjd.num_forward_passes < reference.num_forward_passes
    sampled = generate_image(emu3, PROMPTS, decoder=SJD(4), **_args(dict(top_k=8, seed=1)))
    body = sampled.tokens[:, : 4 * 7].reshape(2, 4, 7)
    assert np.all(body[..., -1] == emu3.vocab.eol)
    assert np.all((body[..., :-1] >= emu3.vocab.visual_offset) & (body[..., :-1] < emu3.vocab.visual_offset + 64))
    with pytest.raises(zipjax.ZipjaxError, match="SJD jacobi_window"):
        SJD(1)


def test_sjd_kernel_path_gives_the_same_image(emu3):
    """SJD writes the same scatter cache as ZipAR, so it takes the same `kernel` (interpreted here)."""
    args = dict(size=(8, 10), negative_prompt="blurry", temperature=0.0)
    jnp_path = generate_image(emu3, ["a cat", "a red sofa"], decoder=SJD(4, kernel=False), **args)
    kernel = generate_image(emu3, ["a cat", "a red sofa"], decoder=SJD(4, kernel=True), **args)
    np.testing.assert_array_equal(kernel.tokens, jnp_path.tokens)


def test_decoders_validate_themselves(emu3):
    """Each decoder refuses bad settings when it is made, in one line naming the setting; generate_image refuses
    what is not a decoder."""
    from zipjax.image import Sequential

    cases = [(lambda: FixedWindow(4, kernel="yes"), "FixedWindow kernel"),
             (lambda: AdaptiveWindow(0), "AdaptiveWindow min_lag must be a positive integer"),
             (lambda: AdaptiveWindow(2.5), "AdaptiveWindow min_lag has the wrong type"),
             (lambda: AdaptiveWindow(4, kernel=1), "AdaptiveWindow kernel"),
             (lambda: SJD(1), "SJD jacobi_window must be >= 2"),
             (lambda: SJD(None), "SJD jacobi_window has the wrong type"),
             (lambda: SJD(4, kernel="auto"), "SJD kernel"), (lambda: Sequential(kv="zipcache"), "kv must be None"),
             (lambda: generate_image(emu3, "a cat", size=(8, 8), decoder=4), "decoder must be a decoder object")]
    for make, message in cases:
        with pytest.raises(zipjax.ZipjaxError, match=message) as error:
            make()
        assert "\n" not in str(error.value)
    assert FixedWindow(np.int64(3)) == FixedWindow(3) and isinstance(FixedWindow(np.int64(3)).lag, int)
    assert AdaptiveWindow().min_lag == 4 and FixedWindow(3).kernel is None


def test_deprecated_arguments_still_choose_the_decoder(emu3):
    """The keyword arguments before decoder objects map onto them for one release, each with a DeprecationWarning;
    mixing them with decoder=, or combinations no decoder expresses, are refused."""
    from zipjax.image import Sequential, deprecated_decoder

    default = Sequential()
    mapping = [(dict(zipar_window=3), FixedWindow(3)), (dict(zipar_window=3, zipar_kernel=True), FixedWindow(3, True)),
               (dict(zipar_window="adaptive"), AdaptiveWindow(4)),
               (dict(zipar_window="adaptive", zipar_min_window=2, zipar_kernel=False), AdaptiveWindow(2, False)),
               (dict(sjd_window=8), SJD(8)), (dict(kv=zipjax.kv.KIVI()), Sequential(zipjax.kv.KIVI())),
               (dict(zipar_min_window=5), default)]
    for old, decoder in mapping:
        with pytest.warns(DeprecationWarning, match="decoder="):
            assert deprecated_decoder(default, old) == decoder
    assert deprecated_decoder(FixedWindow(2), {}) == FixedWindow(2)
    refused = [(dict(zipar_window=2, sjd_window=4), "excludes ZipAR"), (dict(zipar_window="adaptive-ish"), "zipar"),
               (dict(zipar_window=0), "zipar_window"), (dict(sjd_window=2, kv=zipjax.kv.KIVI()), "one token per pass"),
               (dict(zipar_min_window=0), "min_window")]
    for old, message in refused:
        with pytest.warns(DeprecationWarning), pytest.raises(zipjax.ZipjaxError, match=message):
            deprecated_decoder(default, old)
    with pytest.warns(DeprecationWarning), pytest.raises(zipjax.ZipjaxError, match="give decoder= only"):
        deprecated_decoder(FixedWindow(2), dict(zipar_window=2))
    with pytest.raises(TypeError, match="zipar_windows"):
        deprecated_decoder(default, dict(zipar_windows=2))
    args = dict(size=(8, 10), negative_prompt="blurry", temperature=0.0)
    with pytest.warns(DeprecationWarning, match="zipar_window"):
        old = generate_image(emu3, "a cat", zipar_window=2, **args)
    np.testing.assert_array_equal(old.tokens, generate_image(emu3, "a cat", decoder=FixedWindow(2), **args).tokens)
