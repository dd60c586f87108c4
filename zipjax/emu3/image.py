"""Text-to-image with Emu3: prompt formatting, batched classifier-free guidance, constrained sampling, VQ decode.

    result = zipjax.generate_image(model, "a cat on a red sofa", size=(720, 720), cfg_scale=3.0, seed=0)
    result.images[0]            # uint8 [720, 720, 3]
    result.num_forward_passes   # 8190 for a 90x90-code image (prefill counted as one)

The prompt is BOS + text + `<|image start|>` + "h*w" + `<|image token|>` (h, w in codes); the negative prompt is
formatted the same way. Conditional and unconditional prompts run as one batch of 2B sequences (left-padded into
one cache); at each step guidance combines their log-probabilities, `cfg * (cond - uncond) + uncond`, as
transformers' CFG processor does. Image tokens follow a fixed layout: after every w visual tokens the end-of-line
token is written (never sampled), and after the last row come end-of-frame, end-of-image and EOS. Visual tokens are
sampled from the visual-token slice of the vocabulary only, with temperature, top-k and top-p applied there.

Decoding is a jitted `lax.while_loop`; it is called once per image row with the state donated, so a progress bar can
follow the rows at no measurable cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from zipjax.cache import KVCache
from zipjax.config import ModelConfig
from zipjax.emu3.model import Emu3Model
from zipjax.errors import ZipjaxError
from zipjax.generate import CACHE_ROUNDING, MIN_PREFILL_BUCKET, _cache_initializer, _next_pow2, _round_up
from zipjax.kv import Method
from zipjax.kv.methods import method_spec
from zipjax.sampling import SamplingMode, sample
from zipjax.transformer import Params, Transformer, output_head

DEFAULT_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, "
                           "watermark, username, blurry.")


@dataclasses.dataclass(frozen=True)
class ImageResult:
    images: np.ndarray  # uint8 [batch, H, W, 3]
    tokens: np.ndarray  # int32 [batch, h * (w + 1) + 3]: rows of visual tokens + EOL, then EOF, EOI, EOS
    codes: np.ndarray  # int32 [batch, h, w]
    num_forward_passes: int  # model calls for the whole batch, prefill counted as one
    prompt_ids: list[list[int]]


@dataclasses.dataclass(frozen=True)
class Layout:
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


@struct.dataclass
class ImageState:
    step: jax.Array  # int32 []: image tokens chosen so far
    tokens: jax.Array  # int32 [batch, num_tokens]: the image tokens (conditional rows only)
    last_token: jax.Array  # int32 [batch]
    positions: jax.Array  # int32 [2 * batch or batch]: RoPE position of the token fed next
    cache: KVCache
    key: jax.Array  # the base key; image token n is drawn with fold_in(key, n)


@struct.dataclass
class ImageKnobs:
    cfg_scale: jax.Array  # float32 []
    temperature: jax.Array  # float32 []
    top_k: jax.Array  # int32 []
    top_p: jax.Array  # float32 []


def token_grid(model: Emu3Model, size: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, columns) of codes for an image of `size` = (height, width) pixels; default: the model's square size."""
    f = model.vq_config.spatial_factor
    if size is None:
        side = round(math.sqrt(model.vision.image_area) / f)
        return side, side
    if len(size) != 2 or any(not isinstance(s, int | np.integer) or s <= 0 for s in size):
        raise ZipjaxError(f"size must be (height, width) in pixels, got {size!r}")
    height, width = size
    if height % f or width % f:
        raise ZipjaxError(f"image size {height}x{width} is not a multiple of the VQ-VAE's factor {f} (each code "
                          f"covers {f}x{f} pixels); try {max(f, round(height / f) * f)}x{max(f, round(width / f) * f)}")
    return height // f, width // f


