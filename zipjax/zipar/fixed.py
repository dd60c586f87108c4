"""ZipAR decoding of an Emu3 image with a fixed lag: the schedule run as one jitted loop over passes.

Each pass gathers its input tokens from the image-token buffer (EOL tokens are written there in advance), scatters
their K/V to raster slots of a `ScatterKVCache`, and samples one visual token per target from the logits of the
query just before it. Guidance, visual-only sampling and the per-position random draws are the sequential
decoder's own (zipjax.emu3.decoding), so with the lag at the image width ZipAR reproduces sequential decoding token
for token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from zipjax.deprecation import renamed_fields
from zipjax.emu3.decoding import (
    DecodeResult,
    ImageDecodeSetup,
    ImageInputs,
    for_guidance,
    sample_codes,
    visual_logprobs,
)
from zipjax.kv.method import Method, as_method
from zipjax.shapes import cache_length
from zipjax.sharding import to_host
from zipjax.transformer import Params, Transformer, output_head
from zipjax.validate import boolean, integer, optional
from zipjax.zipar.cache import ScatterKVCache, prefilled
from zipjax.zipar.compressed import BandKVCache, band_margin, check_band, check_method
from zipjax.zipar.schedule import Schedule, band_length, fixed_window


@struct.dataclass
class ZipARState:
    passes: jax.Array  # int32 []: decode passes done (the prefill not counted)
    tokens: jax.Array  # int32 [batch, num_tokens]: image tokens, EOLs in place from the start
    cache: ScatterKVCache | BandKVCache


@struct.dataclass
class DeviceSchedule:
    source: jax.Array  # int32 [decode passes, q]
    slot: jax.Array  # int32 [decode passes, q]
    target: jax.Array  # int32 [decode passes, q]

    @classmethod
    def of(cls, schedule: Schedule) -> DeviceSchedule:
        return cls(jnp.asarray(schedule.source), jnp.asarray(schedule.slot), jnp.asarray(schedule.target))


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("state",))
def zipar_until(params: Params, state: ZipARState, schedule: DeviceSchedule, stop: jax.Array, inputs: ImageInputs,
                *, setup: ImageDecodeSetup) -> ZipARState:
    """Run decode passes until `stop` of them are done."""
    layout = setup.layout
    head = output_head(params, setup.config, layout.vocab_range)

    def one_pass(s: ZipARState) -> ZipARState:
        source = schedule.source[s.passes]  # [q]
        target = schedule.target[s.passes]
        valid = source >= 0
        fed = for_guidance(jnp.take(s.tokens, jnp.maximum(source, 0), axis=1), setup.cache_batch)  # [cache_b, q]
        slots = setup.bucket + jnp.maximum(schedule.slot[s.passes], 0)
        positions = jnp.maximum(slots[None, :] - s.cache.starts[:, None], 0)
        logits, cache = Transformer(setup.config).apply({"params": params}, fed, positions,
                                                        s.cache.at(slots, valid), head=head)
        visual = visual_logprobs(logits, inputs.knobs, setup.batch)  # [batch, q, codebook]
        codes = jax.vmap(lambda v, n: sample_codes(v, inputs.key, n, inputs.knobs, setup.mode), in_axes=(1, 0),
                         out_axes=1)(visual, target)  # [batch, q]
        write = jnp.where(target >= 0, target, layout.num_tokens)  # out of range: dropped
        tokens = s.tokens.at[:, write].set(codes + layout.visual_offset, mode="drop")
        return ZipARState(passes=s.passes + 1, tokens=tokens, cache=cache)

    queries = schedule.source.shape[1]
    state = state.replace(cache=state.cache.at(jnp.zeros((queries,), jnp.int32), jnp.zeros((queries,), bool)))
    return jax.lax.while_loop(lambda s: s.passes < stop, one_pass, state)


@renamed_fields(window="lag")
@dataclasses.dataclass(frozen=True)
class FixedWindow:
    """ZipAR: a row starts once the row above is `lag` tokens ahead (the paper's window size s; a lag of the image's
    width or more decodes row after row). `kernel`: the attention as the Pallas kernel (True; interpreted on a CPU),
    in jax.numpy (False), or the kernel where the platform is a TPU or GPU (None; see zipjax.platform). `kv`: a
    compressed cache method (zipjax.kv.ZipCache(...), Uniform(...), KIVI(...); zipjax.zipar.compressed) or None for
    the dense cache. `window=` is the deprecated name of `lag` (one release)."""

    lag: int
    kernel: bool | None = None
    kv: Method | None = None

    def __post_init__(self):
        object.__setattr__(self, "lag", integer(self.lag, "FixedWindow lag", lo=1))
        optional(boolean, self.kernel, "FixedWindow kernel")
        check_method(as_method(self.kv), "FixedWindow", self.kernel)

    def band(self, setup: ImageDecodeSetup) -> int:
        """Full-precision entries of the compressed cache (0 without `kv`): what the schedule keeps in flight."""
        layout = setup.layout
        schedule = fixed_window(layout.height, layout.width, self.lag, eol=True)
        if self.kv is None:
            return 0
        align, behind = band_margin(self.kv)
        return band_length(schedule, align) + behind

    def run(self, model, setup: ImageDecodeSetup, inputs: ImageInputs, progress: bool) -> DecodeResult:
        """Prefill, then every decode pass of the fixed-window schedule (in chunks, for the progress bar)."""
        layout = setup.layout
        schedule = fixed_window(layout.height, layout.width, self.lag, eol=True)
        cache_len = cache_length(setup.bucket + layout.num_tokens + 1)  # + 1: the padding queries' slot
        tokens, cache = prefilled(model, setup, inputs, cache_len, self.kernel, self.kv, self.band(setup))
        state = ZipARState(passes=jnp.zeros((), jnp.int32), tokens=tokens, cache=cache)
        device_schedule = DeviceSchedule.of(schedule)
        decode_passes = schedule.num_passes - 1
        stops = sorted({round(decode_passes * (r + 1) / layout.height) for r in range(layout.height)})
        for stop in tqdm(stops, desc=f"ZipAR passes (lag {schedule.lag})", unit="chunk", disable=not progress):
            state = zipar_until(model.params, state, device_schedule, jnp.int32(stop), inputs, setup=setup)
        check_band(state.cache)
        return DecodeResult(tokens=to_host(state.tokens), passes=np.full(setup.batch, schedule.num_passes))
