"""Emu3 vision tokenizer tensors (transformers' `Emu3VQVAE` or BAAI's `Emu3VisionVQModel`) -> zipjax parameters.

The two checkpoint families hold the same numbers under different module names: transformers groups the encoder
levels under `down_block.down.N`, keeps attention norms beside the attention (`attn_norms.N`, `attn_norm`) and
stores q/k/v/out as Linear [out, in]; BAAI nests levels as `down.N`, puts the norm inside the attention block and
stores q/k/v/proj_out as 1x1 convolutions [out, in, 1, 1]. `vq_tensor_plan` lists, for a given config and layout,
every source tensor with its zipjax parameter path and how to re-lay it out, so the converter can check names and
shapes before reading any data.

Layout changes: conv [out, in, (t,) h, w] -> [(t,) h, w, in, out]; linear / 1x1 conv -> [in, out]; BatchNorm
running statistics become parameters (`mean`, `var`); `num_batches_tracked` is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from zipjax.emu3.vq_config import VQConfig

HF, BAAI = "transformers", "baai"
# (source tensor name, zipjax path, kind) with kind one of "conv", "dense", "dense1x1", "copy"
Entry = tuple[str, tuple[str, ...], str]
IGNORED_SUFFIX = ".num_batches_tracked"


def _affine(src: str, dst: tuple[str, ...]) -> Iterator[Entry]:
    yield f"{src}.weight", (*dst, "scale"), "copy"
    yield f"{src}.bias", (*dst, "bias"), "copy"


def _layer(src: str, dst: tuple[str, ...], kind: str) -> Iterator[Entry]:
    yield f"{src}.weight", (*dst, "kernel"), kind
    yield f"{src}.bias", (*dst, "bias"), "copy"


def _norm(src: str, dst: tuple[str, ...], spatial: bool, nested: bool = True) -> Iterator[Entry]:
    """GroupNorm (encoder) or SpatialNorm (decoder); `nested` for the Norm wrapper's extra path level."""
    if not spatial:
        yield from _affine(src, (*dst, "group") if nested else dst)
        return
    base = (*dst, "spatial") if nested else dst
    yield from _affine(f"{src}.norm_layer", (*base, "norm"))
    yield from _layer(f"{src}.conv_y", (*base, "conv_y"), "dense1x1")
    yield from _layer(f"{src}.conv_b", (*base, "conv_b"), "dense1x1")


def _resnet(src: str, dst: tuple[str, ...], spatial: bool, shortcut: bool) -> Iterator[Entry]:
    for i in (1, 2):
        yield from _norm(f"{src}.norm{i}", (*dst, f"norm{i}"), spatial)
        yield from _layer(f"{src}.conv{i}", (*dst, f"conv{i}"), "conv")
    if shortcut:
        yield from _layer(f"{src}.nin_shortcut", (*dst, "shortcut"), "dense1x1")


def _attention(src: str, norm_src: str, dst: tuple[str, ...], spatial: bool, layout: str) -> Iterator[Entry]:
    yield from _norm(norm_src, (*dst, "norm"), spatial)
    names = ("q_proj", "k_proj", "v_proj", "out_proj") if layout == HF else ("q", "k", "v", "proj_out")
    for name, ours in zip(names, ("q", "k", "v", "o"), strict=True):
        yield from _layer(f"{src}.{name}", (*dst, ours), "dense" if layout == HF else "dense1x1")


def _temporal_res(src: str, dst: tuple[str, ...]) -> Iterator[Entry]:
    for i in (1, 2):
        yield from _affine(f"{src}.norm{i}", (*dst, f"norm{i}"))
        yield f"{src}.norm{i}.running_mean", (*dst, f"norm{i}", "mean"), "copy"
        yield f"{src}.norm{i}.running_var", (*dst, f"norm{i}", "var"), "copy"
        yield from _layer(f"{src}.conv{i}.conv", (*dst, f"conv{i}", "conv"), "conv")


def _middle(src: str, dst: tuple[str, ...], spatial: bool, layout: str) -> Iterator[Entry]:
    yield from _resnet(f"{src}.block_1", (*dst, "block_1"), spatial, False)
    attn_norm = f"{src}.attn_norm" if layout == HF else f"{src}.attn_1.norm"
    yield from _attention(f"{src}.attn_1", attn_norm, (*dst, "attn"), spatial, layout)
    yield from _resnet(f"{src}.block_2", (*dst, "block_2"), spatial, False)


