"""The contract every Emu3 image decoder shares: the static setup, the traced inputs, guided log-probabilities,
position-keyed sampling, the prefill, and the result.

A decoder (sequential decoding in zipjax.emu3.sequential; ZipAR's fixed and adaptive windows and Speculative Jacobi
Decoding in zipjax.zipar) is a frozen dataclass of its own settings with one method,

    decoder.run(model, setup, inputs, progress) -> DecodeResult

and `zipjax.generate_image(..., decoder=...)` runs the one it is given. The setup is static (it selects a
compilation); the inputs are traced. Conditional and unconditional prompts run as one batch of 2B sequences when
guidance is on; guidance combines their log-probabilities, `cfg * (cond - uncond) + uncond`, as transformers' CFG
processor does. Image tokens follow a fixed layout: after every w visual tokens the end-of-line token is written
(never sampled). Visual tokens are sampled from the visual-token slice of the vocabulary only, and the draw of image
token n of batch row r is keyed by (n, r) alone, so every decoding order samples a position with the same
randomness.

A leaf of image decoding: imports config, sampling, transformer, nothing of the decoders.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.sampling import NEG_INF, SamplingMode, filter_logits, sample
from zipjax.transformer import Params, output_head, prompt_pass


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Static description of the image tokens: h rows of w visual tokens, each row followed by EOL."""

    height: int
    width: int
    eol: int
    visual_offset: int
    codebook_size: int

    @property
    def num_tokens(self) -> int:
        """Tokens chosen by the decode loop: every row and its EOL (the closing EOF/EOI/EOS are appended after)."""
        return self.height * (self.width + 1)

    @property
    def vocab_range(self) -> tuple[int, int]:
        """(first id, count) of the visual tokens: the only logits image decoding computes."""
        return self.visual_offset, self.codebook_size

    def is_eol(self, index: jax.Array) -> jax.Array:
        """Whether image token `index` (raster order, EOLs included) is an end-of-line slot."""
        return (index % (self.width + 1)) == self.width


@struct.dataclass
class ImageKnobs:
    """Traced sampling settings: changing them does not recompile."""

    cfg_scale: jax.Array  # float32 []
    temperature: jax.Array  # float32 []
    top_k: jax.Array  # int32 []
    top_p: jax.Array  # float32 []


@dataclasses.dataclass(frozen=True)
class ImageDecodeSetup:
    """What selects a compilation of a decoder: the model config, the image layout, the batch, the sampling mode and
    the padded prompt length (the prompt occupies cache slots 0 .. bucket - 1)."""

    config: ModelConfig
    layout: ImageLayout
    batch: int  # images, i.e. conditional sequences
    guided: bool  # an unconditional half of `batch` more sequences runs (classifier-free guidance)
    mode: SamplingMode
    bucket: int

    @property
    def cache_batch(self) -> int:
        return 2 * self.batch if self.guided else self.batch


@struct.dataclass
class ImageInputs:
    """Traced inputs of a decoder."""

    prompt: jax.Array  # int32 [cache_batch, bucket]: left-padded prompts, conditional then unconditional
    starts: jax.Array  # int32 [cache_batch]: first real slot of each sequence
    key: jax.Array  # the base key; image token n of batch row r is drawn with fold_in(fold_in(key, n), r)
    knobs: ImageKnobs


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    tokens: np.ndarray  # int32 [batch, num_tokens]: rows of visual tokens, each closed by EOL
    passes: np.ndarray  # int [batch]: forward passes per image, the prefill counted as one


@runtime_checkable
class Decoder(Protocol):
    """A decoding order: a frozen dataclass of its settings, validated when it is made, that runs the decode."""

    def run(self, model, setup: ImageDecodeSetup, inputs: ImageInputs, progress: bool) -> DecodeResult: ...


def visual_logprobs(logits: jax.Array, knobs: ImageKnobs, batch: int) -> jax.Array:
    """Guided log-probabilities of the visual tokens from the logits of the visual tokens only (`vocab_range`):
    float32 [2 * batch or batch, ..., codebook] -> [batch, ..., codebook]. With an unconditional half,
    cfg * (cond - uncond) + uncond on log-softmaxes. Normalising over the visual tokens instead of the whole
    vocabulary shifts each row by a constant, which every sampler's softmax over the visual tokens cancels."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if logits.shape[0] == 2 * batch:
        cond, uncond = logprobs[:batch], logprobs[batch:]
        logprobs = knobs.cfg_scale * (cond - uncond) + uncond
    return logprobs


def sample_code(visual: jax.Array, key: jax.Array, index: jax.Array, row: jax.Array, knobs: ImageKnobs,
                mode: SamplingMode) -> jax.Array:
    """One code from visual log-probabilities [codebook] of image token `index` of batch row `row`."""
    draw = jax.random.fold_in(jax.random.fold_in(key, index), row)
    return sample(visual[None], draw, knobs.temperature, knobs.top_k, knobs.top_p, mode)[0]


def sample_codes(visual: jax.Array, key: jax.Array, index: jax.Array, knobs: ImageKnobs,
                 mode: SamplingMode) -> jax.Array:
    """int32 [batch] codes from [batch, codebook], all for image token `index` (see `sample_code`)."""
    rows = jnp.arange(visual.shape[0], dtype=jnp.int32)
    return jax.vmap(lambda v, r: sample_code(v, key, index, r, knobs, mode))(visual, rows)


def sampling_probs(visual: jax.Array, knobs: ImageKnobs, mode: SamplingMode) -> jax.Array:
    """The distribution the sequential sampler draws from, as probabilities [..., codebook] (greedy: one-hot); what
    drafts are verified against."""
    if mode.greedy:
        return jax.nn.one_hot(jnp.argmax(visual, axis=-1), visual.shape[-1], dtype=jnp.float32)
    logits = visual / knobs.temperature
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    if mode.static_top_k is not None and mode.static_top_k < shape[-1]:
        kth = jax.lax.top_k(flat, mode.static_top_k)[0][:, -1:]
        flat = jnp.where(flat < kth, NEG_INF, flat)
    flat = filter_logits(flat, None, knobs.top_p if mode.top_p else None)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)


def for_guidance(x: jax.Array, cache_batch: int) -> jax.Array:
    """The conditional batch's rows [batch, ...] repeated for the unconditional half when guidance runs."""
    return jnp.tile(x, (cache_batch // x.shape[0],) + (1,) * (x.ndim - 1))


def initial_tokens(batch: int, layout: ImageLayout) -> np.ndarray:
    """int32 [batch, num_tokens]: zeros with the end-of-line tokens in place."""
    tokens = np.zeros((batch, layout.num_tokens), np.int32)
    tokens[:, layout.width::layout.width + 1] = layout.eol
    return tokens


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("cache",))
def prefill(params: Params, inputs: ImageInputs, cache: Cache, *, setup: ImageDecodeSetup) -> tuple[jax.Array, Cache]:
    """The prompts into cache slots 0 .. bucket - 1; returns the first image token's code (int32 [batch]) drawn from
    the last prompt position's guided visual log-probabilities, and the cache."""
    bucket = inputs.prompt.shape[1]
    positions = jnp.maximum(jnp.arange(bucket, dtype=jnp.int32)[None, :] - inputs.starts[:, None], 0)
    head = output_head(params, setup.config, setup.layout.vocab_range)
    logits, cache = prompt_pass(params, setup.config, inputs.prompt, positions, cache, head=head)
    visual = visual_logprobs(logits[:, 0], inputs.knobs, setup.batch)
    return sample_codes(visual, inputs.key, jnp.int32(0), inputs.knobs, setup.mode), cache
