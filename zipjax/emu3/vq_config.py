"""Configuration of Emu3's vision tokenizer (a MoVQ-style VQ-VAE), one frozen, hashable dataclass.

The field names follow transformers' `Emu3VQVAEConfig`; BAAI's original `Emu3VisionVQConfig` names the same numbers
differently (`ch`, `ch_mult`, `z_channels`), which `convert.emu3` translates. The image (pre/post) processing numbers
travel with it because the VQ-VAE was trained on pixels normalised with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from zipjax.errors import ZipjaxError

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
        for name in ("codebook_size", "embed_dim", "latent_channels", "in_channels", "out_channels",
                     "temporal_downsample_factor", "base_channels", "num_res_blocks", "attn_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ZipjaxError(f"VQ-VAE config field {name} must be a positive integer, got {value!r}")
        if not self.channel_multiplier or any(m <= 0 for m in self.channel_multiplier):
            raise ZipjaxError(f"VQ-VAE channel_multiplier must be positive integers, got {self.channel_multiplier}")
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
                d[name] = tuple(d[name])
        try:
            return cls(**d)
        except TypeError as e:
            raise ZipjaxError(f"malformed VQ-VAE config: {e}") from e


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
        if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
            raise ZipjaxError(f"a palette needs at least 2 colours, got {self.codebook_size!r}")

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
                d[name] = tuple(d[name])
        return cls(**d)
