"""MiniCache (Liu et al., NeurIPS 2024): the method, and its cache, where adjacent deep layers share one direction per
token and each keeps its norms.

    zipjax.generate(model, ids, n, kv=MiniCache(t=0.6, gamma=0.05, inner=KIVI(bits=4)))

The pairs are (l - 1, l) with l odd from the start layer S (`MiniCache.pairs`; 30 layers, S = 15: (16, 17) .. (28,
29)); other layers are stored plain. At prefill the first layer of a pair is held back; at the second, both layers'
keys (and, separately, values) are merged (`merge_states`, with zipjax.kv.slerp): the SLERP direction is stored
once, each layer keeps its norm, and the tokens whose directions differ most are kept exactly for both layers: by
default those past Eq. 4's data-dependent threshold on the normalized angular distance (d_i > d_max - gamma (d_max -
d_min)), within a static room of ceil(capacity n) slots (capacity defaults to gamma, the paper's fixed-ratio count);
if the threshold selects more than the room, the most distinct fill it and the cache records how many were selected
(`MergedKVCache.retention()`), since a traced program cannot refuse. `retain_by="count"` keeps exactly ceil(gamma
n), the paper's fixed-ratio variant (Table C) and the earlier default.

With `merge_dims="token"` (the default, the paper's X in R^{n x h}) a token's vector is its K (or V) across every KV
head, so there is one norm and one angle per token and layer; "head" merges per (token, head). Plain layers and the
shared prompt directions are stored by the `inner` quantizer (KIVI or Uniform: packed codes with their statistics)
or, without one, in the cache dtype.

Decoding: a plain layer appends its token to its own full-precision buffer. In a pair (with `merge_decode`, the
paper's Algorithm 2), the first layer attends with its exact new token and hands it on; the second attends with its
own, then merges the two into one direction and two norms written at the token's slot of the pair's decode buffer;
later steps see the merged token restored (direction x norm). Decode tokens are not retained or quantized: the
retention set is chosen at prefill, and the decode buffers stay in the cache dtype.

Stated choices: norms are stored in float16, as the paper's memory accounting counts them (FP16); a restored state
is off by float16 rounding of its norm (relative error up to 2^-11, 3.6e-4 measured on the shipped model), far below
what the merge itself changes. With S = L/2 odd (30 layers: S = 15) the pairs still start at an even layer l - 1 >=
S ((16, 17) ..), so layer S stays plain; the paper's models have L/2 even (32 layers: (16, 17) .. (30, 31)).
`merge_decode=False` keeps every layer's decode tokens exact. Attention is the jnp path: MiniCache has no Pallas
kernel, so `kernel=True` is refused (on the method and on its inner quantizer).

Imports: attention, cache, errors, codec, method, slerp, kivi, uniform."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.attention import cache_attention, masked_attention, visible_slots
from zipjax.cache import check_prompt_then_tokens, replace_at
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.codec import Store
from zipjax.kv.kivi import KIVI
from zipjax.kv.method import check_block_sizes, check_field_types, check_packing, refuse_kernel
from zipjax.kv.slerp import retain_tokens, slerp_direction, take_tokens, token_distance
from zipjax.kv.uniform import Uniform

Inner = KIVI | Uniform | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCache:
    """MiniCache: from `start_layer` S (None: half the layers) on, the layer pairs (l - 1, l) with l odd and l - 1 >= S
    (30 layers: (16, 17) .. (28, 29)) share one SLERP direction per token (t weighs the deeper layer), norms kept
    per layer, and the prompt tokens past Eq. 4's threshold (d_i > d_max - gamma (d_max - d_min), the most
    distinct) kept exactly, in a room of ceil(capacity n) slots (capacity None: gamma); `retain_by="count"` keeps
    exactly ceil(gamma n) most distinct instead; `retain="printed"`: the paper's literal, most-similar rule.
    `merge_dims="token"` (the paper's X in R^{n x h}) takes a token's norm and angle over its whole vector across
    KV heads; "head" merges each head's vector separately. Decode tokens are merged at the second layer of each
    pair as they arrive (Algorithm 2; `merge_decode=False` keeps them exact). `inner`: KIVI(...) or Uniform(...)
    to quantize the prompt's stored arrays, or None."""

    name: ClassVar[str] = "minicache"
    has_kernel: ClassVar[bool] = False
    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05
    retain: str = "distinct"
    retain_by: str = "threshold"
    capacity: float | None = None
    merge_dims: str = "token"
    merge_decode: bool = True
    inner: KIVI | Uniform | None = None
    kernel: bool | None = None

    def __post_init__(self):
        check_field_types(self)
        refuse_kernel("MiniCache", self.kernel, "merged layers are restored and attended in jax.numpy")
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ZipjaxError(f"start_layer must be None or a layer index >= 0, got {self.start_layer!r}")
        if not 0 <= self.t <= 1:
            raise ZipjaxError(f"t must lie in [0, 1], got {self.t}")
        if not 0 <= self.gamma < 1:
            raise ZipjaxError(f"gamma (the retained fraction) must lie in [0, 1), got {self.gamma}")
        if self.retain not in ("distinct", "printed"):
            raise ZipjaxError(f"retain must be 'distinct' or 'printed', got {self.retain!r}")
        if self.retain_by not in ("threshold", "count"):
            raise ZipjaxError(f"retain_by must be 'threshold' (Eq. 4) or 'count' (ceil(gamma n)), got "
                              f"{self.retain_by!r}")
        if self.capacity is not None and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int | float)
                                          or not 0 <= self.capacity <= 1):
            raise ZipjaxError(f"capacity (the retained room, a fraction of the prompt) must be None or lie in [0, 1], "
                              f"got {self.capacity!r}")
        if self.merge_dims not in ("token", "head"):
            raise ZipjaxError(f"merge_dims must be 'token' (whole vector) or 'head', got {self.merge_dims!r}")
        if self.inner is not None and not isinstance(self.inner, KIVI | Uniform):
            raise ZipjaxError(f"MiniCache's inner quantizer must be KIVI(...), Uniform(...) or None, got "
                              f"{self.inner!r} (ZipCache's saliency split of merged directions is not implemented)")
        if self.inner is not None:
            refuse_kernel(f"MiniCache's inner {type(self.inner).__name__}", self.inner.kernel,
                          "MiniCache restores the quantized prompt and attends in jax.numpy")

    def start(self, num_layers: int) -> int:
        return num_layers // 2 if self.start_layer is None else self.start_layer

    def pairs(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """The merged layer pairs (l - 1, l): l odd, l - 1 >= the start layer."""
        start = self.start(num_layers)
        return tuple((l - 1, l) for l in range(1, num_layers, 2) if l - 1 >= start)  # noqa: E741

    def roles(self, num_layers: int) -> tuple[tuple[str, int], ...]:
        """Per layer: ("plain", index into the plain layers), ("first", pair) or ("second", pair)."""
        role = {}
        for index, (first, second) in enumerate(self.pairs(num_layers)):
            role[first], role[second] = ("first", index), ("second", index)
        plain = [layer for layer in range(num_layers) if layer not in role]
        return tuple(role[layer] if layer in role else ("plain", plain.index(layer)) for layer in range(num_layers))

    def retained(self, prefill_len: int) -> int:
        """The static room for retained tokens per pair: ceil(capacity n) (capacity None: gamma)."""
        fraction = self.gamma if self.capacity is None or self.retain_by == "count" else self.capacity
        return math.ceil(fraction * prefill_len - 1e-9)

    @property
    def threshold(self) -> float | None:
        """Eq. 4's gamma for `slerp.retain_tokens`, or None for the fixed count."""
        return self.gamma if self.retain_by == "threshold" else None

    @property
    def decode_slots(self) -> int:
        """None beyond the prompt: decode tokens go to per-layer buffers sized by max_len."""
        return 0

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        check_block_sizes(batch, max_len, prefill_len)
        if not 0 <= self.start(config.num_layers) < config.num_layers:
            raise ZipjaxError(f"start_layer {self.start_layer} is outside the model's {config.num_layers} layers")
        if self.inner is not None:  # the inner residual window does not apply: decode tokens stay in MiniCache's
            check_packing(config, self.inner.bits, self.inner.codec.group)  # own buffer

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype=None) -> MergedKVCache:
        return MergedKVCache.init(config, self, batch, max_len, prefill_len, starts, dtype)


