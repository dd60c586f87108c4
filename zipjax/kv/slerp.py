"""MiniCache's cross-layer merge (Liu et al., NeurIPS 2024) as pure functions: SLERP of directions, norms kept,
distinct tokens retained. The method and its cache are zipjax.kv.minicache.

For a token's K (or V) vectors x0 in layer l-1 and x1 in layer l (the vector is the last axis: reshape to
[..., heads * head_dim] to merge whole tokens as the paper writes it, or keep [..., heads, head_dim] per head), with
Omega the angle between them:

  e = sin((1 - t) Omega) / sin(Omega) * x0 / |x0| + sin(t Omega) / sin(Omega) * x1 / |x1|      (paper Eq. 3)

t weighs the deeper layer (the main text; appendix Algorithm 2 swaps the roles, we follow the text). e is a unit
vector; each layer keeps its own norm and is restored as e * |x| (Eq. 2). As Omega -> 0 the weights tend to
(1 - t, t) and e to the normalized linear interpolation, which is what is computed there (no 0 / 0).

Retention: pairs whose directions differ most are kept unmerged. The paper's printed inequality
(d_i < d_min + gamma (d_max - d_min), d = Omega / pi) selects the *most similar* pairs, contradicting its text
("highly distinct", "unmergeable" tokens) and its Figure 2b; the default `retain="distinct"` follows the text, and
`retain="printed"` is the literal formula. Static shapes: a fixed number of retained tokens per sequence (`top-k` on
the distance, the paper's fixed-ratio variant, Table C) instead of a data-dependent set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6


def angle(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Omega in [0, pi] between the last-axis vectors of x0 and x1: [...]."""
    n0 = jnp.linalg.norm(x0, axis=-1)
    n1 = jnp.linalg.norm(x1, axis=-1)
    cos = jnp.sum(x0 * x1, axis=-1) / jnp.maximum(n0 * n1, EPS)
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def slerp_direction(x0: jax.Array, x1: jax.Array, t: float) -> jax.Array:
    """The unit merged direction e [..., d] of Eq. 3 (float32)."""
    x0, x1 = x0.astype(jnp.float32), x1.astype(jnp.float32)
    u0 = x0 / jnp.maximum(jnp.linalg.norm(x0, axis=-1, keepdims=True), EPS)
    u1 = x1 / jnp.maximum(jnp.linalg.norm(x1, axis=-1, keepdims=True), EPS)
    omega = angle(u0, u1)[..., None]
    small = omega < 1e-4
    sin = jnp.where(small, 1.0, jnp.sin(omega))
    w0 = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
    w1 = jnp.where(small, t, jnp.sin(t * omega) / sin)
    e = w0 * u0 + w1 * u1
    # exact SLERP of unit vectors is unit; the small-angle branch (lerp) and rounding are renormalized
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), EPS)


def merge_pair(x0: jax.Array, x1: jax.Array, t: float = 0.6, retain: int = 0, rule: str = "distinct",
               valid: jax.Array | None = None):
    """Merge two layers' states [batch, tokens, ..., d] (tokens on axis 1).

    Returns (direction [batch, tokens, ..., d], norms0, norms1 [batch, tokens, ...], retained ids int32
    [batch, retain], retained x0 and x1 [batch, retain, ..., d]). A token's distance is the mean angle over any
    middle axes (heads), so a retained token keeps all its heads. valid bool [batch, tokens]: tokens that may be
    retained (padding is not).
    """
    if rule not in ("distinct", "printed"):
        raise ValueError(f"rule must be 'distinct' or 'printed', got {rule!r}")
    direction = slerp_direction(x0, x1, t)
    norms0 = jnp.linalg.norm(x0.astype(jnp.float32), axis=-1)
    norms1 = jnp.linalg.norm(x1.astype(jnp.float32), axis=-1)
    distance = angle(x0, x1) / jnp.pi  # [batch, tokens, ...]
    distance = distance.reshape(distance.shape[0], distance.shape[1], -1).mean(axis=-1)  # [batch, tokens]
    order = distance if rule == "distinct" else -distance
    if valid is not None:
        order = jnp.where(valid, order, -jnp.inf)
    ids = jax.lax.top_k(order, retain)[1].astype(jnp.int32) if retain else jnp.zeros((x0.shape[0], 0), jnp.int32)
    take = lambda x: jnp.take_along_axis(x, ids.reshape(*ids.shape, *([1] * (x.ndim - 2))), axis=1)
    return direction, norms0, norms1, ids, take(x0), take(x1)


def restore(direction: jax.Array, norms: jax.Array, ids: jax.Array, retained: jax.Array) -> jax.Array:
    """One layer's states from the shared direction and its norms, with the retained tokens put back exactly."""
    x = direction * norms[..., None]
    batch = jnp.arange(x.shape[0])[:, None]
    return x.at[batch, ids].set(retained.astype(x.dtype))


def memory_bytes(batch: int, layers: int, hidden: int, tokens: int, merged_from: int | None = None,
                 retain_ratio: float = 0.0) -> float:
    """The paper's memory accounting (§4.3, FP16 K and V): 4 b r h (s + n) bytes in full; merging the pairs from
    layer r/2 on shares one direction per pair (3 b r h (s + n)), adds the norms (2 b r (s + n)) and the retained
    tokens (2 * gamma * b r h (s + n) at gamma = retain_ratio): (3.1 h + 2) b r (s + n) at gamma = 0.05."""
    full = 4 * batch * layers * hidden * tokens
    if merged_from is None:
        return full
    pairs = (layers - merged_from) // 2
    saved = 4 * batch * pairs * hidden * tokens  # per pair one layer's FP16 K and V (2 arrays x 2 bytes) fewer
    norms = 2 * batch * layers * tokens if pairs else 0
    retained = 2 * retain_ratio * batch * layers * hidden * tokens
    return full - saved + norms + retained
