"""`Emu3Model`: a loaded Emu3 checkpoint, i.e. the LLaMA-shaped language model plus its vision tokenizer.

The language model is the same `Transformer` as LLaMA (Emu3's differences are config: RoPE theta 1e6, a 184,622-
token vocabulary that includes 32,768 visual tokens), so everything that works on a `Model` works here:
`model.logits(tokens)`, `zipjax.generate(model, ...)`. On top of that the VQ-VAE maps images to codes and back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from zipjax.emu3.vocab import Emu3Vocab
from zipjax.emu3.vq_config import PaletteConfig, VQConfig
from zipjax.emu3.vqvae import decode_codes, encode_pixels
from zipjax.errors import ZipjaxError
from zipjax.model import Model
from zipjax.sharding import place, to_host
from zipjax.transformer import Params
from zipjax.validate import integer

DEFAULT_IMAGE_AREA = 720 * 720  # Emu3-Gen's training resolution: 90 x 90 codes


@dataclasses.dataclass(frozen=True)
class Emu3Vision:
    """What an Emu3 checkpoint holds besides the language model: the VQ-VAE config and the token vocabulary."""

    vq_config: VQConfig | PaletteConfig  # the vision tokenizer: MoVQ VQ-VAE, or a palette
    vocab: Emu3Vocab
    image_area: int = DEFAULT_IMAGE_AREA
    # what guidance steers away from by default, where the checkpoint's training chose one (None: Emu3's own)
    negative_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"vq_config": self.vq_config.to_dict(), "vocab": self.vocab.to_dict(), "image_area": self.image_area}
        return out if self.negative_prompt is None else {**out, "negative_prompt": self.negative_prompt}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Emu3Vision:
        if not isinstance(d, dict) or not {"vq_config", "vocab"} <= set(d):
            raise ZipjaxError("the emu3 record of the checkpoint needs 'vq_config' and 'vocab'")
        area = integer(d.get("image_area", DEFAULT_IMAGE_AREA), "emu3 image_area", lo=1, hi=1 << 30)
        negative = d.get("negative_prompt")
        if negative is not None and (not isinstance(negative, str) or not negative or len(negative) > 4096):
            raise ZipjaxError("the emu3 record's negative_prompt must be text of 1 to 4096 characters")
        return cls(VQConfig.from_dict(d["vq_config"]), Emu3Vocab.from_dict(d["vocab"]), area, negative)

    def check(self, vocab_size: int) -> None:
        """Every id the pipeline writes lies in the language model's vocabulary, and the visual tokens are the
        codebook's codes."""
        vocab = self.vocab
        if vocab.codebook_size != self.vq_config.codebook_size:
            raise ZipjaxError(f"the vocabulary has {vocab.codebook_size} visual tokens but the vision tokenizer "
                              f"has {self.vq_config.codebook_size} codes")
        ids = {name: getattr(vocab, name) for name in ("bos", "eos", "pad", "image_wrapper", "boi", "eoi", "eol",
                                                        "eof")}
        ids["last visual token"] = vocab.visual_offset + vocab.codebook_size - 1
        outside = {name: i for name, i in ids.items() if not 0 <= i < vocab_size}
        if outside:
            raise ZipjaxError(f"Emu3 token ids {outside} lie outside the language model's {vocab_size} tokens")


@dataclasses.dataclass(frozen=True, eq=False)
class Emu3Model(Model):
    vision: Emu3Vision | None = None
    vq_params: Params | None = None

    def __post_init__(self):
        if self.vision is None or self.vq_params is None:
            raise ZipjaxError("an Emu3Model needs its vision tokenizer (vision config and VQ-VAE parameters)")

    @property
    def vocab(self) -> Emu3Vocab:
        return self.vision.vocab

    @property
    def vq_config(self) -> VQConfig | PaletteConfig:
        return self.vision.vq_config

    def decode_codes(self, codes) -> jax.Array:
        """int codes [batch, h, w] -> float32 pixels [batch, h*f, w*f, 3] (the VQ-VAE's output range, about
        [-1, 1] normalised; `to_uint8` turns them into an image)."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or 0 in codes.shape or not np.issubdtype(codes.dtype, np.integer):
            raise ZipjaxError(f"codes must be a non-empty integer array [batch, height, width], got {codes.shape}")
        size = self.vq_config.codebook_size
        if codes.min() < 0 or codes.max() >= size:
            raise ZipjaxError(f"VQ codes must lie in [0, {size}); got values in [{codes.min()}, {codes.max()}]")
        pixels = decode_codes(self.vq_params, place(codes.astype(np.int32), self.mesh), config=self.vq_config)
        return pixels if pixels.is_fully_addressable else to_host(pixels)

    def encode_pixels(self, pixels) -> jax.Array:
        """Normalised float pixels [batch, H, W, 3] (H, W multiples of the VQ factor) -> int32 codes [batch, h, w]."""
        pixels = np.asarray(pixels)
        f = self.vq_config.spatial_factor
        if pixels.ndim != 4 or pixels.shape[-1] != self.vq_config.in_channels:
            raise ZipjaxError(f"pixels must be [batch, height, width, {self.vq_config.in_channels}], "
                              f"got {pixels.shape}")
        if pixels.shape[1] % f or pixels.shape[2] % f or 0 in pixels.shape:
            raise ZipjaxError(f"image size {pixels.shape[1]}x{pixels.shape[2]} is not a positive multiple of the "
                              f"VQ-VAE's factor {f}")
        codes = encode_pixels(self.vq_params, place(pixels.astype(np.float32), self.mesh), config=self.vq_config)
        return codes if codes.is_fully_addressable else to_host(codes)

    def encode_image(self, image) -> jax.Array:
        """uint8 image(s) [(batch,) H, W, 3] -> int32 codes [batch, H/f, W/f]."""
        return self.encode_pixels(self.normalize(image))

    def normalize(self, image) -> np.ndarray:
        """uint8 [(batch,) H, W, 3] -> float32 pixels as the VQ-VAE was trained on (rescale, then mean/std)."""
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ZipjaxError(f"images must be uint8 arrays [height, width, 3], got {image.dtype}")
        if image.ndim == 3:
            image = image[None]
        cfg = self.vq_config
        x = image.astype(np.float32) * np.float32(cfg.rescale_factor)
        return (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)

    def to_uint8(self, pixels) -> np.ndarray:
        """Decoded pixels -> uint8 images: undo mean/std and the rescale, clip, truncate (as transformers does)."""
        cfg = self.vq_config
        x = np.asarray(pixels, np.float32) * np.asarray(cfg.image_std, np.float32)
        x = (x + np.asarray(cfg.image_mean, np.float32)) * np.float32(1.0 / cfg.rescale_factor)
        return np.clip(x, 0, 255).astype(np.uint8)
