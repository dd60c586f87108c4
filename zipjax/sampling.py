"""Next-token selection: greedy, or temperature sampling with optional top-k and top-p (nucleus) filtering.

Which filters run is static (`SamplingMode`); their values (temperature, k, p) are traced arrays, so changing them
does not recompile. Filtering follows transformers' order and tie rules: temperature, then top-k (keep every logit
>= the k-th largest), then top-p (keep the smallest prefix of the sorted distribution whose mass reaches p, and
always the most likely token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zipjax.errors import ZipjaxError
from zipjax.validate import integer, number, optional

NEG_INF = -jnp.inf
MIN_TEMPERATURE = 1e-6  # below this, logits / temperature overflow float32; 0 means greedy
MAX_SEED = (1 << 32) - 1  # jax keys from Python ints keep 32 bits here: larger seeds would collide silently
MAX_TOP_K = (1 << 31) - 1


def check_settings(temperature, top_k, top_p, seed) -> tuple[float, int | None, float | None, int]:
    """The sampling arguments checked: finite numbers in range, integers that fit the traced int32 / key bits.
    NaN, infinity, a temperature too small to divide by, a negative or oversized seed are errors here, not NaN
    tokens or a silently different random stream later."""
    temperature = number(temperature, "temperature", lo=0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ZipjaxError(f"temperature {temperature} is too small to sample with (below {MIN_TEMPERATURE}); "
                          "use 0 for greedy decoding")
    top_k = optional(integer, top_k, "top_k", lo=1, hi=MAX_TOP_K)
    top_p = optional(number, top_p, "top_p", lo=0, hi=1, lo_open=True)
    seed = integer(seed, "seed", lo=0, hi=MAX_SEED)
    return temperature, top_k, top_p, seed


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    greedy: bool = True
    top_k: bool = False
    top_p: bool = False
    # A compile-time k: sample among the k best candidates found with `lax.top_k` instead of sorting the whole
    # vocabulary and drawing noise for all of it (Emu3 samples among 32,768 visual tokens at every position; with
    # k = 2048 this is about 8x cheaper on CPU). Ties at the k-th value keep exactly k tokens, not all of them.
    static_top_k: int | None = None


def filter_logits(logits: jax.Array, top_k: jax.Array | None, top_p: jax.Array | None) -> jax.Array:
    """logits float32 [batch, vocab] with filtered-out entries set to -inf. top_k: int32 [], top_p: float32 []."""
    if top_k is None and top_p is None:
        return logits
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [batch, vocab]
    if top_k is not None:
        k = jnp.clip(top_k, 1, logits.shape[-1])
        kth = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=1, keepdims=True)  # [batch, 1]
        logits = jnp.where(logits < kth, NEG_INF, logits)
        sorted_desc = jnp.where(sorted_desc < kth, NEG_INF, sorted_desc)
    if top_p is not None:
        kept = _nucleus(sorted_desc, top_p)
        threshold = jnp.min(jnp.where(kept > NEG_INF, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def _nucleus(sorted_desc: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits sorted in descending order with everything past the top-p nucleus set to -inf (the most likely
    token always kept)."""
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = (mass_before < top_p).at[:, 0].set(True)
    return jnp.where(keep, sorted_desc, NEG_INF)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           mode: SamplingMode) -> jax.Array:
    """int32 [batch] next tokens from float32 logits [batch, vocab]."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if mode.static_top_k is not None:
        values, indices = jax.lax.top_k(logits, min(mode.static_top_k, logits.shape[-1]))  # sorted, descending
        if mode.top_p:
            values = _nucleus(values, top_p)
        choice = jax.random.categorical(key, values, axis=-1)
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    logits = filter_logits(logits, top_k if mode.top_k else None, top_p if mode.top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
