"""ZipAR decoding of an Emu3 image: the fixed-window schedule run as one jitted loop over passes.

Each pass gathers its input tokens from the image-token buffer (EOL tokens are written there in advance), scatters
their K/V to raster slots of a `ScatterKVCache`, and samples one visual token per target from the logits of the
query just before it. Guidance, visual-only sampling and the per-position random draws are the sequential
pipeline's own (`visual_logprobs`, `sample_codes`), so with the lag at the image width ZipAR reproduces sequential
decoding token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from zipjax.config import ModelConfig
from zipjax.emu3.image import ImageKnobs, Layout, sample_codes, visual_logprobs
from zipjax.generate import CACHE_ROUNDING, _round_up
from zipjax.sampling import SamplingMode
from zipjax.transformer import Params, Transformer, output_head
from zipjax.zipar.cache import ScatterKVCache
from zipjax.zipar.schedule import Schedule, fixed_window


@struct.dataclass
class ZipARState:
    passes: jax.Array  # int32 []: decode passes done (the prefill not counted)
    tokens: jax.Array  # int32 [batch, num_tokens]: image tokens, EOLs in place from the start
    cache: ScatterKVCache
    key: jax.Array  # base key; image token n is drawn with fold_in(key, n)


@struct.dataclass
class DeviceSchedule:
    source: jax.Array  # int32 [decode passes, q]
    slot: jax.Array  # int32 [decode passes, q]
    target: jax.Array  # int32 [decode passes, q]

    @classmethod
    def of(cls, schedule: Schedule) -> DeviceSchedule:
        return cls(jnp.asarray(schedule.source), jnp.asarray(schedule.slot), jnp.asarray(schedule.target))


def initial_tokens(batch: int, layout: Layout) -> np.ndarray:
    tokens = np.zeros((batch, layout.num_tokens), np.int32)
    tokens[:, layout.width::layout.width + 1] = layout.eol
    return tokens


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode"), donate_argnames=("cache",))
def zipar_prefill(params: Params, prompt: jax.Array, starts: jax.Array, cache: ScatterKVCache, tokens: jax.Array,
                  key: jax.Array, knobs: ImageKnobs, *, config: ModelConfig, layout: Layout, batch: int,
                  mode: SamplingMode) -> ZipARState:
    """The prompt [2 * batch or batch, bucket] into slots 0..bucket-1; the first image token from its last logits."""
    bucket = prompt.shape[1]
    head = output_head(params, config, layout.vocab_range)
    slots = jnp.arange(bucket, dtype=jnp.int32)
    positions = jnp.maximum(slots[None, :] - starts[:, None], 0)
    cache = cache.at(slots, jnp.ones((bucket,), bool))
    logits, cache = Transformer(config).apply({"params": params}, prompt, positions, cache, last_only=True,
                                              head=head)
    code = sample_codes(visual_logprobs(logits[:, 0], knobs, batch), key, jnp.int32(0), knobs, mode)
    tokens = tokens.at[:, 0].set(code + layout.visual_offset)
    return ZipARState(passes=jnp.zeros((), jnp.int32), tokens=tokens, cache=cache, key=key)


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode", "bucket"),
                   donate_argnames=("state",))
def zipar_until(params: Params, state: ZipARState, schedule: DeviceSchedule, stop: jax.Array, knobs: ImageKnobs,
                *, config: ModelConfig, layout: Layout, batch: int, mode: SamplingMode, bucket: int) -> ZipARState:
    """Run decode passes until `stop` of them are done."""
    cache_batch = state.cache.batch
    head = output_head(params, config, layout.vocab_range)

    def one_pass(s: ZipARState) -> ZipARState:
        source = schedule.source[s.passes]  # [q]
        slot = schedule.slot[s.passes]
        target = schedule.target[s.passes]
        valid = source >= 0
        fed = jnp.take(s.tokens, jnp.maximum(source, 0), axis=1)  # [batch, q]
        fed = jnp.tile(fed, (cache_batch // batch, 1))
        slots = bucket + jnp.maximum(slot, 0)
        positions = jnp.maximum(slots[None, :] - s.cache.starts[:, None], 0)
        cache = s.cache.at(slots, valid)
        logits, cache = Transformer(config).apply({"params": params}, fed, positions, cache,
                                                  head=head)
        visual = visual_logprobs(logits, knobs, batch)  # [batch, q, codebook]
        codes = jax.vmap(lambda v, n: sample_codes(v, s.key, n, knobs, mode), in_axes=(1, 0), out_axes=1)(
            visual, target)  # [batch, q]
        write = jnp.where(target >= 0, target, layout.num_tokens)  # out of range: dropped
        tokens = s.tokens.at[:, write].set(codes + layout.visual_offset, mode="drop")
        return ZipARState(passes=s.passes + 1, tokens=tokens, cache=cache, key=s.key)

    queries = schedule.source.shape[1]
    state = state.replace(cache=state.cache.at(jnp.zeros((queries,), jnp.int32), jnp.zeros((queries,), bool)))
    return jax.lax.while_loop(lambda s: s.passes < stop, one_pass, state)


@functools.lru_cache(maxsize=16)
def _cache_initializer(config: ModelConfig, batch: int, max_len: int, use_kernel: bool):
    return jax.jit(lambda starts: ScatterKVCache.init(config, batch, max_len, starts, use_kernel))


def run_zipar(model, prompt: jax.Array, starts: jax.Array, key: jax.Array, knobs: ImageKnobs, static: dict,
              bucket: int, window: int, progress: bool, use_kernel: bool = False) -> tuple[ZipARState, int]:
    """Prefill, then every decode pass of the fixed-window schedule (in chunks, for the progress bar)."""
    layout: Layout = static["layout"]
    schedule = fixed_window(layout.height, layout.width, window, eol=True)
    cache_len = _round_up(bucket + layout.num_tokens + 1, CACHE_ROUNDING)  # + 1: the padding queries' slot
    cache = _cache_initializer(static["config"], prompt.shape[0], cache_len, use_kernel)(starts)
    tokens = jnp.asarray(initial_tokens(static["batch"], layout))
    state = zipar_prefill(model.params, prompt, starts, cache, tokens, key, knobs, **static)
    device_schedule = DeviceSchedule.of(schedule)
    decode_passes = schedule.num_passes - 1
    stops = sorted({round(decode_passes * (r + 1) / layout.height) for r in range(layout.height)})
    for stop in tqdm(stops, desc=f"ZipAR passes (window {schedule.window})", unit="chunk", disable=not progress):
        state = zipar_until(model.params, state, device_schedule, jnp.int32(stop), knobs, bucket=bucket, **static)
    return state, schedule.num_passes
