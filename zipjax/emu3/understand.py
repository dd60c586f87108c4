"""Image understanding with Emu3: encode an image with the VQ-VAE and ask the language model about it.

    answer = zipjax.emu3.ask(model, image_uint8, "What is in the picture?")

The image becomes text the language model reads: `<|image start|>` "h*w" `<|image token|>`, h rows of visual tokens
each closed by end-of-line, end-of-frame, `<|image end|>`, inside BAAI's chat format
"You are a helpful assistant. USER: {image}{question}. ASSISTANT:". This is the prompt ZipVL later sparsifies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zipjax.emu3.model import Emu3Model
from zipjax.errors import ZipjaxError
from zipjax.generate import generate

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
    vocab = model.vocab
    rows, cols = codes.shape
    body = vocab.codes_to_tokens(codes).reshape(-1)
    return [vocab.boi, *model.tokenizer.encode(f"{rows}*{cols}", add_special_tokens=False), vocab.image_wrapper,
            *body.tolist(), vocab.eof, vocab.eoi]


def question_prompt(model: Emu3Model, codes: np.ndarray, question: str) -> list[int]:
    tok = model.tokenizer
    return [model.vocab.bos, *tok.encode(SYSTEM, add_special_tokens=False), *image_prompt_ids(model, codes),
            *tok.encode(question + ASSISTANT, add_special_tokens=False)]


DEFAULT_ANSWER_TOKENS = 256


def ask(model: Emu3Model, image, question: str, *, max_new_tokens: int | None = None, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """The model's answer to `question` about `image` (uint8 [H, W, 3]). `max_new_tokens`: None answers in up to
    `DEFAULT_ANSWER_TOKENS`, or fewer where the model's positions end sooner after the image and question."""
    if not isinstance(model, Emu3Model):
        raise ZipjaxError(f"asking about an image needs an Emu3 checkpoint; this one is {model.config.architecture}")
    codes = np.asarray(model.encode_pixels(prepare_image(model, image)))[0]
    prompt = question_prompt(model, codes, question)
    if max_new_tokens is None:
        room = model.config.max_position_embeddings - len(prompt)
        if room < 1:
            raise ZipjaxError(f"the image and question take {len(prompt)} tokens, all of the model's "
                              f"{model.config.max_position_embeddings} positions; ask about a smaller image")
        max_new_tokens = min(DEFAULT_ANSWER_TOKENS, room)
    out = generate(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop_tokens=[model.vocab.eos])
    answer = [int(t) for t in out[0, len(prompt):] if t != model.vocab.eos and t != model.config.pad_id]
    return model.tokenizer.decode(answer)
