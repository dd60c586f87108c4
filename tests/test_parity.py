"""Numerical parity with transformers on tiny random configs (float32 logits within 1e-4 absolute).

Covers LLaMA with GQA, the Llama-3.1 `llama3` RoPE scaling, and Mistral with a sliding window shorter than the
prompt; and checks that the cached path (chunked prefill, then one token at a time) gives the same logits as one
uncached pass.
"""

import jax.numpy as jnp
import numpy as np
import torch
from conftest import random_ids

from zipjax.kv.dense import KVCache

TOL = 1e-4


def test_logits_match_transformers(tiny):
    model = tiny.load()
    ids = random_ids(2, 40)  # longer than Mistral's window of 8 and than llama3's original context of 16
    ours = np.asarray(model.logits(ids))
    with torch.no_grad():
        ref = tiny.hf(torch.tensor(ids)).logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"{tiny.name}: logits max abs error {err:.2e}")
    assert ours.shape == ref.shape == (2, 40, 256)
    assert err <= TOL


def test_left_padded_batch_matches_transformers(tiny):
    """Each sequence of a left-padded batch gets the logits it would get alone (positions start at its first token)."""
    model = tiny.load()
    ids = random_ids(2, 20, seed=1)
    starts = np.array([6, 0])
    cache = KVCache.init(model.config, 2, 32, starts=jnp.asarray(starts))
    positions = np.maximum(np.arange(20)[None, :] - starts[:, None], 0)
    ours, _ = model.apply(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), cache)
    mask = torch.tensor((np.arange(20)[None, :] >= starts[:, None]).astype(np.int64))
    with torch.no_grad():
        ref = tiny.hf(torch.tensor(ids), attention_mask=mask).logits.numpy()
    for b, start in enumerate(starts):
        err = np.abs(np.asarray(ours)[b, start:] - ref[b, start:]).max()
        print(f"{tiny.name}: sequence {b} (start {start}) max abs error {err:.2e}")
        assert err <= TOL


def test_cached_decoding_matches_single_pass(tiny):
    model = tiny.load()
    ids = random_ids(2, 24, seed=2)
    full = np.asarray(model.logits(ids))
    cache = KVCache.init(model.config, 2, 64)
    positions = np.broadcast_to(np.arange(24), (2, 24))
    pieces = []
    for lo, hi in [(0, 13), *[(t, t + 1) for t in range(13, 24)]]:  # a prefill chunk, then single tokens
        logits, cache = model.apply(jnp.asarray(ids[:, lo:hi], jnp.int32),
                                    jnp.asarray(positions[:, lo:hi], jnp.int32), cache)
        pieces.append(np.asarray(logits))
    assert int(cache.cursor) == 24
    err = np.abs(np.concatenate(pieces, axis=1) - full).max()
    print(f"{tiny.name}: cached vs uncached max abs error {err:.2e}")
    assert err <= 1e-5


def test_output_head_of_a_vocabulary_range(tiny):
    """An `output_head` of a vocabulary range (what image decoding uses to skip the text part of the head) gives
    exactly those columns of the full logits."""
    from zipjax.transformer import Transformer, output_head

    model = tiny.load()
    ids = jnp.asarray(random_ids(2, 9, seed=3), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    full, _ = Transformer(model.config).apply({"params": model.params}, ids, positions)
    part, _ = Transformer(model.config).apply({"params": model.params}, ids, positions,
                                            head=output_head(model.params, model.config, (100, 37)))
    assert part.shape == (2, 9, 37)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full)[..., 100:137], atol=1e-6)
