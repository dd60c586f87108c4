"""The palette vision tokenizer: one pixel per code, code k = colour codebook[k] (see `PaletteConfig`).

Pixels are in the normalised space the Emu3 pipeline uses (`Emu3Model.normalize`), so a palette model and a
MoVQ model go through the same encode / decode / to_uint8 calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zipjax.emu3.vq_config import PaletteConfig


def abstract_params(config: PaletteConfig) -> dict:
    return {"codebook": jax.ShapeDtypeStruct((config.codebook_size, config.in_channels), jnp.dtype(config.dtype))}


def decode(params: dict, codes: jax.Array) -> jax.Array:
    """int32 codes [batch, h, w] -> pixels [batch, h, w, channels]."""
    return jnp.take(params["codebook"], codes, axis=0)


def encode(params: dict, pixels: jax.Array) -> jax.Array:
    """pixels [batch, h, w, channels] -> int32 codes of the nearest palette colour."""
    codebook = params["codebook"].astype(jnp.float32)
    distances = jnp.sum(jnp.square(pixels.astype(jnp.float32)[..., None, :] - codebook), axis=-1)
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)
