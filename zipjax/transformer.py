"""LLaMA / Mistral decoder in flax.linen, used as a pure function.

    logits, cache = Transformer(config).apply({"params": params}, tokens, positions, cache)

Parameters are a plain nested dict of arrays; the cache is an explicit argument and return value (no mutable Flax
collections). Every parameter carries logical axis names (`nn.with_logical_partitioning`) that zipjax.sharding maps
onto a device mesh. Weight layouts keep heads as their own axis so the projections are einsums:

    embed [vocab, embed]      q [heads, embed, head_dim]      k, v [kv_heads, embed, head_dim]
    o [heads, head_dim, embed]      gate, up [embed, mlp]      down [mlp, embed]      lm_head [embed, vocab]

Heads lead the query / key / value projections: compiled for TPU, a [embed, heads, head_dim] weight was re-laid-out
(copied) into heads-major order on every call (measured: 3 copies per layer of a LLaMA-3-8B decode step on v5e);
[heads, embed, head_dim] is that order already. Checkpoints of format version 1 stored [embed, heads, head_dim] and
are transposed on load (zipjax.checkpoint).

Letters in einsums: b batch, t query tokens, d embed, h heads, k head_dim, f mlp, v vocab.

Weight deltas (zipjax.deltas): every projection is a call of the method `linear`, which adds the delta term of its
site when a `deltas` argument is given (a `WeightDeltas`: `linear(site, x)`, `embedding(tokens)`, `norm(name)`;
ME-Switch's experts are one, built by zipjax.experts). Without deltas the numerics are the plain model's. Because a
projection is a method call, flax's `nn.intercept_methods` sees each one's name and input (zipjax.experts.compress
reads its calibration statistics that way); the model itself records nothing.

Profiles show named regions, not anonymous fusions: flax runs every module under a `jax.named_scope` of its name
(`flax_profile`, on by default: layer_i, attn, mlp, attn_norm / mlp_norm / final_norm, and `attn.linear` per
projection), and the regions inside a module have their own (embed, qkv, attention, attn_out, lm_head).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipjax.attention import causal_attention
from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.deltas import WeightDeltas
from zipjax.rope import apply_rope, inverse_frequencies, rope_tables

Params = dict  # nested dict of arrays, as flax.linen produces

_init_weight = nn.initializers.normal(stddev=0.02)
PREFILL_CHUNK = 512  # prompt tokens per pass of `prompt_pass`


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype: jnp.dtype, init=_init_weight) -> jax.Array:
    """The parameter `name`; when applying, read as given: flax's `param` traces the initializer again for every
    parameter at every trace to compare shapes (112 `eval_shape`s per trace of the shipped model, ~0.3 s of a CLI
    call's 3 s), and the shapes were already checked against the config when the checkpoint was loaded."""
    if not module.is_initializing() and module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Projections(nn.Module):
    """A module that owns projections, each applied by the method `linear` (so interceptors see them by name)."""

    def linear(self, name: str, equation: str, x: jax.Array, w: jax.Array,
               deltas: WeightDeltas | None) -> jax.Array:
        """`einsum(equation, x, w)` plus, with `deltas`, the delta term of site "<module path>/name" (the weight seen
        as [in, out]: x's trailing axes after [batch, seq] flattened are `in`, the result's are `out`)."""
        y = jnp.einsum(equation, x, w)
        if deltas is None:
            return y
        delta = deltas.linear("/".join((*self.scope.path, name)), x.reshape(*x.shape[:2], -1))
        return y + delta.reshape(y.shape).astype(y.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, deltas: WeightDeltas | None = None) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if deltas is not None:  # the exact norm delta of each sequence, [batch, 1, embed]
            scale = scale + deltas.norm("/".join(self.scope.path)).astype(scale.dtype)
        return scale * x32.astype(x.dtype)


class Attention(Projections):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None,
                 deltas: WeightDeltas | None = None) -> tuple[jax.Array, Cache | None]:
        cfg, dtype = self.config, self.config.jnp_dtype
        embed, heads, kv_heads, head_dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "q", (heads, embed, head_dim), ("heads", "embed", "head_dim"), dtype)
        wk = _param(self, "k", (kv_heads, embed, head_dim), ("kv_heads", "embed", "head_dim"), dtype)
        wv = _param(self, "v", (kv_heads, embed, head_dim), ("kv_heads", "embed", "head_dim"), dtype)
        wo = _param(self, "o", (heads, head_dim, embed), ("heads", "head_dim", "embed"), dtype)

        with jax.named_scope("qkv"):
            q = apply_rope(self.linear("q", "btd,hdk->bthk", x, wq, deltas), cos, sin)  # [batch, seq, heads, hd]
            k = apply_rope(self.linear("k", "btd,hdk->bthk", x, wk, deltas), cos, sin)  # [batch, seq, kv_heads, hd]
            v = self.linear("v", "btd,hdk->bthk", x, wv, deltas)  # [batch, seq, kv_heads, head_dim]
        with jax.named_scope("attention"):
            if cache is None:  # the whole sequence at slots 0 .. seq - 1, no padding
                out = causal_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), cfg.sliding_window)
            else:
                out, cache = cache.attend(self.layer, q, k, v, cfg.sliding_window)
        with jax.named_scope("attn_out"):
            return self.linear("o", "bthk,hkd->btd", out, wo, deltas), cache


