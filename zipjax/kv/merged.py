"""MiniCache as a KV cache: the prompt's K/V of adjacent deep layers share one direction per token and head.

From `start_layer` on, layers pair up (start, start + 1), (start + 2, start + 3), ... (an odd last layer stays
alone). At prefill the first layer of a pair is held back; at the second, both layers' keys (and, separately,
values) are merged by zipjax.kv.minicache.merge_pair: the SLERP direction is stored once, each layer keeps its
per-(token, head) norm, and the `ceil(gamma n)` tokens whose directions differ most are kept exactly for both layers
(a fixed count, so shapes are static). Layers below the start, unpaired layers and the shared directions are stored
by the `inner` quantizer (KIVI or Uniform: packed codes with their statistics) or, without one, in the cache dtype.

Decoding restores a layer's prompt states (direction x norm, retained tokens put back) and attends over them and
the layer's own full-precision buffer of decode tokens (jnp path). Decode tokens are not merged: the paper merges
them pairwise as they arrive; here they stay exact, like KIVI's residual, and the memory of the buffer is counted.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.attention import cache_attention, masked_attention, visible_slots
from zipjax.cache import check_prompt_then_tokens, replace_at
from zipjax.config import ModelConfig
from zipjax.kv.codec import Store
from zipjax.kv.minicache import merge_pair
from zipjax.kv.spec import KIVI, MiniCache, Uniform

Inner = KIVI | Uniform | None


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


@struct.dataclass
class MergedKVCache:
    plain: tuple  # per unmerged layer: the prompt's K/V (Store or {"k", "v"}) [batch, kv_heads, n, ...]
    pairs: tuple  # per pair: {"dir": Store | dict, "k_norms", "v_norms": f16 [batch, kv_heads, n, 2],
    #                 "k_ids", "v_ids": int32 [batch, r], "k_kept", "v_kept": [batch, kv_heads, r, 2, head_dim]}
    k_buf: tuple  # per layer [batch, kv_heads, max_len - n, head_dim]: decode tokens
    v_buf: tuple
    cursor: jax.Array
    starts: jax.Array
    pending: tuple | None  # during prefill only: the first layer of a pair's raw (k, v)
    method: MiniCache = struct.field(pytree_node=False)
    prefill_len: int = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False)
    accepts_chunks: ClassVar[bool] = False  # the prompt is compressed as one block

    @classmethod
    def init(cls, config: ModelConfig, method: MiniCache, batch: int, max_len: int, prefill_len: int,
             starts: jax.Array | None = None, dtype=None) -> MergedKVCache:
        method.check(config, batch, max_len, prefill_len)
        dtype = dtype or config.jnp_dtype
        b, h, d, n = batch, config.num_kv_heads, config.head_dim, prefill_len
        zeros = jnp.zeros((b, h, n, d), jnp.float32)
        valid = jnp.ones((b, h, n), bool)
        roles = method.roles(config.num_layers)
        r = method.retained(n)
        plain = tuple(encode_states(method.inner, zeros, zeros, valid, dtype) for role, _ in roles if role == "plain")
        norms = lambda: jnp.zeros((b, h, n, 2), jnp.float16)
        pair = lambda: {"dir": encode_states(method.inner, zeros, zeros, valid, dtype),
                        "k_norms": norms(), "v_norms": norms(),
                        "k_ids": jnp.zeros((b, r), jnp.int32), "v_ids": jnp.zeros((b, r), jnp.int32),
                        "k_kept": jnp.zeros((b, h, r, 2, d), dtype), "v_kept": jnp.zeros((b, h, r, 2, d), dtype)}
        pairs = tuple(pair() for role, _ in roles if role == "second")
        buf = lambda: jnp.zeros((b, h, max_len - n, d), dtype)
        starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
        return cls(plain=plain, pairs=pairs, k_buf=tuple(buf() for _ in roles), v_buf=tuple(buf() for _ in roles),
                   cursor=jnp.zeros((), jnp.int32), starts=starts, pending=None, method=method, prefill_len=n,
                   num_layers=config.num_layers)

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.prefill_len + self.k_buf[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def logical_axes(self) -> MergedKVCache:
        per_head = PartitionSpec("batch", "kv_heads")
        specs = jax.tree.map(lambda x: per_head, self)
        pairs = tuple({**p, "k_ids": PartitionSpec("batch"), "v_ids": PartitionSpec("batch")} for p in specs.pairs)
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
            # merge_pair works on [batch, tokens, heads, head_dim]
            direction, n0, n1, ids, kept0, kept1 = merge_pair(
                x0.transpose(0, 2, 1, 3), x1.transpose(0, 2, 1, 3), self.method.t, r, self.method.retain, valid=valid)
            directions.append(direction.transpose(0, 2, 1, 3))
            pair[f"{name}_norms"] = jnp.stack([n0, n1], axis=-1).transpose(0, 2, 1, 3).astype(jnp.float16)
            pair[f"{name}_ids"] = ids
            pair[f"{name}_kept"] = jnp.stack([kept0, kept1], axis=-2).transpose(0, 2, 1, 3, 4).astype(dtype)
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
            out.append(x.at[b_idx, h_idx, ids[:, None, :]].set(kept))
        return out[0], out[1]

    def _attend_token(self, layer, q, k_new, v_new, sliding_window):
        """Append the token to the layer's buffer; attend over the restored prompt and the buffer."""
        n = self.prefill_len
        index = (0, 0, self.cursor - n, 0)
        k_buf = jax.lax.dynamic_update_slice(self.k_buf[layer], k_new.transpose(0, 2, 1, 3).astype(
            self.k_buf[layer].dtype), index)
        v_buf = jax.lax.dynamic_update_slice(self.v_buf[layer], v_new.transpose(0, 2, 1, 3).astype(
            self.v_buf[layer].dtype), index)
        k_prompt, v_prompt = self.restore(layer)
        keys = jnp.concatenate([k_prompt, k_buf.astype(jnp.float32)], axis=2)
        values = jnp.concatenate([v_prompt, v_buf.astype(jnp.float32)], axis=2)
        slots = jnp.arange(keys.shape[2], dtype=jnp.int32)
        visible = visible_slots(slots[None, :], self.cursor, self.starts[:, None], sliding_window)  # [batch, kv_len]
        out, _ = masked_attention(q, keys, values, visible[:, None, None, :])
        return out.astype(q.dtype), dataclasses.replace(self, k_buf=replace_at(self.k_buf, layer, k_buf),
                                                        v_buf=replace_at(self.v_buf, layer, v_buf))
