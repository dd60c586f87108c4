"""Image understanding with Emu3: encode an image with the VQ-VAE and ask the language model about it.

    answer = zipjax.emu3.ask(model, image_uint8, "What is in the picture?")

The image becomes text the language model reads: `<|image start|>` "h*w" `<|image token|>`, h rows of visual tokens
each closed by end-of-line, end-of-frame, `<|image end|>`, inside BAAI's chat format
"You are a helpful assistant. USER: {image}{question}. ASSISTANT:". This is the prompt ZipVL sparsifies.

    answer = ask(model, image_uint8, "What is in the picture?", kv=zipjax.kv.ZipVL())
    answers = ask(model, images_uint8, "which digit?", kv=zipjax.kv.KIVI(bits=2))   # a batch [n, H, W, 3]
    rows = zipvl_report(model, image_uint8, "What is in the picture?")       # ZipVL's important tokens per layer

`kv=` takes any zipjax.kv method (ZipVL: sparse prefill over the image tokens and mixed precision; ZipCache, KIVI,
Uniform, MiniCache); the cache's geometry is checked against the image's prompt before the image is encoded.
`zipvl_report` runs the prompt through ZipVL's own cache and says, per layer, how many of the image's and of the
text's tokens are important. A model loaded on a mesh answers on it.
Imports: config, emu3 (model, vocab), errors, generate, kv (method, methods, zipvl), shapes, sharding, transformer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.config import ModelConfig
from zipjax.emu3.model import Emu3Model
from zipjax.emu3.vocab import Emu3Vocab
from zipjax.errors import ZipjaxError
from zipjax.generate import generate
from zipjax.kv.method import Method, as_method
from zipjax.kv.methods import check_cache, min_decode_slots
from zipjax.kv.zipvl import ZipVL
from zipjax.shapes import cache_length as round_cache_length
from zipjax.shapes import left_pad, prompt_bucket
from zipjax.sharding import mesh_context, to_host
from zipjax.transformer import Transformer

SYSTEM = "You are a helpful assistant. USER: "
ASSISTANT = ". ASSISTANT:"


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is resized to: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect
    ratio kept as well as that allows (the rule of transformers' Emu3 image processor)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def prepare_image(model: Emu3Model, image) -> np.ndarray:
    """uint8 [H, W, 3] -> normalised float32 [1, H', W', 3] at the size `fit_size` picks (bicubic resize when the
    size changes; transformers resizes with PIL, so resized pixels can differ from it slightly)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ZipjaxError(f"the image must be a uint8 array [height, width, 3], got {image.dtype} {image.shape}")
    cfg = model.vq_config
    size = fit_size(image.shape[0], image.shape[1], cfg.spatial_factor, cfg.min_pixels, cfg.max_pixels)
    if size != image.shape[:2]:
        resized = jax.image.resize(jnp.asarray(image, jnp.float32), (*size, 3), method="bicubic")
        image = np.asarray(jnp.clip(jnp.round(resized), 0, 255)).astype(np.uint8)
    return model.normalize(image)


def image_prompt_ids(model: Emu3Model, codes: np.ndarray) -> list[int]:
    """The token ids that stand for one image of codes [h, w]."""
    return image_ids(model.tokenizer, model.vocab, codes)


def image_ids(tokenizer, vocab: Emu3Vocab, codes: np.ndarray) -> list[int]:
    rows, cols = codes.shape
    body = vocab.codes_to_tokens(codes).reshape(-1)
    return [vocab.boi, *tokenizer.encode(f"{rows}*{cols}", add_special_tokens=False), vocab.image_wrapper,
            *body.tolist(), vocab.eof, vocab.eoi]


def question_prompt(model: Emu3Model, codes: np.ndarray, question: str) -> list[int]:
    return question_ids(model.tokenizer, model.vocab, codes, question)


def question_ids(tokenizer, vocab: Emu3Vocab, codes: np.ndarray, question: str) -> list[int]:
    """The understanding prompt from a tokenizer and vocabulary alone: what `ask` reads, and what
    checkpoints/train_digits_emu3.py trains the digits model on."""
    return [vocab.bos, *tokenizer.encode(SYSTEM, add_special_tokens=False), *image_ids(tokenizer, vocab, codes),
            *tokenizer.encode(question + ASSISTANT, add_special_tokens=False)]


def image_span(model: Emu3Model, codes: np.ndarray) -> tuple[int, int]:
    """[first, end) of the image's tokens (<|image start|> to <|image end|>) in `question_prompt`."""
    first = 1 + len(model.tokenizer.encode(SYSTEM, add_special_tokens=False))
    return first, first + len(image_prompt_ids(model, codes))


DEFAULT_ANSWER_TOKENS = 256


def _codes_shape(model: Emu3Model, shape: tuple[int, ...]) -> tuple[int, int]:
    cfg = model.vq_config
    height, width = fit_size(shape[0], shape[1], cfg.spatial_factor, cfg.min_pixels, cfg.max_pixels)
    return height // cfg.spatial_factor, width // cfg.spatial_factor


