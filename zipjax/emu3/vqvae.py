"""Emu3's vision tokenizer in flax.linen: a MoVQ-style VQ-VAE that maps images to a grid of codes and back.

    codes  = encode_pixels(params, pixels, config=cfg)   # [batch, H, W, 3] normalised -> int32 [batch, H/f, W/f]
    pixels = decode_codes(params, codes, config=cfg)     # int32 [batch, h, w] -> float32 [batch, h*f, w*f, 3]

Everything is channels-last (NHWC; clips NTHWC). The model is a video tokenizer: an image is a clip of
`temporal_downsample_factor` identical frames, squeezed to one latent frame by causal temporal convolutions on the
way in, and unfolded back into that many frames on the way out, of which an image is the first. Two shortcuts
follow from that and change nothing in the result: the encoder's spatial tower runs once per image (the frames are
identical) instead of once per frame, and the decoder's spatial tower runs on frame 0 only.

The decoder normalises with SpatialNorm (MoVQ): GroupNorm whose scale and shift are 1x1 convolutions of the
quantised latent, nearest-resized to each resolution. Temporal blocks use BatchNorm in inference form (running
statistics are parameters here). Parameter layouts: conv kernels [(t,) h, w, in, out], dense kernels [in, out].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from zipjax.emu3 import palette
from zipjax.emu3.vq_config import GROUPS, PaletteConfig, VQConfig

Params = dict


def _conv(features: int, kernel: tuple[int, ...], name: str, strides: tuple[int, ...] | None = None) -> nn.Conv:
    return nn.Conv(features, kernel, strides=strides, padding="VALID", name=name)


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
    """Zero-pad the two spatial axes (the two before channels) by `pad` on each side."""
    widths = [(0, 0)] * x.ndim
    widths[-3] = widths[-2] = (pad, pad)
    return jnp.pad(x, widths)


class GroupNorm(nn.Module):
    """GroupNorm over [..., H, W, C] per sample, statistics in float32 (torch's two-pass variance)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], GROUPS, channels // GROUPS)
        axes = (-4, -3, -1)  # H, W and the channels of one group
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (normed * scale + bias).astype(x.dtype)


class SpatialNorm(nn.Module):
    """MoVQ's conditional norm: GroupNorm(x) * conv_y(zq) + conv_b(zq), zq nearest-resized to x's resolution."""

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
        factor = x.shape[-3] // zq.shape[-3]
        zq = jnp.repeat(jnp.repeat(zq, factor, axis=-3), factor, axis=-2)  # [batch, H, W, embed]
        channels = x.shape[-1]
        normed = GroupNorm(name="norm")(x)
        return normed * nn.Dense(channels, name="conv_y")(zq) + nn.Dense(channels, name="conv_b")(zq)


class Norm(nn.Module):
    """GroupNorm in the encoder, SpatialNorm (conditioned on zq) in the decoder."""

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None) -> jax.Array:
        if zq is None:
            return GroupNorm(name="group")(x)
        return SpatialNorm(name="spatial")(x, zq)