def encode_states(inner: Inner, k: jax.Array, v: jax.Array, valid: jax.Array, dtype) -> Store | dict:
    """k, v [batch, kv_heads, n, head_dim] -> a packed Store (inner quantizer) or {"k", "v"} in `dtype`."""
    if inner is None:
        return {"k": k.astype(dtype), "v": v.astype(dtype)}
    return inner.codec.encode(inner.bits, k.astype(jnp.float32), v.astype(jnp.float32), valid)


def decode_states(inner: Inner, piece: Store | dict) -> tuple[jax.Array, jax.Array]:
    """Inverse of `encode_states`: float32 keys and values [batch, kv_heads, n, head_dim]."""
    if inner is None:
        return piece["k"].astype(jnp.float32), piece["v"].astype(jnp.float32)
    n = piece.k_codes.shape[2]
    return inner.codec.decode(piece, inner.bits, np.zeros(n, np.int32), None)


def merge_states(method: MiniCache, x0: jax.Array, x1: jax.Array, retain: int, valid: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Merge two layers' states x0, x1 [batch, kv_heads, m, head_dim] per token (whole vector across heads) or per
    (token, head). Returns direction [batch, kv_heads, m, head_dim] (unit per merged vector), norms float16
    [batch, 1 or kv_heads, m, 2] (layer l - 1, layer l), retained ids int32 [batch, retain] (m: an unused slot),
    their exact states [batch, kv_heads, retain, 2, head_dim] (zero in unused slots), and the number of tokens the
    retention rule selected, int32 [batch] (may exceed `retain`)."""
    b, h, m, d = x0.shape
    whole = method.merge_dims == "token"
    as_vectors = lambda x: x.transpose(0, 2, 1, 3).reshape(b, m, h * d) if whole else x.transpose(0, 2, 1, 3)
    back = lambda y: y.reshape(b, -1, h, d).transpose(0, 2, 1, 3)  # [b, m', h * d | h, d] -> [b, h, m', d]
    y0, y1 = as_vectors(x0), as_vectors(x1)
    direction = slerp_direction(y0, y1, method.t)
    norms = jnp.stack([jnp.linalg.norm(y.astype(jnp.float32), axis=-1) for y in (y0, y1)], axis=-1)  # [b, m, (h,) 2]
    norms = norms[:, None] if whole else norms.transpose(0, 2, 1, 3)
    ids, wanted = retain_tokens(token_distance(y0, y1), retain, method.retain, method.threshold, valid)
    kept = jnp.stack([back(take_tokens(y0, ids)), back(take_tokens(y1, ids))], axis=-2)
    return back(direction), norms.astype(jnp.float16), ids, kept, wanted


@struct.dataclass
class MergedKVCache:
    plain: tuple  # per unmerged layer: the prompt's K/V (Store or {"k", "v"}) [batch, kv_heads, n, ...]
    pairs: tuple  # per pair: {"dir": Store | dict, "k_norms", "v_norms": f16 [batch, 1 | kv_heads, n, 2],
    #                 "k_ids", "v_ids": int32 [batch, r] (n: unused), "k_kept", "v_kept": [batch, kv_heads, r, 2,
    #                 head_dim], "k_wanted", "v_wanted": int32 [batch], the tokens the retention rule selected}
    k_buf: tuple  # per layer [batch, kv_heads, T, head_dim] decode tokens (T = 0 for merged decode layers)
    v_buf: tuple
    pair_buf: tuple  # per pair (merge_decode): {"k_dir", "v_dir": [batch, kv_heads, T, head_dim], "k_norms",
    #                  "v_norms": f16 [batch, 1 | kv_heads, T, 2]}; T = max_len - n
    cursor: jax.Array
    starts: jax.Array
    pending: tuple | None  # between the two layers of a pair: the first layer's raw (k, v)
    method: MiniCache = struct.field(pytree_node=False)
    prefill_len: int = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False)
    accepts_chunks: ClassVar[bool] = False  # the prompt is compressed as one block

    @classmethod
    def init(cls, config: ModelConfig, method: MiniCache, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> MergedKVCache:
        method.check(config, batch, max_len, prefill_len)
        dtype = dtype or config.jnp_dtype
        b, h, d, n, steps = batch, config.num_kv_heads, config.head_dim, prefill_len, max_len - prefill_len
        hn = 1 if method.merge_dims == "token" else h
        zeros = jnp.zeros((b, h, n, d), jnp.float32)
        valid = jnp.ones((b, h, n), bool)
        roles = method.roles(config.num_layers)
        r = method.retained(n)
        plain = tuple(encode_states(method.inner, zeros, zeros, valid, dtype) for role, _ in roles if role == "plain")
        norms = lambda m: jnp.zeros((b, hn, m, 2), jnp.float16)
        pair = lambda: {"dir": encode_states(method.inner, zeros, zeros, valid, dtype),
                        "k_norms": norms(n), "v_norms": norms(n),
                        "k_ids": jnp.full((b, r), n, jnp.int32), "v_ids": jnp.full((b, r), n, jnp.int32),
                        "k_wanted": jnp.zeros((b,), jnp.int32), "v_wanted": jnp.zeros((b,), jnp.int32),
                        "k_kept": jnp.zeros((b, h, r, 2, d), dtype), "v_kept": jnp.zeros((b, h, r, 2, d), dtype)}
        pairs = tuple(pair() for role, _ in roles if role == "second")
        merged = lambda role: method.merge_decode and role != "plain"
        buf = lambda role: jnp.zeros((b, h, 0 if merged(role) else steps, d), dtype)
        decode_pair = lambda: {"k_dir": jnp.zeros((b, h, steps, d), dtype), "v_dir": jnp.zeros((b, h, steps, d), dtype),
                               "k_norms": norms(steps), "v_norms": norms(steps)}
        pair_buf = tuple(decode_pair() for _ in pairs) if method.merge_decode else ()
        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        return cls(plain=plain, pairs=pairs, k_buf=tuple(buf(role) for role, _ in roles),
                   v_buf=tuple(buf(role) for role, _ in roles), pair_buf=pair_buf, cursor=jnp.zeros((), jnp.int32),
                   starts=starts, pending=None, method=method, prefill_len=n, num_layers=config.num_layers)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.prefill_len + max(x.shape[2] for x in (*self.k_buf, *(p["k_dir"] for p in self.pair_buf)))

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def prompt_nbytes(self) -> int:
        """Bytes holding the prompt: plain layers and merged pairs (directions, norms, retained tokens)."""
        return sum(x.nbytes for x in jax.tree.leaves((self.plain, self.pairs)))

    def retention(self) -> list[dict]:
        """Per merged pair (host-side, concrete caches): its layers, the room, and per sequence (lists over the
        batch) the tokens retained and the tokens the rule selected, for keys and values; selected > retained means
        the threshold wanted more than the room held."""
        out = []
        for (first, second), pair in zip(self.method.pairs(self.num_layers), self.pairs, strict=True):
            row = {"layers": (first, second), "room": int(pair["k_ids"].shape[1])}
            for name in ("k", "v"):
                row[f"{name}_retained"] = np.asarray((pair[f"{name}_ids"] < self.prefill_len).sum(axis=1)).tolist()
                row[f"{name}_selected"] = np.asarray(pair[f"{name}_wanted"]).tolist()
            out.append(row)
        return out

    def retained_unused(self) -> int:
        """Unused slots of the retained-token rooms, summed over pairs, keys and values, and sequences (host-side)."""
        return sum(int((np.asarray(pair[f"{name}_ids"]) >= self.prefill_len).sum())
                   for pair in self.pairs for name in ("k", "v"))

    def retained_slot_nbytes(self) -> int:
        """Bytes of one (sequence, slot) of a retained-token room: its id and both layers' exact states."""
        if not self.pairs or self.pairs[0]["k_ids"].size == 0:
            return 0
        ids, kept = self.pairs[0]["k_ids"], self.pairs[0]["k_kept"]
        return ids.dtype.itemsize + kept.nbytes // ids.size

    def stored_nbytes(self) -> int:
        """Like `nbytes`, without the unused slots of the retained-token rooms (host-side, concrete caches)."""
        return self.nbytes() - self.retained_unused() * self.retained_slot_nbytes()

    def logical_axes(self) -> MergedKVCache:
        per_head = PartitionSpec("batch", "kv_heads")
        specs = jax.tree.map(lambda x: per_head, self)
        pairs = tuple({**p, **{name: PartitionSpec("batch") for name in ("k_ids", "v_ids", "k_wanted", "v_wanted")}}
                      for p in specs.pairs)
        return dataclasses.replace(specs, pairs=pairs, cursor=PartitionSpec(), starts=PartitionSpec("batch"))

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        check_prompt_then_tokens(tokens_shape, "MiniCache", self.batch, self.prefill_len, self.cursor, self.max_len)

    def advance(self, num_tokens: int) -> MergedKVCache:
        return dataclasses.replace(self, cursor=self.cursor + num_tokens)

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, MergedKVCache]:
        """q: [batch, q_len, heads, head_dim]; k_new, v_new: [batch, q_len, kv_heads, head_dim]."""
        attend = self._attend_prompt if q.shape[1] > 1 else self._attend_token
        return attend(layer, q, k_new, v_new, sliding_window)

    def _attend_prompt(self, layer, q, k_new, v_new, sliding_window):
        """Exact attention over the prompt; store the layer plain, hold it back (first of a pair), or merge the
        pair (second)."""
        n = q.shape[1]
        slots = jnp.arange(n, dtype=jnp.int32)
        valid = slots[None, :] >= self.starts[:, None]  # [batch, n]
        k, v = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [batch, kv_heads, n, head_dim]
        out = cache_attention(q, k, v, jnp.zeros((), jnp.int32), self.starts, sliding_window)
        role, index = self.method.roles(self.num_layers)[layer]
        head_valid = jnp.broadcast_to(valid[:, None, :], k.shape[:3])
        dtype = self.k_buf[0].dtype
        if role == "plain":
            plain = list(self.plain)
            plain[index] = encode_states(self.method.inner, k, v, head_valid, dtype)
            return out, dataclasses.replace(self, plain=tuple(plain))
        if role == "first":
            return out, dataclasses.replace(self, pending=(k, v))
        k0, v0 = self.pending
        r = self.method.retained(n)
        pair, directions = {}, []
        for name, x0, x1 in (("k", k0, k), ("v", v0, v)):
            direction, norms, ids, kept, wanted = merge_states(self.method, x0, x1, r, valid)
            directions.append(direction)
            pair[f"{name}_norms"], pair[f"{name}_ids"], pair[f"{name}_kept"] = norms, ids, kept.astype(dtype)
            pair[f"{name}_wanted"] = wanted
        pair["dir"] = encode_states(self.method.inner, *directions, head_valid, dtype)
        pairs = list(self.pairs)
        pairs[index] = pair
        return out, dataclasses.replace(self, pairs=tuple(pairs), pending=None)

    def restore(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """The layer's prompt keys and values, float32 [batch, kv_heads, n, head_dim]."""
        role, index = self.method.roles(self.num_layers)[layer]
        if role == "plain":
            return decode_states(self.method.inner, self.plain[index])
        pair = self.pairs[index]
        side = 0 if role == "first" else 1
        k_dir, v_dir = decode_states(self.method.inner, pair["dir"])
        out = []
        for name, direction in (("k", k_dir), ("v", v_dir)):
            x = direction * pair[f"{name}_norms"][..., side, None].astype(jnp.float32)
            ids = pair[f"{name}_ids"]  # [batch, r]
            b_idx = jnp.arange(x.shape[0])[:, None, None]
            h_idx = jnp.arange(x.shape[1])[None, :, None]
            kept = pair[f"{name}_kept"][..., side, :].astype(jnp.float32)  # [batch, kv_heads, r, head_dim]
            out.append(x.at[b_idx, h_idx, ids[:, None, :]].set(kept, mode="drop"))  # ids = n: an unused slot
        return out[0], out[1]

    def _decode_states(self, layer: int, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """The layer's decode keys and values float32 [batch, kv_heads, T, head_dim] with this step's exact token
        at its slot, and the cache fields this step updates."""
        t = self.cursor - self.prefill_len
        role, index = self.method.roles(self.num_layers)[layer]
        if role == "plain" or not self.method.merge_decode:
            k_buf = jax.lax.dynamic_update_slice_in_dim(self.k_buf[layer], k_new.astype(self.k_buf[layer].dtype), t, 2)
            v_buf = jax.lax.dynamic_update_slice_in_dim(self.v_buf[layer], v_new.astype(self.v_buf[layer].dtype), t, 2)
            update = {"k_buf": replace_at(self.k_buf, layer, k_buf), "v_buf": replace_at(self.v_buf, layer, v_buf)}
            return k_buf.astype(jnp.float32), v_buf.astype(jnp.float32), update
        buf = self.pair_buf[index]
        side = 0 if role == "first" else 1
        history = [buf[f"{name}_dir"].astype(jnp.float32) * buf[f"{name}_norms"][..., side, None].astype(jnp.float32)
                   for name in ("k", "v")]
        keys, values = (jax.lax.dynamic_update_slice_in_dim(x, new.astype(jnp.float32), t, 2)
                        for x, new in zip(history, (k_new, v_new), strict=True))
        if role == "first":
            return keys, values, {"pending": (k_new, v_new)}
        merged = dict(buf)
        for name, x0, x1 in (("k", self.pending[0], k_new), ("v", self.pending[1], v_new)):
            direction, norms = merge_states(self.method, x0, x1, 0, None)[:2]
            merged[f"{name}_dir"] = jax.lax.dynamic_update_slice_in_dim(
                buf[f"{name}_dir"], direction.astype(buf[f"{name}_dir"].dtype), t, 2)
            merged[f"{name}_norms"] = jax.lax.dynamic_update_slice_in_dim(buf[f"{name}_norms"], norms, t, 2)
        return keys, values, {"pending": None, "pair_buf": replace_at(self.pair_buf, index, merged)}

    def _attend_token(self, layer, q, k_new, v_new, sliding_window):
        """Attend over the restored prompt and the layer's decode tokens (this step's exact); store the token."""
        k_dec, v_dec, update = self._decode_states(layer, k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3))
        k_prompt, v_prompt = self.restore(layer)
        keys = jnp.concatenate([k_prompt, k_dec], axis=2)
        values = jnp.concatenate([v_prompt, v_dec], axis=2)
        slots = jnp.arange(keys.shape[2], dtype=jnp.int32)
        visible = visible_slots(slots[None, :], self.cursor, self.starts[:, None], sliding_window)  # [batch, kv_len]
        out, _ = masked_attention(q, keys, values, visible[:, None, None, :])
        return out.astype(q.dtype), dataclasses.replace(self, **update)