def _images(image) -> tuple[np.ndarray, bool]:
    """uint8 [n, H, W, 3] and whether one image [H, W, 3] was given."""
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[0] == 0:
        raise ZipjaxError("the batch of images is empty")
    return (image[None], True) if image.ndim != 4 else (image, False)


def _answer_room(model: Emu3Model, prompt_len: int, max_new_tokens: int | None) -> int:
    if max_new_tokens is not None:
        return max_new_tokens
    room = model.config.max_position_embeddings - prompt_len
    if room < 1:
        raise ZipjaxError(f"the image and question take {prompt_len} tokens, all of the model's "
                          f"{model.config.max_position_embeddings} positions; ask about a smaller image")
    return min(DEFAULT_ANSWER_TOKENS, room)


def _check_kv(model: Emu3Model, kv: Method | None, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    """The cache geometry generate will build (its bucket and cache length), checked before the image is encoded:
    a cache that cannot hold the image's prompt is refused by name before any compute."""
    if kv is None or isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        return  # generate names a bad max_new_tokens itself
    if prompt_len + max_new_tokens > model.config.max_position_embeddings:
        return  # generate refuses it, naming the positions
    bucket = prompt_bucket(prompt_len)
    length = round_cache_length(bucket + max(max_new_tokens, min_decode_slots(kv)))
    try:
        check_cache(kv, model.config, batch, length, min(bucket, length - max_new_tokens))
    except ZipjaxError as error:
        raise ZipjaxError(f"the {kv.name} KV cache cannot hold this image's prompt of {prompt_len} tokens: "
                          f"{error}") from None


def ask(model: Emu3Model, image, question: str, *, kv: Method | None = None, max_new_tokens: int | None = None,
        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0
        ) -> str | list[str]:
    """The model's answer to `question` about `image` (uint8 [H, W, 3]; or a batch [n, H, W, 3] of images of one
    size, answered together: a list of answers). `kv`: the KV cache the prompt and answer go through (None: dense;
    `zipjax.kv.ZipVL()` sparsifies the prefill over the image tokens and keeps its important tokens at high bits;
    ZipCache, KIVI, Uniform, MiniCache compress). `max_new_tokens`: None answers in up to `DEFAULT_ANSWER_TOKENS`,
    or fewer where the model's positions end sooner after the image and question. A model on a mesh
    (`zipjax.load(..., mesh=...)`) answers on it. The image's size, the question and the cache are checked before
    any compute."""
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"asking about an image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    kv = as_method(kv)
    images, single = _images(image)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ZipjaxError(f"the image must be a uint8 array [height, width, 3] (or a batch [n, height, width, 3]), "
                          f"got {images.dtype} {np.asarray(image).shape}")
    shape = _codes_shape(model, images.shape[1:3])
    prompt_len = len(question_prompt(model, np.zeros(shape, np.int32), question))
    max_new_tokens = _answer_room(model, prompt_len, max_new_tokens)
    _check_kv(model, kv, len(images), prompt_len, max_new_tokens)
    pixels = np.concatenate([prepare_image(model, one) for one in images])
    codes = np.asarray(model.encode_pixels(pixels))  # [n, h, w]
    prompts = [question_prompt(model, c, question) for c in codes]
    out = generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop_tokens=[model.vocab.eos], kv=kv)
    answers = [model.tokenizer.decode([int(t) for t in row[prompt_len:]
                                       if t != model.vocab.eos and t != model.config.pad_id]) for row in out]
    return answers[0] if single else answers


@dataclasses.dataclass(frozen=True)
class LayerImportance:
    """One layer's ZipVL ranking of an image-and-question prompt: its important tokens (sparse prefill attends only
    among them), those kept at high bits (p clipped into the cache's room), and how many of each kind they are:
    image tokens (<|image start|> to <|image end|>) and text tokens (system prompt, question). Token counts are means
    over the batch and the KV heads (one set per layer unless ZipVL(per_head=True))."""

    layer: int
    tokens: int
    important: float
    high_bits: float
    image_tokens: int
    image_important: float
    text_tokens: int
    text_important: float

    @property
    def ratio(self) -> float:
        return self.important / self.tokens

    @property
    def image_ratio(self) -> float:
        return self.image_important / self.image_tokens

    @property
    def text_ratio(self) -> float:
        return self.text_important / max(self.text_tokens, 1)


