"""Log-probabilities of a prompt's own tokens (OpenAI's `echo` with `logprobs`; lm-eval's loglikelihood).

The prompt runs through the model once without a cache, padded at the end to a power-of-two length (causal
attention: padding after a token never changes its logits), so lengths share compilations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.config import ModelConfig
from zipjax.deltas import WeightDeltas
from zipjax.model import Model
from zipjax.serve.requests import MAX_TOP_LOGPROBS, TokenLogprob
from zipjax.transformer import Params, Transformer

MIN_LENGTH = 16


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params: Params, tokens: jax.Array, deltas: WeightDeltas | None, *,
           config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens int32 [1, L] -> (logprob of token i + 1 at position i [L - 1], top ids and logprobs [L - 1, k])."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _ = Transformer(config).apply({"params": params}, tokens, positions, None, deltas=deltas)
    logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)  # [L - 1, vocab]
    chosen = jnp.take_along_axis(logprobs, tokens[0, 1:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, config.vocab_size))
    return chosen, top_ids, top_logprobs


def prompt_logprobs(model: Model, prompt: tuple[int, ...], top: int, expert: str | None
                    ) -> tuple[TokenLogprob | None, ...]:
    """None for the first token, then each token's log-probability and the `top` most likely at its position."""
    length = len(prompt)
    padded = max(MIN_LENGTH, 1 << (length - 1).bit_length())
    padded = max(length, min(padded, model.config.max_position_embeddings))
    tokens = np.full((1, padded), model.config.pad_id, np.int32)
    tokens[0, :length] = prompt
    params, deltas = model.batch_inputs(expert if model.deltas is not None else None, 1)
    chosen, top_ids, top_logprobs = jax.device_get(_score(params, tokens, deltas, config=model.config))
    out: list[TokenLogprob | None] = [None]
    for i in range(1, length):
        alternatives = tuple((int(t), float(p)) for t, p in zip(top_ids[i - 1][:top], top_logprobs[i - 1][:top],
                                                                strict=True))
        out.append(TokenLogprob(prompt[i], float(chosen[i - 1]), alternatives))
    return tuple(out)
