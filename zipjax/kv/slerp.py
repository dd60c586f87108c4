"""MiniCache's cross-layer merge (Liu et al., NeurIPS 2024) as pure functions: SLERP of directions, norms kept,
distinct tokens retained. The method and its cache are zipjax.kv.minicache.

For a token's K (or V) vectors x0 in layer l-1 and x1 in layer l (the vector is the last axis: reshape to
[..., heads * head_dim] to merge whole tokens as the paper writes it, or keep [..., heads, head_dim] per head), with
Omega the angle between them:

  e = sin((1 - t) Omega) / sin(Omega) * x0 / |x0| + sin(t Omega) / sin(Omega) * x1 / |x1|      (paper Eq. 3)

t weighs the deeper layer (the main text; appendix Algorithm 2 swaps the roles, we follow the text). e is a unit
vector; each layer keeps its own norm and is restored as e * |x| (Eq. 2). As Omega -> 0 the weights tend to
(1 - t, t) and e to the normalized linear interpolation, which is what is computed there (no 0 / 0).

Retention (Eq. 4): with d_i = Omega_i / pi the normalized angular distance of token i and d_min, d_max its extremes
over the sequence's real tokens, the paper keeps unmerged the tokens past a data-dependent threshold. Its printed
inequality (d_i < d_min + gamma (d_max - d_min)) selects the *most similar* pairs, contradicting its text ("highly
distinct", "unmergeable" tokens) and its Figure 2b; the default `rule="distinct"` follows the text (d_i > d_max -
gamma (d_max - d_min)), `rule="printed"` is the literal formula. Static shapes: the retained tokens go into a fixed
room of `capacity` slots; when the threshold selects more, the room holds the most distinct (printed: most similar)
of them and the number the threshold selected is returned, so a caller can report what did not fit. `gamma=None`
is the paper's fixed-ratio variant (Table C): the `capacity` most distinct tokens, whatever their distance.
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


def token_distance(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """d = Omega / pi per token, float32 [batch, tokens], of states [batch, tokens, ..., d]: the mean over any
    middle axes (heads), so a retained token keeps all its heads."""
    distance = angle(x0.astype(jnp.float32), x1.astype(jnp.float32)) / jnp.pi  # [batch, tokens, ...]
    return distance.reshape(distance.shape[0], distance.shape[1], -1).mean(axis=-1)


def retain_tokens(distance: jax.Array, capacity: int, rule: str = "distinct", gamma: float | None = None,
                  valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The retained tokens: ids int32 [batch, capacity] (`tokens` where a slot is unused, so a scatter with
    mode="drop" skips it) and the count the rule selected, int32 [batch] (may exceed `capacity`).

    distance float32 [batch, tokens]; gamma: Eq. 4's threshold (None: the fixed count `capacity`); valid bool
    [batch, tokens]: tokens that may be retained (padding is not)."""
    if rule not in ("distinct", "printed"):
        raise ValueError(f"rule must be 'distinct' or 'printed', got {rule!r}")
    batch, tokens = distance.shape
    valid = jnp.ones(distance.shape, bool) if valid is None else valid
    order = jnp.where(valid, distance if rule == "distinct" else -distance, -jnp.inf)
    if gamma is None:
        selected = valid
    else:
        d_max = jnp.where(valid, distance, -jnp.inf).max(axis=1, keepdims=True)
        d_min = jnp.where(valid, distance, jnp.inf).min(axis=1, keepdims=True)
        if rule == "distinct":
            selected = valid & (distance > d_max - gamma * (d_max - d_min))
        else:
            selected = valid & (distance < d_min + gamma * (d_max - d_min))
    wanted = selected.sum(axis=1).astype(jnp.int32)
    if capacity == 0:
        return jnp.zeros((batch, 0), jnp.int32), wanted
    _, ids = jax.lax.top_k(jnp.where(selected, order, -jnp.inf), capacity)
    kept = jnp.take_along_axis(selected, ids, axis=1)
    return jnp.where(kept, ids, tokens).astype(jnp.int32), wanted


def take_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
    """x [batch, tokens, ...] at ids [batch, r] (ids past the end read as zeros): [batch, r, ...]."""
    tokens = x.shape[1]
    index = jnp.minimum(ids, tokens - 1).reshape(*ids.shape, *([1] * (x.ndim - 2)))
    inside = (ids < tokens).reshape(index.shape)
    return jnp.where(inside, jnp.take_along_axis(x, index, axis=1), 0)


def merge_pair(x0: jax.Array, x1: jax.Array, t: float = 0.6, retain: int = 0, rule: str = "distinct",
               valid: jax.Array | None = None, gamma: float | None = None):
    """Merge two layers' states [batch, tokens, ..., d] (tokens on axis 1).

    Returns (direction [batch, tokens, ..., d], norms0, norms1 [batch, tokens, ...], retained ids int32
    [batch, retain], retained x0 and x1 [batch, retain, ..., d]). `retain` is the room; `gamma` None keeps the
    `retain` most distinct tokens, a float keeps those past Eq. 4's threshold, up to `retain` (unused ids are
    `tokens`, their states zero). valid bool [batch, tokens]: tokens that may be retained (padding is not).
    """
    direction = slerp_direction(x0, x1, t)
    norms0 = jnp.linalg.norm(x0.astype(jnp.float32), axis=-1)
    norms1 = jnp.linalg.norm(x1.astype(jnp.float32), axis=-1)
    ids, _ = retain_tokens(token_distance(x0, x1), retain, rule, gamma, valid)
    return direction, norms0, norms1, ids, take_tokens(x0, ids), take_tokens(x1, ids)


def restore(direction: jax.Array, norms: jax.Array, ids: jax.Array, retained: jax.Array) -> jax.Array:
    """One layer's states from the shared direction and its norms, with the retained tokens put back exactly (ids
    past the end are unused slots)."""
    x = direction * norms[..., None]
    batch = jnp.arange(x.shape[0])[:, None]
    return x.at[batch, ids].set(retained.astype(x.dtype), mode="drop")


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