class _RankRecorder:
    """ZipVL's own cache, also keeping the ranking each layer's prompt got (traced inside `_prompt_rankings`): the
    later layers see what ZipVL's sparse prefill gave the earlier ones, as in `ask`."""

    accepts_chunks = False

    def __init__(self, cache, method: ZipVL, starts: jax.Array):
        self.cache, self.method, self.starts, self.rankings = cache, method, starts, []

    def check_fits(self, tokens_shape: tuple[int, int]) -> None:
        self.cache.check_fits(tokens_shape)

    def attend(self, layer, q, k_new, v_new, sliding_window):
        ranking = self.method.rank_prompt(q, k_new, self.starts, layer)  # what the cache computes again, same key
        self.rankings.append((ranking.order, ranking.count, ranking.stored))
        out, self.cache = self.cache.attend(layer, q, k_new, v_new, sliding_window)
        return out, self

    def advance(self, num_tokens: int):
        self.cache = self.cache.advance(num_tokens)
        return self


@functools.partial(jax.jit, static_argnames=("config", "method", "max_len"))
def _prompt_rankings(params, prompt: jax.Array, starts: jax.Array, *, config: ModelConfig, method: ZipVL,
                     max_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order int32 [layers, batch, kv_heads, bucket], count int32 [layers, batch], stored int32 [layers, batch])."""
    positions = jnp.maximum(jnp.arange(prompt.shape[1], dtype=jnp.int32)[None, :] - starts[:, None], 0)
    cache = method.make_cache(config, prompt.shape[0], max_len, prompt.shape[1], starts)
    recorder = _RankRecorder(cache, method, starts)
    Transformer(config).apply({"params": params}, prompt, positions, recorder, last_only=True)
    order, count, stored = zip(*recorder.rankings, strict=True)
    return jnp.stack(order), jnp.stack(count), jnp.stack(stored)


def zipvl_report(model: Emu3Model, image, question: str, kv: ZipVL | None = None) -> list[LayerImportance]:
    """Per layer, the tokens ZipVL (`kv`, default `ZipVL()`) finds important in the prompt `ask` builds for `image`
    (uint8 [H, W, 3], or a batch of one size) and `question`, split into image and text tokens: the prompt runs
    left-padded as in `ask`, through ZipVL's own cache (sparse prefill included), so each layer's ranking is the one
    `ask(..., kv=kv)` uses."""
    kv = ZipVL() if kv is None else kv
    if not isinstance(kv, ZipVL):
        raise ZipjaxError(f"the important-token report is ZipVL's; kv must be a zipjax.kv.ZipVL, got {kv!r:.80}")
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"asking about an image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    images, _ = _images(image)
    shape = _codes_shape(model, images.shape[1:3])
    prompt_len = len(question_prompt(model, np.zeros(shape, np.int32), question))
    _check_kv(model, kv, len(images), prompt_len, 1)
    codes = np.asarray(model.encode_pixels(np.concatenate([prepare_image(model, one) for one in images])))
    bucket = prompt_bucket(prompt_len)
    prompt, starts = left_pad([question_prompt(model, c, question) for c in codes], bucket, model.config.pad_id)
    max_len = round_cache_length(bucket + max(1, min_decode_slots(kv)))
    with mesh_context(model.mesh):
        order, count, stored = (np.asarray(to_host(x)) for x in _prompt_rankings(
            model.params, jnp.asarray(prompt), jnp.asarray(starts), config=model.config, method=kv, max_len=max_len))
    first, end = image_span(model, codes[0])
    return [_layer_importance(i, order[i], count[i], stored[i], bucket - prompt_len, first, end, prompt_len)
            for i in range(len(order))]


def _layer_importance(layer: int, order: np.ndarray, count: np.ndarray, stored: np.ndarray, start: int, first: int,
                      end: int, tokens: int) -> LayerImportance:
    """One layer's report from its ranking: order [batch, kv_heads, bucket] over the left-padded prompt starting at
    slot `start`; the image at prompt positions [first, end)."""
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[-1])[None, None], axis=-1)
    important = ranks < count[:, None, None]  # [batch, kv_heads, bucket], by slot
    image = np.zeros(order.shape[-1], bool)
    image[start + first: start + end] = True
    per_kind = lambda mask: float(important[..., mask].sum(-1).mean())
    text = np.arange(order.shape[-1]) >= start
    text &= ~image
    return LayerImportance(layer=layer, tokens=tokens, important=per_kind(text | image),
                           high_bits=float(stored.mean()), image_tokens=end - first,
                           image_important=per_kind(image), text_tokens=tokens - (end - first),
                           text_important=per_kind(text))


def format_report(rows: list[LayerImportance]) -> str:
    """The report as lines of text, one per layer (what `zipjax ask --kv zipvl` prints)."""
    lines = ["layer  important/tokens  ratio  high-bit  image important  image ratio  text important  text ratio"]
    lines += [f"{r.layer:5d}  {r.important:7.1f}/{r.tokens:<7d}  {r.ratio:5.3f}  {r.high_bits:8.1f}  "
              f"{r.image_important:7.1f}/{r.image_tokens:<7d}  {r.image_ratio:11.3f}  "
              f"{r.text_important:6.1f}/{r.text_tokens:<7d}  {r.text_ratio:10.3f}" for r in rows]
    return "\n".join(lines)
