"""Token saliency from attention: ZipCache's normalized score, exact or from probe queries.

The accumulated score of key j (H2O, MiKV) is the attention mass it receives, sum_i A[i, j]. Under a causal mask
early keys are seen by more queries, so it favours the start of the sequence. ZipCache normalizes by the number of
queries that see the key: p~_j = sum_i A[i, j] / nnz(A[:, j]) (paper Eq. 8).

Probe approximation (paper §4.3): only a few query rows are computed explicitly (the most recent 5% of the prompt
and 5% drawn at random before them), so every other query can go through a fused attention kernel. For the
normalizer there are two readings:

  "probe": nnz over the probe rows, the number of probes at or after j: Eq. 8 applied to A_probe as the paper
          says; an average of the attention j receives from the probes that can see it.
  "code": the official code's nnz of the *full* causal matrix (L - j), whatever the probes.

Both are measured against the exact score on a trained model in benchmarks/kvcache.py (probe overlap, and
perplexity on two held-out text sets); "code" scored better on both, so it is ZipCache's default. Scores of a
GQA group are summed over its query heads, giving one score per KV head as in the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zipjax.attention import grouped_probs

NORMALIZATIONS = ("probe", "code")


def attention_probs(q: jax.Array, k: jax.Array, q_slots: jax.Array, k_slots: jax.Array,
                    k_valid: jax.Array) -> jax.Array:
    """Causal softmax attention of queries over keys, float32 [batch, kv_heads, group, q, k].

    q: [batch, q, heads, head_dim]; k: [batch, k, kv_heads, head_dim]; q_slots [batch, q], k_slots [k] positions;
    k_valid bool [batch, k].
    """
    mask = (k_slots[None, None, :] <= q_slots[:, :, None]) & k_valid[:, None, :]  # [batch, q, k]
    return grouped_probs(q, k.transpose(0, 2, 1, 3), mask[:, None, None])


def normalized_score(probs: jax.Array, q_slots: jax.Array, k_slots: jax.Array, k_valid: jax.Array,
                     normalize: str = "probe", total_queries: jax.Array | None = None) -> jax.Array:
    """float32 [batch, kv_heads, k]: column sums of `probs` [batch, kv_heads, group, q, k] over the group heads and
    the query rows, divided by the number of rows that see each key ("probe"), or by `total_queries` [batch, k], the
    number of queries of the full causal matrix that see each key ("code"). Invalid keys score -inf."""
    mass = probs.sum(axis=(2, 3))  # [batch, kv_heads, k]
    if normalize == "probe":
        nnz = (k_slots[None, None, :] <= q_slots[:, :, None]).sum(axis=1).astype(jnp.float32)  # [batch, k]
    else:
        nnz = total_queries.astype(jnp.float32)
    score = mass / jnp.maximum(nnz, 1.0)[:, None, :]
    return jnp.where(k_valid[:, None, :], score, -jnp.inf)


def accumulated_score(probs: jax.Array, k_valid: jax.Array) -> jax.Array:
    """H2O's accumulated attention, float32 [batch, kv_heads, k] (for comparison)."""
    return jnp.where(k_valid[:, None, :], probs.sum(axis=(2, 3)), -jnp.inf)


