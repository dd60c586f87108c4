"""Text generation: one jitted `lax.while_loop` over a sampling state (Gemma's sampler shape), plus a streaming twin.

    tokens = zipjax.generate(model, prompt_ids, max_new_tokens=32, temperature=0.0)

Prompts of different lengths are left-padded so that they all end at the same cache slot; the padded length is
bucketed to a power of two (at least 16) and the cache length rounded up to a multiple of 128 (zipjax.shapes), so
new prompt lengths and new `max_new_tokens` mostly reuse a compiled program. The cache is whatever the `kv=` method
makes (zipjax.kv.methods); this module depends on the `AppendCache` protocol only. `max_new_tokens`,
temperature, top-k, top-p and the stop tokens are traced values; only the batch size, the buckets and which filters
are on select a compilation.
Every size is checked before any compute: a prompt plus `max_new_tokens` that does not fit the cache or the model's
positions is an error, never a silent truncation.

`generate_stream` runs the same prefill and the same decode step (each jitted, the state donated) from Python and
yields each new token as it is chosen; with the same seed it produces exactly the tokens `generate` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from zipjax.cache import AppendCache
from zipjax.config import ModelConfig
from zipjax.deltas import WeightDeltas
from zipjax.errors import ZipjaxError
from zipjax.kv.method import Method
from zipjax.kv.methods import as_method, cache_initializer, check_cache, check_memory, min_decode_slots
from zipjax.model import Model, check_token_ids
from zipjax.sampling import SamplingMode, check_settings, sample
from zipjax.shapes import CACHE_ROUNDING, left_pad, next_pow2, prompt_bucket
from zipjax.shapes import cache_length as round_cache_length
from zipjax.sharding import mesh_context, place, to_host
from zipjax.transformer import Params, Transformer, prompt_pass
from zipjax.validate import integer

MIN_STOP_SLOTS = 8


@struct.dataclass
class SamplingState:
    step: jax.Array  # int32 []: tokens generated so far
    tokens: jax.Array  # int32 [batch, cache_len]: token of each cache slot (prompt, then generated); pad elsewhere
    last_token: jax.Array  # int32 [batch]: the newest token, fed at the next step
    positions: jax.Array  # int32 [batch]: RoPE position of last_token
    done: jax.Array  # bool [batch]: sequence has produced a stop token
    cache: AppendCache
    key: jax.Array  # PRNG key for the next draw


@struct.dataclass
class Knobs:
    """Traced sampling settings: changing them does not recompile."""

    temperature: jax.Array  # float32 []
    top_k: jax.Array  # int32 []
    top_p: jax.Array  # float32 []
    stop_tokens: jax.Array  # int32 [n_stop]; -1 entries never match


def _choose(logits: jax.Array, state_key: jax.Array, knobs: Knobs, mode: SamplingMode):
    key, draw = jax.random.split(state_key)
    return sample(logits, draw, knobs.temperature, knobs.top_k, knobs.top_p, mode), key


def _prefill(params: Params, prompt: jax.Array, starts: jax.Array, cache: AppendCache, key: jax.Array, knobs: Knobs, *,
             config: ModelConfig, mode: SamplingMode, deltas: WeightDeltas | None = None) -> SamplingState:
    """Run the left-padded prompt [batch, bucket] through the model and choose the first new token."""
    batch, bucket = prompt.shape
    positions = jnp.maximum(jnp.arange(bucket, dtype=jnp.int32)[None, :] - starts[:, None], 0)
    logits, cache = prompt_pass(params, config, prompt, positions, cache, deltas=deltas)
    token, key = _choose(logits[:, 0], key, knobs, mode)
    tokens = jnp.full((batch, cache.max_len), config.pad_id, jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, prompt, (0, 0))
    tokens = tokens.at[:, bucket].set(token)
    return SamplingState(
        step=jnp.ones((), jnp.int32), tokens=tokens, last_token=token, positions=bucket - starts,
        done=jnp.isin(token, knobs.stop_tokens), cache=cache, key=key,
    )


def _decode_step(params: Params, state: SamplingState, knobs: Knobs, *, config: ModelConfig,
                 mode: SamplingMode, deltas: WeightDeltas | None = None) -> SamplingState:
    """Feed the newest token of every sequence, choose the next one. Finished sequences receive pad tokens."""
    logits, cache = Transformer(config).apply(
        {"params": params}, state.last_token[:, None], state.positions[:, None], state.cache, last_only=True,
        deltas=deltas,
    )
    token, key = _choose(logits[:, 0], state.key, knobs, mode)
    token = jnp.where(state.done, config.pad_id, token)
    slot = cache.cursor  # the slot this token will occupy once it is fed
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, slot))
    return SamplingState(
        step=state.step + 1, tokens=tokens, last_token=token, positions=state.positions + 1,
        done=state.done | jnp.isin(token, knobs.stop_tokens), cache=cache, key=key,
    )


@functools.partial(jax.jit, static_argnames=("config", "mode"), donate_argnames=("cache",))
def _generate_loop(params: Params, prompt: jax.Array, starts: jax.Array, cache: AppendCache, key: jax.Array,
                   knobs: Knobs, max_new_tokens: jax.Array, *, config: ModelConfig,
                   mode: SamplingMode, deltas: WeightDeltas | None = None) -> tuple[jax.Array, AppendCache]:
    """Prefill, then decode until `max_new_tokens` or every sequence stopped. Returns the token buffer and the final
    cache (returned so that the donated input cache is updated in place rather than copied)."""
    state = _prefill(params, prompt, starts, cache, key, knobs, config=config, mode=mode, deltas=deltas)

    def keep_going(s: SamplingState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    state = jax.lax.while_loop(
        keep_going, lambda s: _decode_step(params, s, knobs, config=config, mode=mode, deltas=deltas), state
    )
    return state.tokens, state.cache


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "mode"), donate_argnames=("cache",))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("config", "mode"), donate_argnames=("state",))


class _Plan:
    """Validated, padded inputs of one generate call (host-side; nothing here runs on the device)."""

    def __init__(self, model: Model, prompt_ids, max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, stop_tokens, cache_length: int | None, kv: Method | None = None):
        cfg = model.config
        self.kv = as_method(kv)
        temperature, top_k, top_p, self.seed = check_settings(temperature, top_k, top_p, seed)
        self.prompts = prompts = _as_prompt_list(prompt_ids)
        for i, p in enumerate(prompts):
            check_token_ids(p, cfg.vocab_size, f"token ids of prompt {i}")
        self.max_new_tokens = integer(max_new_tokens, "max_new_tokens", lo=1)
        self.prompt_len = max(len(p) for p in prompts)
        self._check_positions(cfg.max_position_embeddings)
        self.bucket = prompt_bucket(self.prompt_len)
        if cache_length is None:
            # a quantized cache needs room for at least one full-precision buffer after the prompt
            cache_length = round_cache_length(self.bucket + max(self.max_new_tokens, min_decode_slots(self.kv)))
        elif self.prompt_len + self.max_new_tokens > integer(cache_length, "cache_length", lo=1):
            raise ZipjaxError(
                f"prompt ({self.prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) = "
                f"{self.prompt_len + self.max_new_tokens} does not fit a cache of {cache_length} slots"
            )
        if cache_length > 2 * cfg.max_position_embeddings + CACHE_ROUNDING:
            raise ZipjaxError(f"cache_length {cache_length} is far beyond the model's "
                              f"{cfg.max_position_embeddings} positions; those slots could never be used")
        self.bucket = min(self.bucket, cache_length - self.max_new_tokens)
        self.cache_length = cache_length
        check_cache(self.kv, cfg, len(prompts), cache_length, self.bucket)  # geometry errors now, not inside jit
        check_memory(self.kv, cfg, len(prompts), cache_length, self.bucket, model.mesh.size if model.mesh else 1)
        self.batch = len(prompts)
        self.prompt, self.starts = left_pad(prompts, self.bucket, cfg.pad_id)
        self.mode = SamplingMode(greedy=temperature == 0, top_k=top_k is not None,
                                 top_p=top_p is not None and top_p < 1.0)
        self.knobs = _knobs(cfg, temperature, top_k, top_p, stop_tokens)

    def _check_positions(self, max_positions: int) -> None:
        if self.prompt_len > max_positions:
            raise ZipjaxError(f"the prompt has {self.prompt_len} tokens, longer than the model's maximum of "
                              f"{max_positions} positions")
        if self.prompt_len + self.max_new_tokens > max_positions:
            raise ZipjaxError(f"prompt ({self.prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds "
                              f"the model's maximum of {max_positions} positions")

    def device_inputs(self, model: Model) -> tuple[jax.Array, jax.Array, AppendCache]:
        prompt = place(self.prompt, model.mesh, PartitionSpec("data", None))
        starts = place(self.starts, model.mesh, PartitionSpec("data"))
        cache = cache_initializer(model.config, self.batch, self.cache_length, model.mesh, self.kv,
                                  self.bucket)(starts)
        return prompt, starts, cache

    def output(self, tokens: np.ndarray) -> np.ndarray:
        """[batch, prompt_len + max_new_tokens]: the left-padded prompts followed by the new tokens."""
        return tokens[:, self.bucket - self.prompt_len: self.bucket + self.max_new_tokens]


def _as_prompt_list(prompt_ids) -> list[np.ndarray]:
    if isinstance(prompt_ids, np.ndarray | jax.Array):
        array = np.asarray(prompt_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ZipjaxError(f"prompt_ids must be [batch, seq] or a list of token lists, got shape {array.shape}")
        prompts = list(array)
    elif isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, str):
        if len(prompt_ids) and all(isinstance(t, int | np.integer) for t in prompt_ids):
            prompt_ids = [prompt_ids]
        prompts = [_as_array(p, i) for i, p in enumerate(prompt_ids)]
    else:
        raise ZipjaxError(
            f"prompt_ids must be token ids (a list of lists or an array), got {type(prompt_ids).__name__}"
        )
    if not prompts:
        raise ZipjaxError("prompt_ids holds no prompts")
    for i, p in enumerate(prompts):
        if p.ndim != 1 or p.size == 0:
            raise ZipjaxError(f"prompt {i} is empty" if p.size == 0 else f"prompt {i} is not a flat list of token ids")
        if not np.issubdtype(p.dtype, np.integer):
            raise ZipjaxError(f"prompt {i} holds non-integer values, or integers beyond 64 bits ({p.dtype})")
    return prompts  # in their own integer dtype: ranges are checked before any cast (2**32 + 3 is not 3)


def _as_array(prompt, index: int) -> np.ndarray:
    try:
        return np.asarray(prompt)
    except (ValueError, TypeError, OverflowError):
        raise ZipjaxError(f"prompt {index} is not a flat list of token ids") from None


def _knobs(cfg: ModelConfig, temperature: float, top_k: int | None, top_p: float | None, stop_tokens) -> Knobs:
    """Traced sampling settings; the settings themselves are checked by `check_settings` first."""
    if stop_tokens is None:
        stop_tokens = cfg.eos_token_ids
    elif isinstance(stop_tokens, int | np.integer):
        stop_tokens = (stop_tokens,)
    if isinstance(stop_tokens, str | bytes) or not isinstance(stop_tokens, Sequence | np.ndarray):
        raise ZipjaxError(f"stop_tokens must be a token id or a list of them, got {stop_tokens!r:.80}")
    stop_tokens = np.asarray(list(stop_tokens))
    if stop_tokens.ndim != 1 or (stop_tokens.size and not np.issubdtype(stop_tokens.dtype, np.integer)):
        raise ZipjaxError(f"stop_tokens must be a token id or a list of them, got {stop_tokens.tolist()!r:.80}")
    check_token_ids(stop_tokens, cfg.vocab_size, "stop tokens")
    stop = np.full(max(MIN_STOP_SLOTS, next_pow2(len(stop_tokens))), -1, np.int32)  # fixed size: no recompiles
    stop[: len(stop_tokens)] = stop_tokens
    return Knobs(
        temperature=jnp.float32(temperature if temperature > 0 else 1.0),
        top_k=jnp.int32(top_k or 0), top_p=jnp.float32(top_p if top_p is not None else 1.0),
        stop_tokens=jnp.asarray(stop),
    )


def generate(model: Model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: int | Sequence[int] | None = None,
             cache_length: int | None = None, kv: Method | None = None, expert=None) -> np.ndarray:
    """Generate `max_new_tokens` tokens after each prompt.

    Args:
      prompt_ids: a list of token lists (lengths may differ), one token list, or an int array [batch, seq].
      temperature: 0 picks the most likely token (greedy); > 0 samples.
      top_k, top_p: optional filters applied before sampling (ignored when greedy).
      stop_tokens: ids that end a sequence; default the model's EOS ids; `()` for none.
      cache_length: KV cache slots; default the padded prompt length + max_new_tokens rounded up to 128.
      kv: None for the dense cache, or a compressed cache: `zipjax.kv.ZipCache(...)`, `KIVI(...)`, `Uniform(...)`,
        `ZipVL(...)`, `MiniCache(...)`.
      expert: with a model that carries weight deltas (`model.deltas`, e.g. from zipjax.experts.attach), the expert
        of each prompt: a name, None (the base), one of those per prompt, or "auto" (the bank's router picks).
        Traced: a new mix does not recompile.
    Returns:
      int32 [batch, prompt_len + max_new_tokens] like transformers: prompts left-padded to the longest, then the
      generated tokens; after a stop token every position holds the pad id.
    """
    plan = _Plan(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, cache_length, kv)
    params, deltas = model.batch_inputs(expert, plan.batch, plan.prompts)
    prompt, starts, cache = plan.device_inputs(model)
    with mesh_context(model.mesh):
        tokens, _ = _generate_loop(params, prompt, starts, cache, jax.random.key(plan.seed), plan.knobs,
                                   jnp.int32(plan.max_new_tokens), config=model.config, mode=plan.mode,
                                   deltas=deltas)
    return plan.output(to_host(tokens))


def generate_stream(model: Model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    stop_tokens: int | Sequence[int] | None = None,
                    cache_length: int | None = None, kv: Method | None = None,
                    expert=None) -> TokenStream:
    """Like `generate`, but yields int32 [batch] new tokens one step at a time (pad for finished sequences).

    Stops after `max_new_tokens` steps or once every sequence has produced a stop token (that token included).
    Every setting is checked here, before the first step; the returned iterator also tells the KV cache's bytes
    (`TokenStream.cache_nbytes`).
    """
    plan = _Plan(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, cache_length, kv)
    return TokenStream(model, plan, expert)


class TokenStream(Iterator[np.ndarray]):
    """The iterator of `generate_stream`: the prompt pass runs at the first `next`, one decode step at each later
    one; the KV cache lives on between steps, so its size can be read (`cache_nbytes`)."""

    def __init__(self, model: Model, plan: _Plan, expert):
        self._model, self._plan = model, plan
        self._params, self._deltas = model.batch_inputs(expert, plan.batch, plan.prompts)
        self._static = dict(config=model.config, mode=plan.mode)
        self._state: SamplingState | None = None
        self._finished = False

    def __next__(self) -> np.ndarray:
        if self._finished:
            raise StopIteration
        plan, model = self._plan, self._model
        # the context mesh is entered per step: an iterator must not leave it set while suspended
        with mesh_context(model.mesh):
            if self._state is None:
                prompt, starts, cache = plan.device_inputs(model)
                self._state = _prefill_jit(self._params, prompt, starts, cache, jax.random.key(plan.seed),
                                           plan.knobs, **self._static, deltas=self._deltas)
            else:
                self._state = _decode_step_jit(self._params, self._state, plan.knobs, **self._static,
                                               deltas=self._deltas)
        state = self._state
        self._finished = (int(to_host(state.step)) >= plan.max_new_tokens or bool(np.all(to_host(state.done))))
        return to_host(state.last_token)

    def cache_nbytes(self) -> int:
        """Bytes the KV cache holds (every array of it: codes, scales, slot indices, full-precision buffers)."""
        if self._state is None:
            raise ZipjaxError("the KV cache exists once the first token has been drawn")
        return self._state.cache.nbytes()

    def dense_cache_nbytes(self) -> int:
        """Bytes a dense cache of the same slots and dtype would hold: the yardstick of a compressed one."""
        cfg, plan = self._model.config, self._plan
        itemsize = np.dtype(cfg.jnp_dtype).itemsize  # the dense cache's dtype: the model's (zipjax.kv.dense)
        return 2 * cfg.num_layers * plan.batch * cfg.num_kv_heads * plan.cache_length * cfg.head_dim * itemsize
