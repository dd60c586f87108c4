"""ZipVL and MiniCache against their papers' rules, recomputed independently in numpy (issue 26): ZipVL's p and T per
layer with the default settings (Eq. 6 and 8 over 64 + 64 probe queries, one T per layer, no storage clip), its
decode re-selection from the current query's attention over the window (Algorithm 1), and MiniCache's retained set
by Eq. 4's threshold within its static room."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipjax import kv
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.harness.kv_analysis import prompt_states
from zipjax.kv import QuantizedKVCache
from zipjax.kv.minicache import MergedKVCache
from zipjax.kv.quantized import dequantize_layer
from zipjax.kv.saliency import probe_slots

ROOT = Path(__file__).resolve().parents[1]
# jitted whole: eagerly each jnp op (and each lax.cond, traced anew per call) is a compile of its own
_probe_slots = jax.jit(probe_slots, static_argnums=(1, 2, 4), static_argnames="replace")
_attend = jax.jit(lambda cache, q, k, v: cache.attend(0, q, k, v, None))


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float32 normal samples from numpy (jax.random.normal compiles for seconds on CPU)."""
    return rng.standard_normal(shape, np.float32)


def _config(layers: int) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=layers,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, dtype="float32")


def _softmax_rows(q: np.ndarray, k: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """q [rows, heads, d], k [keys, kv_heads, d], visible bool [rows, keys] -> probs [rows, heads, keys] (float64,
    head h reads KV head h // group, scores scaled by d^-1/2)."""
    group = q.shape[1] // k.shape[1]
    kh = np.repeat(k, group, axis=1)  # [keys, heads, d]
    scores = np.einsum("rhd,khd->rhk", q, kh) / np.sqrt(q.shape[-1])
    scores = np.where(visible[:, None, :], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    e = np.where(visible[:, None, :], np.exp(scores), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


def _eq6_count(column: np.ndarray, tau: float) -> int:
    """The fewest tokens whose summed mass reaches tau of the total (Eq. 6), at least one."""
    ordered = np.sort(column)[::-1]
    cumulative = np.cumsum(ordered)
    return max(1, min(int((cumulative < tau * cumulative[-1]).sum()) + 1, int((column > 0).sum())))


def _zipvl_numpy(q: np.ndarray, k: np.ndarray, probes: np.ndarray, tau: float) -> tuple[int, set[int]]:
    """ZipVL's p and T for one sequence: probe rows' attention, mass over probe rows and every head, p by Eq. 6,
    T the top p by Eq. 8's normalized score (mass / number of probe rows that see the token) summed over the
    layer's heads, the last token always in T."""
    n = k.shape[0]
    visible = np.arange(n)[None, :] <= probes[:, None]  # causal, no padding
    probs = _softmax_rows(q[probes], k, visible)  # [probes, heads, n]
    mass = probs.sum(axis=(0, 1))  # [n]: every probe row and head
    p = _eq6_count(mass, tau)
    score = mass / np.maximum(visible.sum(axis=0), 1)
    score[-1] = np.inf
    return p, set(np.argsort(-score, kind="stable")[:p].tolist())


@pytest.fixture(scope="module")
def prompt(stdlib_llama):
    text = (ROOT / "zipjax" / "generate.py").read_text()[:3000]
    return np.asarray([stdlib_llama.tokenizer.encode(text)[:96]], np.int32)


@pytest.fixture(scope="module")
def states(stdlib_llama, prompt):
    """Per layer, the prompt's (queries, keys, values): an un-jitted forward pass, run once for the module."""
    return prompt_states(stdlib_llama, prompt)


def test_zipvl_p_and_T_per_layer_equal_numpy_with_the_default_settings(states):
    """Per layer of the shipped model: zipjax's p (count), the stored p (no clip), and T equal the numpy rule; the
    random probes are 64 distinct earlier tokens plus the 64 most recent."""
    method = kv.ZipVL()
    assert method.ratio_range is None and method.probes == (64, 64) and method.decode_rank == "query"
    starts = jnp.zeros(1, jnp.int32)
    counts = []
    rank_prompt = jax.jit(method.rank_prompt)  # the layer traced: one program for the six layers
    for layer, (q, k, _) in enumerate(states):
        ranking = rank_prompt(q, k, starts, layer)
        key = jax.random.fold_in(jax.random.key(method.seed), layer)
        probes = np.asarray(_probe_slots(starts, 96, method.probe_ratio, key, method.probes, replace=False))[0]
        assert len(set(probes.tolist())) == 96  # 64 recent + 32 random (all the earlier tokens), none repeated
        p, important = _zipvl_numpy(np.asarray(q[0], np.float64), np.asarray(k[0], np.float64), probes, method.tau)
        assert int(ranking.count[0]) == int(ranking.stored[0]) == p
        assert set(np.asarray(ranking.order[0, 0, :p]).tolist()) == important
        assert (np.asarray(ranking.order[0]) == np.asarray(ranking.order[0, :1])).all()  # one T per layer
        counts.append(p)
    print("p per layer (96 tokens, tau 0.975):", counts)
    assert max(counts) > 0.6 * 96  # the old (0.2, 0.6) clip would have bound here


def test_zipvl_cache_stores_T_at_high_bits_and_the_rest_at_low_bits(stdlib_llama, prompt, states):
    """With a dense prefill every layer sees the dense model's states, so the cache's stored sets can be checked
    against the numpy T of each layer: T in the 4-bit store, every other token in the 2-bit store."""
    method = kv.ZipVL(sparse_prefill=False, buffer_len=8)
    n = prompt.shape[1]
    cache = QuantizedKVCache.init(stdlib_llama.config, method, 1, n + 16, n)
    _, cache = stdlib_llama.apply(jnp.asarray(prompt), jnp.arange(n)[None], cache)
    segments = cache.geometry.segments()
    for layer, (q, k, _) in enumerate(states):
        key = jax.random.fold_in(jax.random.key(method.seed), layer)
        probes = np.asarray(_probe_slots(jnp.zeros(1, jnp.int32), n, 0.1, key, method.probes, replace=False))[0]
        _, important = _zipvl_numpy(np.asarray(q[0], np.float64), np.asarray(k[0], np.float64), probes, method.tau)
        held = {}
        for store, seg in zip(cache.layers[layer].stores, segments, strict=True):
            if seg.first_block == 0:
                slots = np.asarray(store.slots[0, 0])
                held[seg.subset] = set(slots[slots >= 0].tolist())
        assert held[0] == important and held[1] == set(range(n)) - important


def test_random_probes_are_drawn_without_replacement_for_zipvl_only():
    starts = jnp.array([0, 40, 200], jnp.int32)
    slots = np.asarray(probe_slots(starts, 300, 0.1, jax.random.key(3), (64, 64), replace=False))
    for b, start in enumerate(np.asarray(starts)):
        rand = slots[b, :64]
        real = rand[rand >= start]
        assert len(set(real.tolist())) == len(real) == min(64, 236 - start)  # distinct, as many as there are
        assert (real < 236).all() and (rand[rand < start] == start - 1).all()  # the rest: one padding slot
    with_replacement = np.asarray(probe_slots(starts, 300, 0.1, jax.random.key(3), (64, 64)))
    assert kv.ZipCache().saliency == "probe" and with_replacement.shape == slots.shape  # ZipCache's draw unchanged


def _decode_until_flush(method: kv.ZipVL, n: int = 24, buffer_len: int = 8):
    """A one-layer ZipVL cache fed random states: the prompt, then buffer_len + 1 decode tokens. Returns the cache
    after buffer_len tokens (the window full), the last query, and the cache after the next token (the flush)."""
    config = _config(1)
    rng = np.random.default_rng(7)
    cache = QuantizedKVCache.init(config, method, 1, n + 2 * buffer_len, n)
    q = _normal(rng, 1, n, 4, 16)
    _, cache = _attend(cache, q, _normal(rng, 1, n, 2, 16), _normal(rng, 1, n, 2, 16))
    cache = cache.advance(n)
    steps = buffer_len + 1
    qs = _normal(rng, steps, 1, 1, 4, 16) * 3.0
    ks = _normal(rng, steps, 1, 1, 2, 16)
    vs = _normal(rng, steps, 1, 1, 2, 16)
    full = None
    for t in range(steps):
        if t == buffer_len:
            full = cache
        _, cache = _attend(cache, qs[t], ks[t], vs[t])
        cache = cache.advance(1)
    return full, qs[buffer_len - 1], cache


def test_zipvl_decode_block_is_ranked_by_the_current_query_over_the_window():
    """Algorithm 1: when the window is full, a = Softmax(q K^T)[-window:] of the current (newest) query over the
    whole cache; p by Eq. 6 over a (heads summed), T its top p. Recomputed in numpy from the dequantized prompt and
    the buffer, then compared with the mass zipjax kept and the block it stored."""
    n, window = 24, 8
    method = kv.ZipVL(buffer_len=window)
    full, q, flushed = _decode_until_flush(method, n, window)
    state = full.layers[0]
    keys, _, slots = dequantize_layer(state, method, full.geometry)
    prompt_keys = np.concatenate([np.asarray(x[0]) for x in keys], axis=1)  # [kv_heads, capacity, d]
    prompt_slots = np.concatenate([np.asarray(x[0]) for x in slots], axis=1)  # [kv_heads, capacity]
    assert (prompt_slots == prompt_slots[:1]).all()  # one T per layer: every head holds the same slots
    used = prompt_slots[0] >= 0
    all_keys = np.concatenate([prompt_keys[:, used], np.asarray(state.k_buf[0])], axis=1).transpose(1, 0, 2)
    probs = _softmax_rows(np.asarray(q[0], np.float64), all_keys.astype(np.float64),
                          np.ones((1, all_keys.shape[0]), bool))[0]  # [heads, keys]
    a = probs[:, -window:]  # the window's columns
    np.testing.assert_allclose(np.asarray(state.mass[0]), a.reshape(2, 2, window).sum(axis=1), rtol=1e-4, atol=1e-6)
    column = a.sum(axis=0)
    p = _eq6_count(column, method.tau)
    important = set((n + np.argsort(-column, kind="stable")[:p]).tolist())
    stored = {}
    for store, seg in zip(flushed.layers[0].stores, flushed.geometry.segments(), strict=True):
        if seg.first_block == 1:
            block = np.asarray(store.slots[0, 0, :seg.size])
            stored[seg.subset] = set(block[block >= 0].tolist())
    assert stored[0] == important and stored[1] == set(range(n, n + window)) - important
    window_rule = kv.ZipVL(buffer_len=window, decode_rank="window")
    full_w, _, _ = _decode_until_flush(window_rule, n, window)
    assert not np.allclose(np.asarray(full_w.layers[0].mass), np.asarray(state.mass))  # every query's mass


def _distance(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Normalized angular distance per token of whole vectors: [tokens, kv_heads, d] -> [tokens]."""
    a, b = x0.reshape(len(x0), -1), x1.reshape(len(x1), -1)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.arccos(np.clip(cos, -1, 1)) / np.pi


def _threshold_numpy(d: np.ndarray, start: int, gamma: float, room: int) -> tuple[set[int], int]:
    """Eq. 4 as the text reads it (the most distinct): tokens with d > d_max - gamma (d_max - d_min) among the real
    tokens; the room holds the most distinct of them. Returns (retained set, selected count)."""
    real = d[start:]
    selected = np.flatnonzero(real > real.max() - gamma * (real.max() - real.min())) + start
    kept = selected[np.argsort(-d[selected], kind="stable")[:room]]
    return set(kept.tolist()), len(selected)


def test_minicache_retains_by_the_threshold_within_its_room_and_reports_overflow():
    config = _config(4)
    n = 64
    rng = np.random.default_rng(4)
    k0, v0 = _normal(rng, 2, n, 2, 16), _normal(rng, 2, n, 2, 16)
    k1 = k0 + 0.6 * _normal(rng, *k0.shape)  # related layers, so distances spread
    v1 = v0 + 0.6 * _normal(rng, *v0.shape)
    starts = jnp.array([0, 5], jnp.int32)
    q = jnp.zeros((2, n, 4, 16))
    for spec, gamma in ((kv.MiniCache(start_layer=2), 0.05), (kv.MiniCache(start_layer=2, gamma=0.5, capacity=0.1),
                                                               0.5)):
        cache = MergedKVCache.init(config, spec, 2, n + 4, n, starts)
        _, cache = cache.attend(2, q, k0, v0, None)
        _, cache = cache.attend(3, q, k1, v1, None)
        room = spec.retained(n)
        (report,) = cache.retention()
        assert report["room"] == room
        for name, x0, x1 in (("k", k0, k1), ("v", v0, v1)):
            ids = np.asarray(cache.pairs[0][f"{name}_ids"])
            for b, start in enumerate(np.asarray(starts)):
                kept, selected = _threshold_numpy(_distance(np.asarray(x0[b]), np.asarray(x1[b])), start, gamma, room)
                assert set(ids[b][ids[b] < n].tolist()) == kept
                assert report[f"{name}_selected"][b] == selected and report[f"{name}_retained"][b] == len(kept)
        restored, _ = cache.restore(3)
        for b in range(2):
            kept_ids = np.asarray(cache.pairs[0]["k_ids"][b])
            kept_ids = kept_ids[kept_ids < n]
            np.testing.assert_array_equal(np.asarray(restored[b][:, kept_ids]),
                                          np.asarray(k1[b, kept_ids].transpose(1, 0, 2)))
        print(f"gamma {gamma}, room {room}:", report)
    assert report["k_selected"][0] > room  # gamma 0.5 selects past the room of 7: reported, the 7 most distinct kept
    assert cache.stored_nbytes() == cache.nbytes()  # the room is full
    assert cache.retained_unused() == 0


def test_minicache_threshold_on_the_shipped_model(stdlib_llama, prompt, states):
    """The shipped model's merged pair (4, 5): the retained sets of keys and values equal Eq. 4 in numpy, and the
    stored bytes leave out the room the threshold did not use."""
    method = kv.MiniCache()
    n = prompt.shape[1]
    cache = MergedKVCache.init(stdlib_llama.config, method, 1, n + 4, n)
    _, cache = stdlib_llama.apply(jnp.asarray(prompt), jnp.arange(n)[None], cache)
    (pair,) = method.pairs(stdlib_llama.config.num_layers)
    (report,) = cache.retention()
    room = method.retained(n)
    for name, index in (("k", 1), ("v", 2)):
        x0, x1 = (np.asarray(states[layer][index][0]) for layer in pair)
        kept, selected = _threshold_numpy(_distance(x0, x1), 0, method.gamma, room)
        ids = np.asarray(cache.pairs[0][f"{name}_ids"][0])
        assert set(ids[ids < n].tolist()) == kept and report[f"{name}_selected"] == [selected]
    print(f"shipped model, pair {pair}, room {room}:", report)
    unused = 2 * room - report["k_retained"][0] - report["v_retained"][0]
    assert cache.nbytes() - cache.stored_nbytes() == unused * cache.retained_slot_nbytes()


def test_zipvl_storage_room_unclipped_by_default_and_the_explicit_clip_kept():
    """No clip (the paper): room for the whole block in each store, p >= 1. An explicit ratio_range still clips
    exactly as before: (0.2, 0.6) of 512 tokens is room for 308 important and 512 - 103 others."""
    assert kv.ZipVL().clip_count(512) == (1, 512) and kv.ZipVL().split(512) == (512, 511)
    assert kv.ZipVL(evict=True).split(100) == (100, 0)
    clipped = kv.ZipVL(ratio_range=(0.2, 0.6))
    assert clipped.clip_count(512) == (103, 308) and clipped.split(512) == (308, 409)
    for bad in ((0.6, 0.2), (0.2,), "wide", (True, 0.5)):
        with pytest.raises(ZipjaxError, match="ratio_range"):
            kv.ZipVL(ratio_range=bad)
    with pytest.raises(ZipjaxError, match="decode_rank"):
        kv.ZipVL(decode_rank="all")
    with pytest.raises(ZipjaxError, match="retain_by"):
        kv.MiniCache(retain_by="top")
    with pytest.raises(ZipjaxError, match="capacity"):
        kv.MiniCache(capacity=1.5)
    assert kv.MiniCache(gamma=0.05, capacity=0.1).retained(512) == 52 and kv.MiniCache().retained(512) == 26
    assert kv.MiniCache(gamma=0.05, capacity=0.1, retain_by="count").retained(512) == 26
