"""The model over a whole token sequence from position 0 with plain causal attention and no cache: the features the
expert router classifies (zipjax.experts.router), and the loss the harness fine-tunes experts on
(zipjax.harness.finetune). One forward for both, so a router is trained on exactly the features it routes by.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zipjax.attention import causal_mask, gqa_attention
from zipjax.config import ModelConfig
from zipjax.transformer import Params, Transformer


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FullAttention:
    """A "cache" that holds nothing: plain causal softmax attention over the tokens of the call, for training and
    evaluating experts. One dense masked softmax forward and backward (fine at training lengths), where the
    model's cache-less path runs the blockwise forward and a dense gradient (zipjax.attention.causal_attention);
    plugs in through the cache contract (zipjax.cache.Cache)."""

    accepts_chunks = False

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        return None

    def attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
               sliding_window: int | None) -> tuple[jax.Array, FullAttention]:
        # q [batch, seq, heads, head_dim]; k_new, v_new [batch, seq, kv_heads, head_dim]
        slots = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
        mask = causal_mask(slots, slots, sliding_window)  # [1, seq, seq]
        out = gqa_attention(q, k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), mask)
        return out, self

    def advance(self, num_tokens: int) -> FullAttention:
        return self


def hidden_and_logits(params: Params, config: ModelConfig, tokens: jax.Array, head: jax.Array | None = None
                      ) -> jax.Array:
    """The model on int32 tokens [batch, seq] from position 0 with `FullAttention`: float32 logits [batch, seq,
    vocab], or x @ head for another head [embed, n] (the identity gives the final-norm hidden states)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(config).apply({"params": params}, tokens, positions, FullAttention(), head=head)
    return logits
