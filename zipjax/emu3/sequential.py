"""Sequential image decoding: one image token per forward pass, on any append cache (dense or compressed).

Decoding is a jitted `lax.while_loop`; it is called once per image row with the state donated, so a progress bar can
follow the rows at no measurable cost. At the end of every row the end-of-line token is chosen instead of a visual
token. Imports: the decoding contract (zipjax.emu3.decoding) and the cache factory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from zipjax.cache import AppendCache
from zipjax.emu3.decoding import (
    DecodeResult,
    ImageDecodeSetup,
    ImageInputs,
    ImageKnobs,
    for_guidance,
    prefill,
    sample_codes,
    visual_logprobs,
)
from zipjax.kv.method import Method
from zipjax.kv.methods import as_method, cache_initializer, check_cache
from zipjax.shapes import cache_length
from zipjax.sharding import to_host
from zipjax.transformer import Params, Transformer, output_head


@struct.dataclass
class SequentialState:
    step: jax.Array  # int32 []: image tokens chosen so far
    tokens: jax.Array  # int32 [batch, num_tokens]: the image tokens (conditional rows only)
    last_token: jax.Array  # int32 [batch]
    positions: jax.Array  # int32 [cache_batch]: RoPE position of the token fed next
    cache: AppendCache


def _choose(logits: jax.Array, key: jax.Array, step: jax.Array, knobs: ImageKnobs,
            setup: ImageDecodeSetup) -> jax.Array:
    """The next image token of each conditional sequence: EOL at the end of a row, else a sampled visual token.

    logits: float32 [cache_batch, codebook]; step: int32 [] index of the token being chosen."""
    layout = setup.layout
    code = sample_codes(visual_logprobs(logits, knobs, setup.batch), key, step, knobs, setup.mode)
    row_end = (step + 1) % (layout.width + 1) == 0
    return jnp.where(row_end, layout.eol, code + layout.visual_offset).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("state",))
def _decode_until(params: Params, state: SequentialState, stop: jax.Array, key: jax.Array, knobs: ImageKnobs, *,
                  setup: ImageDecodeSetup) -> SequentialState:
    """Feed the newest token and choose the next one until `stop` tokens have been chosen."""
    head = output_head(params, setup.config, setup.layout.vocab_range)

    def step(s: SequentialState) -> SequentialState:
        fed = for_guidance(s.last_token, setup.cache_batch)
        logits, cache = Transformer(setup.config).apply({"params": params}, fed[:, None], s.positions[:, None],
                                                        s.cache, last_only=True, head=head)
        token = _choose(logits[:, 0], key, s.step, knobs, setup)
        return SequentialState(step=s.step + 1, tokens=s.tokens.at[:, s.step].set(token), last_token=token,
                               positions=s.positions + 1, cache=cache)

    return jax.lax.while_loop(lambda s: s.step < stop, step, state)


@dataclasses.dataclass(frozen=True)
class Sequential:
    """One token per pass; `kv` a compressed cache method (`zipjax.kv.ZipCache(...)`, `KIVI(...)`, `Uniform(...)`,
    `ZipVL(...)`, `MiniCache(...)`: the prompt block is compressed after prefill, image tokens as each window fills)
    or None for the dense cache. A method with a kernel carries its own `kernel` flag."""

    kv: Method | None = None

    def __post_init__(self):
        as_method(self.kv)

    def run(self, model, setup: ImageDecodeSetup, inputs: ImageInputs, progress: bool) -> DecodeResult:
        layout = setup.layout
        cache_len = cache_length(setup.bucket + layout.num_tokens)
        check_cache(self.kv, setup.config, setup.cache_batch, cache_len, setup.bucket)
        cache = cache_initializer(setup.config, setup.cache_batch, cache_len, model.mesh, self.kv,
                                  setup.bucket)(inputs.starts)
        code, cache = prefill(model.params, inputs, cache, setup=setup)
        first = code + layout.visual_offset
        state = SequentialState(step=jnp.ones((), jnp.int32),
                                tokens=jnp.zeros((setup.batch, layout.num_tokens), jnp.int32).at[:, 0].set(first),
                                last_token=first, positions=setup.bucket - inputs.starts, cache=cache)
        for row in tqdm(range(layout.height), desc="image rows", unit="row", disable=not progress):
            stop = jnp.int32((row + 1) * (layout.width + 1))
            state = _decode_until(model.params, state, stop, inputs.key, inputs.knobs, setup=setup)
        return DecodeResult(tokens=to_host(state.tokens), passes=np.full(setup.batch, layout.num_tokens))