def vq_tensor_plan(cfg: VQConfig, layout: str) -> list[Entry]:
    """Every tensor of a VQ-VAE checkpoint (names relative to the VQ-VAE module) in the given layout."""
    hf = layout == HF
    mid = "middle_block" if hf else "mid"
    out: list[Entry] = []
    add = out.extend

    # encoder spatial tower
    add(_layer("encoder.conv_in", ("encoder", "conv_in"), "conv"))
    channels = cfg.base_channels
    for level in range(cfg.num_levels):
        src = f"encoder.down_block.down.{level}" if hf else f"encoder.down.{level}"
        for i in range(cfg.num_res_blocks):
            width = cfg.level_channels(level)
            add(_resnet(f"{src}.block.{i}", ("encoder", f"down_{level}_block_{i}"), False, channels != width))
            channels = width
            if level in cfg.attn_resolutions:
                norm = f"{src}.attn_norms.{i}" if hf else f"{src}.attn.{i}.norm"
                add(_attention(f"{src}.attn.{i}", norm, ("encoder", f"down_{level}_attn_{i}"), False, layout))
        if level != cfg.num_levels - 1:
            add(_layer(f"{src}.downsample.conv", ("encoder", f"down_{level}_downsample"), "conv"))
    add(_middle(f"encoder.{mid}", ("encoder", "mid"), False, layout))
    add(_affine("encoder.norm_out", ("encoder", "norm_out")))
    add(_layer("encoder.conv_out", ("encoder", "conv_out"), "conv"))
    # encoder temporal tower
    for i in range(cfg.temporal_layers):
        add(_layer(f"encoder.time_conv.{i}.conv.conv", ("temporal_encoder", f"time_down_{i}", "conv"), "conv"))
    for i in range(cfg.num_res_blocks):
        add(_temporal_res(f"encoder.time_res_stack.{i}", ("temporal_encoder", f"time_res_{i}")))

    add(_layer("quant_conv.conv", ("quant_conv", "conv"), "conv"))
    out.append(("quantize.embedding.weight", ("codebook",), "copy"))
    add(_layer("post_quant_conv.conv", ("post_quant_conv", "conv"), "conv"))

    # decoder temporal tower
    for i in range(cfg.num_res_blocks):
        add(_temporal_res(f"decoder.time_res_stack.{i}", ("temporal_decoder", f"time_res_{i}")))
    for i in range(cfg.temporal_layers):
        add(_layer(f"decoder.time_conv.{i}.conv.conv", ("temporal_decoder", f"time_up_{i}", "conv"), "conv"))
    # decoder spatial tower
    add(_layer("decoder.conv_in", ("decoder", "conv_in"), "conv"))
    add(_middle(f"decoder.{mid}", ("decoder", "mid"), True, layout))
    channels = cfg.top_channels
    for level in reversed(range(cfg.num_levels)):
        src = f"decoder.up_block.up.{level}" if hf else f"decoder.up.{level}"
        for i in range(cfg.num_res_blocks + 1):
            width = cfg.level_channels(level)
            add(_resnet(f"{src}.block.{i}", ("decoder", f"up_{level}_block_{i}"), True, channels != width))
            channels = width
            if level in cfg.attn_resolutions:
                norm = f"{src}.attn_norms.{i}" if hf else f"{src}.attn.{i}.norm"
                add(_attention(f"{src}.attn.{i}", norm, ("decoder", f"up_{level}_attn_{i}"), True, layout))
        if level != 0:
            add(_layer(f"{src}.upsample.conv", ("decoder", f"up_{level}_upsample"), "conv"))
    add(_norm("decoder.norm_out", ("decoder", "norm_out"), True, nested=False))
    add(_layer("decoder.conv_out", ("decoder", "conv_out"), "conv"))
    return out


def source_shape(target: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The torch-layout shape whose re-layout (`kind`) has the zipjax shape `target`."""
    if kind == "conv":
        return (target[-1], target[-2], *target[:-2])
    if kind == "dense":
        return (target[1], target[0])
    if kind == "dense1x1":
        return (target[1], target[0], 1, 1)
    return tuple(target)


def to_target(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        array = array.transpose(*range(2, array.ndim), 1, 0)
    elif kind in ("dense", "dense1x1"):
        array = array.reshape(array.shape[0], array.shape[1]).T
    return np.ascontiguousarray(array)