def probe_counts(length: int, probe_ratio: float) -> tuple[int, int]:
    """(recent, random) probe rows as ZipCache's 5% + 5% of a `length`-token prompt."""
    n_recent = max(1, -(-int(probe_ratio * length) // 2))
    return n_recent, max(0, int(probe_ratio * length) - n_recent)


def probe_slots(starts: jax.Array, length: int, probe_ratio: float, key: jax.Array,
                probes: tuple[int, int] | None = None, replace: bool = True) -> jax.Array:
    """int32 [batch, n_probes]: the last n_recent slots plus n_random drawn uniformly among each sequence's earlier
    real tokens (slots >= its start): with replacement (`replace`, as ZipCache's code) or without (ZipVL). Without
    replacement, a sequence with fewer earlier real tokens than n_random gets the rest as padding slots (start - 1),
    whose rows see no key and add nothing. (n_recent, n_random) is `probes` (fixed counts, ZipVL's 64 + 64, clipped
    to the prompt) or `probe_counts(length, probe_ratio)`."""
    if probes is None:
        n_recent, n_random = probe_counts(length, probe_ratio)
    else:
        n_recent = max(1, min(probes[0], length))
        n_random = min(probes[1], length - n_recent)
    recent = jnp.arange(length - n_recent, length, dtype=jnp.int32)
    recent = jnp.broadcast_to(recent, (starts.shape[0], n_recent))
    if n_random <= 0:
        return recent
    if not replace:
        return jnp.concatenate([_distinct_slots(starts, length - n_recent, n_random, key), recent], axis=1)
    u = jax.random.uniform(key, (starts.shape[0], n_random))
    span = jnp.maximum(length - n_recent - starts, 1).astype(jnp.float32)
    rand = jnp.minimum(starts[:, None] + jnp.floor(u * span[:, None]).astype(jnp.int32), length - 1)
    return jnp.concatenate([rand, recent], axis=1)


def _distinct_slots(starts: jax.Array, end: int, count: int, key: jax.Array) -> jax.Array:
    """int32 [batch, count]: `count` distinct slots drawn uniformly from [start, end) per sequence (a random
    permutation's first `count`), in slot order; past a sequence's end - start real slots, padding slot start - 1."""
    slots = jnp.arange(end, dtype=jnp.int32)
    real = slots[None, :] >= starts[:, None]  # [batch, end]
    u = jax.random.uniform(key, (starts.shape[0], end))
    _, chosen = jax.lax.top_k(jnp.where(real, u, -1.0), count)  # real slots first, in random order
    ok = jnp.take_along_axis(real, chosen, axis=1)
    return jnp.sort(jnp.where(ok, chosen, starts[:, None] - 1), axis=1).astype(jnp.int32)


def prompt_saliency(q: jax.Array, k: jax.Array, starts: jax.Array, *, method: str, probe_ratio: float,
                    normalize: str, key: jax.Array) -> jax.Array:
    """Normalized saliency [batch, kv_heads, length] of the prompt's keys (slots 0..length-1, real from `starts`).

    method "exact" uses every query (the full attention matrix); "probe" only the probe rows.
    q: [batch, length, heads, head_dim]; k: [batch, length, kv_heads, head_dim].
    """
    return prompt_statistics(q, k, starts, method=method, probe_ratio=probe_ratio, normalize=normalize, key=key)[1]


def prompt_statistics(q: jax.Array, k: jax.Array, starts: jax.Array, *, method: str, probe_ratio: float,
                      normalize: str, key: jax.Array, probes: tuple[int, int] | None = None, replace: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
    """(mass, score) float32 [batch, kv_heads, length]: the attention mass each prompt key receives from the probe
    rows (every row for "exact"), summed over each KV head's query heads, and the normalized score of
    `prompt_saliency` (-inf for padding; "exact" normalizes by the full causal count). `probes`: fixed
    (recent, random) probe counts instead of `probe_ratio`; `replace`: how the random probes are drawn."""
    batch, length = q.shape[:2]
    k_slots = jnp.arange(length, dtype=jnp.int32)
    k_valid = k_slots[None, :] >= starts[:, None]  # [batch, length]
    total = jnp.maximum(length - k_slots, 0)[None, :]  # queries that see key j in the full causal matrix
    if method == "exact":
        q_slots = jnp.broadcast_to(k_slots, (batch, length))
        probs = attention_probs(q, k, q_slots, k_slots, k_valid)
        normalize = "code"
    else:
        q_slots = probe_slots(starts, length, probe_ratio, key, probes, replace)
        q_probe = jnp.take_along_axis(q, q_slots[:, :, None, None], axis=1)
        probs = attention_probs(q_probe, k, q_slots, k_slots, k_valid)
    mass = probs.sum(axis=(2, 3))
    return mass, normalized_score(probs, q_slots, k_slots, k_valid, normalize, total)
