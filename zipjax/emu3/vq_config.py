"""Configuration of Emu3's vision tokenizer (a MoVQ-style VQ-VAE), one frozen, hashable dataclass.

The field names follow transformers' `Emu3VQVAEConfig`; BAAI's original `Emu3VisionVQConfig` names the same numbers
differently (`ch`, `ch_mult`, `z_channels`), which `convert.emu3` translates. The image (pre/post) processing numbers
travel with it because the VQ-VAE was trained on pixels normalised with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from zipjax.config import DTYPES
from zipjax.errors import ZipjaxError
from zipjax.validate import boolean, integer, number, string

GROUPS = 32  # GroupNorm groups everywhere in the VQ-VAE

# transformers' Emu3ImageProcessor defaults (OpenAI CLIP statistics), used when a checkpoint has no
# preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 32768
    embed_dim: int = 4
    latent_channels: int = 4
    double_latent: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    base_channels: int = 256
    channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (3,)
    attn_heads: int = 1
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    dtype: str = "float32"

    def __post_init__(self):
        limits = {"codebook_size": 1 << 20, "embed_dim": 4096, "latent_channels": 4096, "in_channels": 16,
                  "out_channels": 16, "temporal_downsample_factor": 64, "base_channels": 8192, "num_res_blocks": 64,
                  "attn_heads": 1024}
        for name, limit in limits.items():
            integer(getattr(self, name), f"VQ-VAE config field {name}", lo=1, hi=limit)
        boolean(self.double_latent, "VQ-VAE config field double_latent")
        _check_tuple(self.channel_multiplier, "VQ-VAE channel_multiplier", integer, lo=1, hi=64, max_items=8,
                     min_items=1)
        _check_tuple(self.attn_resolutions, "VQ-VAE attn_resolutions", integer, lo=0, hi=7, max_items=8)
        _check_processing(self)
        t = self.temporal_downsample_factor
        if t & (t - 1):
            raise ZipjaxError(f"VQ-VAE temporal_downsample_factor must be a power of two, got {t}")
        for m in (1, *self.channel_multiplier):
            if (self.base_channels * m) % GROUPS:
                raise ZipjaxError(
                    f"VQ-VAE channels base_channels*multiplier = {self.base_channels * m} must be a multiple of "
                    f"{GROUPS} (GroupNorm groups)"
                )
        if self.embed_dim != self.latent_channels:
            raise ZipjaxError(
                f"the VQ-VAE decoder runs its temporal layers on the latent and the quantised codes together, so "
                f"embed_dim ({self.embed_dim}) must equal latent_channels ({self.latent_channels})"
            )
        if self.top_channels % self.attn_heads:
            raise ZipjaxError(f"attention width {self.top_channels} is not divisible by {self.attn_heads} heads")
        if any(not 0 <= r < len(self.channel_multiplier) for r in self.attn_resolutions):
            raise ZipjaxError(
                f"attn_resolutions {self.attn_resolutions} name levels outside 0..{len(self.channel_multiplier) - 1}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.channel_multiplier)

    @property
    def spatial_factor(self) -> int:
        """Pixels per code along each side (8 for Emu3: 720 px -> 90 codes)."""
        return 2 ** (self.num_levels - 1)

    @property
    def temporal_layers(self) -> int:
        return int(math.log2(self.temporal_downsample_factor))

    @property
    def top_channels(self) -> int:
        """Width of the lowest-resolution level, where the middle block (and its attention) runs."""
        return self.base_channels * self.channel_multiplier[-1]

    def level_channels(self, level: int) -> int:
        return self.base_channels * self.channel_multiplier[level]

    def replace(self, **changes: Any) -> VQConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("channel_multiplier", "attn_resolutions", "image_mean", "image_std"):
            d[name] = list(d[name])
        return {"kind": "movq", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig | PaletteConfig:
        if not isinstance(d, dict):
            raise ZipjaxError(f"a VQ-VAE config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("kind", "movq")
        if kind == "palette":
            return PaletteConfig.from_dict(d)
        if kind != "movq":
            raise ZipjaxError(f"unknown vision tokenizer kind {kind!r}; zipjax knows 'movq' and 'palette'")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ZipjaxError(f"unknown VQ-VAE config keys: {', '.join(unknown)}")
        d = dict(d)
        for name in ("channel_multiplier", "attn_resolutions", "image_mean", "image_std"):
            if name in d:
                d[name] = _as_tuple(d[name], f"VQ-VAE config field {name}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class PaletteConfig:
    """A one-pixel-per-code vision tokenizer: code k is the colour `codebook[k]` (an RGB palette).

    It plays the VQ-VAE's role for small models trained here (the digits model of the ZipAR quality harness),
    through the same interface: `spatial_factor` 1, encode = nearest palette colour, decode = palette lookup.
    """

    codebook_size: int = 16
    in_channels: int = 3
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    min_pixels: int = 1
    max_pixels: int = 256 * 256
    dtype: str = "float32"

    spatial_factor = 1

    def __post_init__(self):
        integer(self.codebook_size, "palette codebook_size (colours)", lo=2, hi=1 << 16)
        integer(self.in_channels, "palette in_channels", lo=1, hi=16)
        _check_processing(self)

    def replace(self, **changes: Any) -> PaletteConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return {"kind": "palette", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaletteConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ZipjaxError(f"unknown palette config keys: {', '.join(unknown)}")
        d = dict(d)
        for name in ("image_mean", "image_std"):
            if name in d:
                d[name] = _as_tuple(d[name], f"palette config field {name}")
        return cls(**d)


def _as_tuple(value: Any, name: str) -> tuple:
    if not isinstance(value, list | tuple):
        raise ZipjaxError(f"{name} has the wrong type: it must be a list, got {value!r:.60}")
    return tuple(value)


def _check_tuple(value: Any, name: str, read, *, max_items: int, min_items: int = 0, **bounds) -> None:
    if not isinstance(value, tuple) or not min_items <= len(value) <= max_items:
        raise ZipjaxError(f"{name} must be a list of {min_items} to {max_items} entries, got {value!r:.60}")
    for i, item in enumerate(value):
        read(item, f"{name}[{i}]", **bounds)


def _check_processing(cfg: VQConfig | PaletteConfig) -> None:
    """The pixel normalisation and image-size fields both vision tokenizers carry."""
    _check_tuple(cfg.image_mean, "image_mean", number, min_items=3, max_items=3, lo=-1e3, hi=1e3)
    _check_tuple(cfg.image_std, "image_std", number, min_items=3, max_items=3, lo=0, hi=1e3, lo_open=True)
    number(cfg.rescale_factor, "rescale_factor", lo=0, hi=1, lo_open=True)
    integer(cfg.min_pixels, "min_pixels", lo=1, hi=1 << 30)
    integer(cfg.max_pixels, "max_pixels", lo=cfg.min_pixels, hi=1 << 30)
    string(cfg.dtype, "vision tokenizer dtype", DTYPES)