def format_prompt(model: Emu3Model, prompt: str | Sequence[int], rows: int, cols: int) -> list[int]:
    """Token ids that end where the first image token is sampled. Text is formatted as Emu3 expects; a list of ids
    is taken as the complete formatted prompt and must end with `<|image token|>`."""
    vocab = model.vocab
    if isinstance(prompt, str):
        tok = model.tokenizer
        return [vocab.bos, *tok.encode(prompt, add_special_tokens=False), vocab.boi,
                *tok.encode(f"{rows}*{cols}", add_special_tokens=False), vocab.image_wrapper]
    ids = [int(t) for t in prompt]
    if not ids or ids[-1] != vocab.image_wrapper:
        raise ZipjaxError(f"a prompt given as token ids must be the whole formatted prompt, ending with the image "
                          f"token <|image token|> (id {vocab.image_wrapper})")
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise ZipjaxError(f"prompt token ids must lie in [0, {model.config.vocab_size})")
    return ids


def visual_logprobs(logits: jax.Array, knobs: ImageKnobs, batch: int) -> jax.Array:
    """Guided log-probabilities of the visual tokens from the logits of the visual tokens only (`Layout.vocab_range`):
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
    """One code from visual log-probabilities [codebook] of image token `index` of batch row `row`. The draw
    depends only on (index, row), so every decoding order (sequential, ZipAR, adaptive) samples a position of an
    image with the same randomness."""
    draw = jax.random.fold_in(jax.random.fold_in(key, index), row)
    return sample(visual[None], draw, knobs.temperature, knobs.top_k, knobs.top_p, mode)[0]


def sample_codes(visual: jax.Array, key: jax.Array, index: jax.Array, knobs: ImageKnobs,
                 mode: SamplingMode) -> jax.Array:
    """int32 [batch] codes from [batch, codebook], all for image token `index` (see `sample_code`)."""
    rows = jnp.arange(visual.shape[0], dtype=jnp.int32)
    return jax.vmap(lambda v, r: sample_code(v, key, index, r, knobs, mode))(visual, rows)


def _choose(logits: jax.Array, key: jax.Array, step: jax.Array, knobs: ImageKnobs, layout: Layout, batch: int,
            mode: SamplingMode) -> jax.Array:
    """The next image token of each conditional sequence: EOL at the end of a row, else a sampled visual token.

    logits: float32 [2 * batch or batch, vocab]; step: int32 [] index of the token being chosen."""
    code = sample_codes(visual_logprobs(logits, knobs, batch), key, step, knobs, mode)
    row_end = (step + 1) % (layout.width + 1) == 0
    return jnp.where(row_end, layout.eol, code + layout.visual_offset).astype(jnp.int32)


def _feed(tokens: jax.Array, cache_batch: int) -> jax.Array:
    """The conditional batch's tokens [batch], repeated for the unconditional half when CFG runs."""
    return jnp.tile(tokens, cache_batch // tokens.shape[0])


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode"), donate_argnames=("cache",))
def _prefill(params: Params, prompt: jax.Array, starts: jax.Array, cache: KVCache, key: jax.Array,
             knobs: ImageKnobs, *, config: ModelConfig, layout: Layout, batch: int, mode: SamplingMode) -> ImageState:
    bucket = prompt.shape[1]
    head = output_head(params, config, layout.vocab_range)
    positions = jnp.maximum(jnp.arange(bucket, dtype=jnp.int32)[None, :] - starts[:, None], 0)
    logits, cache = Transformer(config).apply({"params": params}, prompt, positions, cache, last_only=True,
                                              head=head)
    step = jnp.zeros((), jnp.int32)
    token = _choose(logits[:, 0], key, step, knobs, layout, batch, mode)
    tokens = jnp.zeros((batch, layout.num_tokens), jnp.int32).at[:, 0].set(token)
    return ImageState(step=step + 1, tokens=tokens, last_token=token, positions=bucket - starts, cache=cache,
                      key=key)


@functools.partial(jax.jit, static_argnames=("config", "layout", "batch", "mode"), donate_argnames=("state",))
def _decode_until(params: Params, state: ImageState, stop: jax.Array, knobs: ImageKnobs, *, config: ModelConfig,
                  layout: Layout, batch: int, mode: SamplingMode) -> ImageState:
    """Feed the newest token and choose the next one until `stop` tokens have been chosen."""
    head = output_head(params, config, layout.vocab_range)

    def step(s: ImageState) -> ImageState:
        fed = _feed(s.last_token, s.cache.batch)
        logits, cache = Transformer(config).apply({"params": params}, fed[:, None], s.positions[:, None], s.cache,
                                                  last_only=True, head=head)
        token = _choose(logits[:, 0], s.key, s.step, knobs, layout, batch, mode)
        return ImageState(step=s.step + 1, tokens=s.tokens.at[:, s.step].set(token), last_token=token,
                          positions=s.positions + 1, cache=cache, key=s.key)

    return jax.lax.while_loop(lambda s: s.step < stop, step, state)


def generate_image(model: Emu3Model, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                   size: tuple[int, int] | None = None, cfg_scale: float = 3.0,
                   negative_prompt: str | Sequence[int] = DEFAULT_NEGATIVE_PROMPT, temperature: float = 1.0,
                   top_k: int | None = 2048, top_p: float | None = None, seed: int = 0,
                   zipar_window: int | str | None = None, zipar_min_window: int = 4, zipar_kernel: bool = False,
                   sjd_window: int | None = None, kv: Method | None = None, progress: bool = False) -> ImageResult:
    """Generate one image per prompt.

    Args:
      prompt: text, token ids of a complete formatted prompt, or a list of either (a batch).
      size: (height, width) in pixels, multiples of the VQ factor; default the model's `image_area` as a square.
      cfg_scale: classifier-free guidance weight; 1.0 turns guidance (and the unconditional batch) off.
      negative_prompt: what the unconditional branch is conditioned on (text or formatted token ids).
      temperature: 0 picks the most likely visual token; top_k / top_p filter before sampling.
      zipar_window: None decodes one token per pass; an integer s decodes with ZipAR: a row starts once the row
        above is s tokens ahead, so an image of h x w codes takes (h - 1) * s + w passes instead of h * (w + 1).
        "adaptive": each row starts on a drafted first token once the row above has `zipar_min_window` tokens, and
        the draft is verified (kept or resampled) as that row grows; the schedule then differs per image.
      sjd_window: decode with Speculative Jacobi Decoding (ZipAR's peer) over a window of this many tokens.
      zipar_kernel: run ZipAR's attention as the Pallas kernel (compiled on GPU/TPU, interpreted on CPU) instead
        of jax.numpy.
      kv: a compressed KV cache (`zipjax.kv.ZipCache(...)`, `KIVI(...)`, `Uniform(...)`) for one-token-per-pass
        decoding: the prompt block is quantized after prefill and image tokens as each window fills.
    """
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"generate_image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    if temperature < 0 or cfg_scale <= 0:
        raise ZipjaxError(f"need temperature >= 0 and cfg_scale > 0, got {temperature} and {cfg_scale}")
    if top_k is not None and top_k < 1:
        raise ZipjaxError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ZipjaxError(f"top_p must lie in (0, 1], got {top_p}")
    adaptive = isinstance(zipar_window, str) and zipar_window == "adaptive"
    if sjd_window is not None and (zipar_window is not None or not isinstance(sjd_window, int | np.integer)
                                   or sjd_window < 2):
        raise ZipjaxError("sjd_window (Speculative Jacobi Decoding) must be an integer >= 2, and excludes ZipAR")
    if zipar_window is not None and not adaptive and (
            not isinstance(zipar_window, int | np.integer) or isinstance(zipar_window, bool) or zipar_window < 1):
        raise ZipjaxError(f"zipar_window must be None, a positive integer or 'adaptive', got {zipar_window!r}")
    if not isinstance(zipar_min_window, int | np.integer) or zipar_min_window < 1:
        raise ZipjaxError(f"zipar_min_window must be a positive integer, got {zipar_min_window!r}")
    spec = method_spec(kv)
    if kv is not None and (zipar_window is not None or sjd_window is not None):
        raise ZipjaxError(
            "a quantized KV cache (kv=...) takes one token per pass; ZipAR and SJD passes write several tokens at "
            "scattered slots, which it does not support yet: use kv=None with them, or zipar_window=None with kv"
        )
    rows, cols = token_grid(model, size)
    vocab = model.vocab
    layout = Layout(rows, cols, vocab.eol, vocab.visual_offset, vocab.codebook_size)

    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int | np.integer)) else prompt
    if not prompts:
        raise ZipjaxError("no prompt given")
    batch = len(prompts)
    cond = [format_prompt(model, p, rows, cols) for p in prompts]
    uncond = [format_prompt(model, negative_prompt, rows, cols)] * batch if cfg_scale != 1.0 else []
    sequences = cond + uncond
    longest = max(len(s) for s in sequences)
    cfg = model.config
    if longest + layout.num_tokens > cfg.max_position_embeddings:
        raise ZipjaxError(f"a {rows}x{cols}-code image needs {layout.num_tokens} tokens after a {longest}-token "
                          f"prompt, more than the model's {cfg.max_position_embeddings} positions")

    bucket = max(MIN_PREFILL_BUCKET, _next_pow2(longest))
    padded = np.full((len(sequences), bucket), cfg.pad_id, np.int32)
    for i, s in enumerate(sequences):
        padded[i, bucket - len(s):] = s
    starts = jnp.asarray(bucket - np.array([len(s) for s in sequences]), jnp.int32)
    mode = SamplingMode(greedy=temperature == 0, top_p=top_p is not None and top_p < 1,
                        static_top_k=None if top_k is None else min(int(top_k), vocab.codebook_size))
    knobs = ImageKnobs(cfg_scale=jnp.float32(cfg_scale), temperature=jnp.float32(temperature or 1.0),
                       top_k=jnp.int32(top_k or 0), top_p=jnp.float32(top_p or 1.0))
    static = dict(config=cfg, layout=layout, batch=batch, mode=mode)
    key = jax.random.key(seed)

    if sjd_window is not None:
        from zipjax.zipar.sjd import run_sjd

        body, per_image = run_sjd(model, jnp.asarray(padded), starts, key, knobs, static, bucket, int(sjd_window),
                                  progress)
        body, passes = np.asarray(body), int(per_image.max())
    elif zipar_window is None:
        cache_len = _round_up(bucket + layout.num_tokens, CACHE_ROUNDING)
        if spec is not None:  # geometry errors (bit packing, window) now, not inside jit
            spec.check(cfg, len(sequences), cache_len, bucket)
        cache = _cache_initializer(cfg, len(sequences), cache_len, model.mesh, spec, bucket)(starts)
        state = _prefill(model.params, jnp.asarray(padded), starts, cache, key, knobs, **static)
        for row in tqdm(range(rows), desc="image rows", unit="row", disable=not progress):
            state = _decode_until(model.params, state, jnp.int32((row + 1) * (cols + 1)), knobs, **static)
        passes = layout.num_tokens
        body = np.asarray(state.tokens)
    elif adaptive:
        from zipjax.zipar.adaptive import run_adaptive

        body, per_image = run_adaptive(model, jnp.asarray(padded), starts, key, knobs, static, bucket,
                                       int(zipar_min_window), progress, use_kernel=zipar_kernel)
        body, passes = np.asarray(body), int(per_image.max())
    else:
        from zipjax.zipar.decode import run_zipar

        state, passes = run_zipar(model, jnp.asarray(padded), starts, key, knobs, static, bucket, int(zipar_window),
                                  progress, use_kernel=zipar_kernel)
        body = np.asarray(state.tokens)
    tail = np.tile(np.array([vocab.eof, vocab.eoi, vocab.eos], np.int32), (batch, 1))
    codes = vocab.tokens_to_codes(body, rows, cols)
    images = model.to_uint8(model.decode_codes(codes))
    return ImageResult(images=images, tokens=np.concatenate([body, tail], axis=1), codes=codes,
                       num_forward_passes=passes, prompt_ids=cond)