class MLP(Projections):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deltas: WeightDeltas | None = None) -> jax.Array:
        cfg, dtype = self.config, self.config.jnp_dtype
        w_gate = _param(self, "gate", (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp"), dtype)
        w_up = _param(self, "up", (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp"), dtype)
        w_down = _param(self, "down", (cfg.intermediate_size, cfg.hidden_size), ("mlp", "embed"), dtype)
        hidden = jax.nn.silu(self.linear("gate", "btd,df->btf", x, w_gate, deltas)) * self.linear(
            "up", "btd,df->btf", x, w_up, deltas)  # [batch, seq, mlp]
        return self.linear("down", "btf,fd->btd", hidden, w_down, deltas)


class Block(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None,
                 deltas: WeightDeltas | None = None) -> tuple[jax.Array, Cache | None]:
        cfg = self.config
        h, cache = Attention(cfg, self.layer, name="attn")(
            RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, name="attn_norm")(x, deltas), cos, sin, cache, deltas
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, name="mlp_norm")(x, deltas), deltas)
        return x, cache


class Transformer(Projections):
    """tokens, positions: int32 [batch, seq] -> float32 logits [batch, seq, vocab] (or [batch, 1, vocab])."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, *,
                 last_only: bool = False, head: jax.Array | None = None,
                 deltas: WeightDeltas | None = None, rows: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """head: an output projection [embed, n] used instead of the model's, typically `output_head(...)` of a
        vocabulary range (Emu3 samples image codes from 32,768 visual tokens, a sixth of its vocabulary).
        deltas: per-sequence weight deltas (zipjax.deltas; e.g. ME-Switch experts), or None for the model alone.
        rows: int32 [r], the batch rows whose logits are computed ([r, seq or 1, vocab]); the serving engine's flat
        batch needs a few rows' logits, not every token's."""
        cfg, dtype = self.config, self.config.jnp_dtype
        if cache is not None:
            cache.check_fits(tokens.shape)
        embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        with jax.named_scope("embed"):
            x = jnp.take(embed, tokens, axis=0)  # [batch, seq, embed]
            if deltas is not None:
                if head is not None:
                    raise ValueError("weight deltas cover the model's own output head, not a given `head`")
                x = x + deltas.embedding(tokens).astype(x.dtype)
        cos, sin = rope_tables(positions, inverse_frequencies(cfg.rope, cfg.head_dim))
        for i in range(cfg.num_layers):
            x, cache = Block(cfg, i, name=f"layer_{i}")(x, cos, sin, cache, deltas)
        x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x, deltas)
        if last_only:
            x = x[:, -1:]
        if rows is not None:
            x = jnp.take(x, rows, axis=0)
            deltas = None if deltas is None else deltas.take(rows)
        site = None
        if head is None and cfg.tie_word_embeddings:
            head, site = embed.T, "embed"  # [embed, vocab]
        elif head is None:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
            site = "lm_head"
        with jax.named_scope("lm_head"):
            logits = x @ head if site is None else self.linear(site, "btd,dv->btv", x, head, deltas)
        if cache is not None:
            cache = cache.advance(tokens.shape[1])
        return logits.astype(jnp.float32), cache


def prompt_pass(params: Params, config: ModelConfig, prompt: jax.Array, positions: jax.Array, cache: Cache, *,
                head: jax.Array | None = None, chunk: int = PREFILL_CHUNK,
                deltas: WeightDeltas | None = None) -> tuple[jax.Array, Cache]:
    """The prompt [batch, n] through the model into `cache`, returning the last position's logits [batch, 1, vocab]
    and the cache. Where the cache takes chunks and n is longer than `chunk`, the prompt goes in chunks (a
    `fori_loop`), so the activations alive at once are a chunk's, not the whole prompt's (measured: LLaMA-3-8B at
    8192 tokens on v5e:2x2 keeps about 2 x [tokens, hidden] per layer, 4.2 GiB per chip in one pass)."""
    n = prompt.shape[1]
    model = Transformer(config)
    if not cache.accepts_chunks or n <= chunk or n % chunk:
        return model.apply({"params": params}, prompt, positions, cache, last_only=True, head=head, deltas=deltas)

    def one_chunk(i, carry):
        _, cache = carry
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        return model.apply({"params": params}, part(prompt), part(positions), cache, last_only=True, head=head,
                           deltas=deltas)

    vocab = config.vocab_size if head is None else head.shape[1]
    init = (jnp.zeros((prompt.shape[0], 1, vocab), jnp.float32), cache)
    return jax.lax.fori_loop(0, n // chunk, one_chunk, init)


def output_head(params: Params, config: ModelConfig, vocab_range: tuple[int, int]) -> jax.Array:
    """The columns [start, start + size) of the output projection, [embed, size]. Compute it once, outside a decode
    loop: sliced inside the loop body, XLA:CPU copies the slice on every iteration."""
    start, size = vocab_range
    full = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jax.lax.slice_in_dim(full, start, start + size, axis=1)


def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (normal(0.02) matrices, unit norms), unboxed."""
    variables = Transformer(config).init(rng, *_dummy_inputs())
    return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter, at zero cost."""
    return nn.unbox(_boxed_abstract(config))


def param_logical_axes(config: ModelConfig) -> Params:
    """A PartitionSpec of logical axis names per parameter (the same tree as the params)."""
    return nn.get_partition_spec(_boxed_abstract(config))


def _boxed_abstract(config: ModelConfig):
    variables = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), *_dummy_inputs()))
    return variables["params"]


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