class ResnetBlock(nn.Module):
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        h = nn.silu(Norm(name="norm1")(x, zq))
        h = _conv(self.out_channels, (3, 3), "conv1")(_pad_hw(h, 1))
        h = nn.silu(Norm(name="norm2")(h, zq))
        h = _conv(self.out_channels, (3, 3), "conv2")(_pad_hw(h, 1))
        if x.shape[-1] != self.out_channels:
            x = nn.Dense(self.out_channels, name="shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """x + attention(norm(x)) over the H*W positions of each image (non-causal, `heads` heads)."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        batch, height, width, channels = x.shape
        head_dim = channels // self.heads
        h = Norm(name="norm")(x, zq).reshape(batch, height * width, channels)

        def project(name: str) -> jax.Array:
            return nn.Dense(channels, name=name)(h).reshape(batch, height * width, self.heads, head_dim)

        q, k, v = project("q"), project("k"), project("v")  # [batch, hw, heads, head_dim]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, height * width, channels)
        return x + nn.Dense(channels, name="o")(out).reshape(x.shape)


class CausalConv3d(nn.Module):
    """Conv over [batch, T, H, W, C]: two frames of zero padding before the clip, none after; spatial 'same'."""

    features: int
    kernel: tuple[int, int, int]
    temporal_stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel[1] - 1
        x = jnp.pad(x, ((0, 0), (2, 0), (pad - pad // 2, pad // 2), (pad - pad // 2, pad // 2), (0, 0)))
        return _conv(self.features, self.kernel, "conv", (self.temporal_stride, 1, 1))(x)


class BatchNorm(nn.Module):
    """Inference-time BatchNorm: running statistics are stored as parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = self.param("mean", nn.initializers.zeros, (channels,))
        var = self.param("var", nn.initializers.ones, (channels,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class TemporalResnetBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = CausalConv3d(channels, (3, 3, 3), name="conv1")(nn.silu(BatchNorm(name="norm1")(x)))
        h = CausalConv3d(channels, (3, 3, 3), name="conv2")(nn.silu(BatchNorm(name="norm2")(h)))
        return x + h


class MiddleBlock(nn.Module):
    config: VQConfig

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        x = ResnetBlock(channels, name="block_1")(x, zq)
        x = AttentionBlock(self.config.attn_heads, name="attn")(x, zq)
        return ResnetBlock(channels, name="block_2")(x, zq)


class Encoder(nn.Module):
    """Frames [n, H, W, in] -> latent frames [n, H/f, W/f, latent] (the spatial tower)."""

    config: VQConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _conv(cfg.base_channels, (3, 3), "conv_in")(_pad_hw(x, 1))
        for level in range(cfg.num_levels):
            for i in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg.level_channels(level), name=f"down_{level}_block_{i}")(h)
                if level in cfg.attn_resolutions:
                    h = AttentionBlock(cfg.attn_heads, name=f"down_{level}_attn_{i}")(h)
            if level != cfg.num_levels - 1:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))  # torch pads right/bottom only, then stride 2
                h = _conv(h.shape[-1], (3, 3), f"down_{level}_downsample", (2, 2))(h)
        h = MiddleBlock(cfg, name="mid")(h)
        h = nn.silu(GroupNorm(name="norm_out")(h))
        out = cfg.latent_channels * (2 if cfg.double_latent else 1)
        return _conv(out, (3, 3), "conv_out")(_pad_hw(h, 1))


class TemporalEncoder(nn.Module):
    """Latent clip [batch, T, h, w, c] -> [batch, T / temporal_downsample_factor, h, w, c]."""

    config: VQConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = z.shape[-1]
        for i in range(self.config.temporal_layers):
            z = nn.silu(CausalConv3d(channels, (4, 3, 3), temporal_stride=2, name=f"time_down_{i}")(z))
        for i in range(self.config.num_res_blocks):
            z = TemporalResnetBlock(name=f"time_res_{i}")(z)
        return z


class TemporalDecoder(nn.Module):
    """[batch, T, h, w, c] -> [batch, T * temporal_downsample_factor, h, w, c]."""

    config: VQConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = z.shape[-1]
        for i in range(self.config.num_res_blocks):
            z = TemporalResnetBlock(name=f"time_res_{i}")(z)
        for i in range(self.config.temporal_layers):
            z = jnp.repeat(z, 2, axis=1)
            z = nn.silu(CausalConv3d(channels, (3, 3, 3), name=f"time_up_{i}")(z))
        return z


class Decoder(nn.Module):
    """Latent frame [n, h, w, latent] conditioned on zq [n, h, w, embed] -> pixels [n, h*f, w*f, out]."""

    config: VQConfig

    @nn.compact
    def __call__(self, z: jax.Array, zq: jax.Array) -> jax.Array:
        cfg = self.config
        h = _conv(cfg.top_channels, (3, 3), "conv_in")(_pad_hw(z, 1))
        h = MiddleBlock(cfg, name="mid")(h, zq)
        for level in reversed(range(cfg.num_levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg.level_channels(level), name=f"up_{level}_block_{i}")(h, zq)
                if level in cfg.attn_resolutions:
                    h = AttentionBlock(cfg.attn_heads, name=f"up_{level}_attn_{i}")(h, zq)
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(h.shape[-1], (3, 3), f"up_{level}_upsample")(_pad_hw(h, 1))
        h = nn.silu(SpatialNorm(name="norm_out")(h, zq))
        return _conv(cfg.out_channels, (3, 3), "conv_out")(_pad_hw(h, 1))


class VQVAE(nn.Module):
    """The whole tokenizer; `encode` and `decode` are its two entry points (`__call__` runs both, for init)."""

    config: VQConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.temporal_encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(cfg.embed_dim, (3, 1, 1))
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (cfg.codebook_size, cfg.embed_dim))
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, (3, 1, 1))
        self.temporal_decoder = TemporalDecoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, pixels: jax.Array) -> jax.Array:
        """pixels [batch, H, W, in] (normalised) -> int32 codes [batch, H/f, W/f]."""
        z = self.encoder(pixels)  # [batch, h, w, latent]: the same for every one of the identical frames
        clip = jnp.broadcast_to(z[:, None], (z.shape[0], self.config.temporal_downsample_factor, *z.shape[1:]))
        latent = self.quant_conv(self.temporal_encoder(clip))[:, 0]  # [batch, h, w, embed]
        codebook = self.codebook.astype(jnp.float32)
        flat = latent.astype(jnp.float32)
        distances = (jnp.sum(flat**2, axis=-1, keepdims=True) + jnp.sum(codebook**2, axis=-1)
                     - 2 * jnp.einsum("bhwc,nc->bhwn", flat, codebook))  # [batch, h, w, codebook]
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """int32 codes [batch, h, w] -> pixels [batch, h*f, w*f, out] (the first frame of the decoded clip)."""
        batch = codes.shape[0]
        quant = jnp.take(self.codebook, codes, axis=0)[:, None]  # [batch, 1, h, w, embed]
        post = self.post_quant_conv(quant)  # [batch, 1, h, w, latent]
        frames = self.temporal_decoder(jnp.concatenate([post, quant], axis=0))  # [2 * batch, T, h, w, c]
        z, zq = frames[:batch, 0], frames[batch:, 0]
        return self.decoder(z, zq)

    def __call__(self, pixels: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode(pixels), self.decode(codes)


def _dummy_inputs(config: VQConfig) -> tuple[jax.Array, jax.Array]:
    f = config.spatial_factor
    return jnp.zeros((1, f, f, config.in_channels), jnp.float32), jnp.zeros((1, 1, 1), jnp.int32)


def init_vq_params(config: VQConfig, rng: jax.Array) -> Params:
    return VQVAE(config).init(rng, *_dummy_inputs(config))["params"]


def abstract_vq_params(config: VQConfig | PaletteConfig) -> Params:
    """ShapeDtypeStructs of every parameter of the vision tokenizer, at zero cost."""
    if isinstance(config, PaletteConfig):
        return palette.abstract_params(config)
    return jax.eval_shape(lambda: init_vq_params(config, jax.random.key(0)))


@functools.partial(jax.jit, static_argnames=("config",))
def encode_pixels(params: Params, pixels: jax.Array, *, config: VQConfig | PaletteConfig) -> jax.Array:
    if isinstance(config, PaletteConfig):
        return palette.encode(params, pixels)
    return VQVAE(config).apply({"params": params}, pixels, method=VQVAE.encode)


@functools.partial(jax.jit, static_argnames=("config",))
def decode_codes(params: Params, codes: jax.Array, *, config: VQConfig | PaletteConfig) -> jax.Array:
    if isinstance(config, PaletteConfig):
        return palette.decode(params, codes).astype(jnp.float32)
    return VQVAE(config).apply({"params": params}, codes, method=VQVAE.decode).astype(jnp.float32)
