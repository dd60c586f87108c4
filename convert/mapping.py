"""Hugging Face LLaMA/Mistral tensor names and layouts -> the zipjax parameter tree.

Linear weights are stored by torch as [out, in]; zipjax keeps [in, out] with heads split out, so a linear is
transposed and reshaped: o_proj [embed, heads*head_dim] -> o [heads, head_dim, embed], gate_proj [mlp, embed] ->
gate [embed, mlp]. The query, key and value projections keep heads as their leading axis, q_proj [heads*head_dim,
embed] -> q [heads, embed, head_dim] (the layout the TPU's matmul reads without a copy; see zipjax.transformer).
No RoPE permutation is needed: both sides use rotate-half pairing.
Every tensor's shape is checked against the shape the config implies before any data is read, and the error names
the tensor. Values are never cast when the source dtype equals the target dtype, so bfloat16 stays bit-exact; a
tensor holding NaN or infinity is refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from zipjax.convert.hf_weights import SourceTensor

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.transformer import Params, abstract_params

# (Hugging Face name template, param path template, layout) where layout is the number of leading target axes that
# form the torch "in" side, HEADS for [heads, in, head_dim], or None (no transpose). "{}" stands for the layer index.
HEADS = "heads"
Layout = int | str | None
_TENSORS: tuple[tuple[str, tuple[str, ...], Layout], ...] = (
    ("model.embed_tokens.weight", ("embed",), None),
    ("model.layers.{}.input_layernorm.weight", ("layer_{}", "attn_norm", "scale"), None),
    ("model.layers.{}.self_attn.q_proj.weight", ("layer_{}", "attn", "q"), HEADS),
    ("model.layers.{}.self_attn.k_proj.weight", ("layer_{}", "attn", "k"), HEADS),
    ("model.layers.{}.self_attn.v_proj.weight", ("layer_{}", "attn", "v"), HEADS),
    ("model.layers.{}.self_attn.o_proj.weight", ("layer_{}", "attn", "o"), 2),
    ("model.layers.{}.post_attention_layernorm.weight", ("layer_{}", "mlp_norm", "scale"), None),
    ("model.layers.{}.mlp.gate_proj.weight", ("layer_{}", "mlp", "gate"), 1),
    ("model.layers.{}.mlp.up_proj.weight", ("layer_{}", "mlp", "up"), 1),
    ("model.layers.{}.mlp.down_proj.weight", ("layer_{}", "mlp", "down"), 1),
    ("model.norm.weight", ("final_norm", "scale"), None),
    ("lm_head.weight", ("lm_head",), 1),
)
_RULES = tuple((re.compile(re.escape(name).replace(r"\{\}", r"(\d+)")), path, in_axes)
               for name, path, in_axes in _TENSORS)
# Buffers some older checkpoints carry; they hold nothing the model needs.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _inexact(dtype: np.dtype) -> bool:
    """Floating or complex, bfloat16 and the other ml_dtypes floats (numpy kind "V") included."""
    return dtype.kind in "fc" or jnp.issubdtype(dtype, jnp.inexact)


def _match(name: str) -> tuple[tuple[str, ...], Layout] | None:
    for pattern, path, in_axes in _RULES:
        m = pattern.fullmatch(name)
        if m:
            return tuple(p.format(*m.groups()) for p in path), in_axes
    return None


def hf_tensor_names(config: ModelConfig) -> list[tuple[str, tuple[str, ...], Layout]]:
    """Every Hugging Face tensor of a model with this config: (name, param path, in_axes), in checkpoint order."""
    out = []
    for name, path, in_axes in _TENSORS:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layers = range(config.num_layers) if "{}" in name else [None]
        for i in layers:
            out.append((name.format(i), tuple(part.format(i) for part in path), in_axes))
    return out


def source_shape(target_shape: tuple[int, ...], in_axes: Layout) -> tuple[int, ...]:
    """The torch-layout shape that maps onto `target_shape`."""
    if in_axes is None:
        return tuple(target_shape)
    if in_axes == HEADS:
        heads, embed, head_dim = target_shape
        return (heads * head_dim, embed)
    return (math.prod(target_shape[in_axes:]), math.prod(target_shape[:in_axes]))


def _to_target(array: np.ndarray, target: jax.ShapeDtypeStruct, in_axes: Layout) -> np.ndarray:
    if in_axes == HEADS:
        heads, embed, head_dim = target.shape
        array = array.reshape(heads, head_dim, embed).transpose(0, 2, 1)
    elif in_axes is not None:
        array = array.T.reshape(target.shape)
    if array.dtype != target.dtype:
        array = array.astype(target.dtype)
    return np.ascontiguousarray(array)


def flatten_params(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def unflatten_params(flat: dict[tuple[str, ...], np.ndarray]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def tensors_to_params(config: ModelConfig, tensors: Iterable[SourceTensor], *, architecture_name: str,
                      progress: bool = True) -> Params:
    """Check every source tensor against the config, then load and convert them into a numpy parameter tree."""
    targets = flatten_params(abstract_params(config))
    plan: list[tuple[SourceTensor, tuple[str, ...], Layout]] = []
    unexpected: list[str] = []
    for tensor in tensors:
        matched = _match(tensor.name)
        if matched is None:
            if not _IGNORED.fullmatch(tensor.name):
                unexpected.append(tensor.name)
            continue
        path, in_axes = matched
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue  # some tied checkpoints store a copy of the embedding as lm_head
        if path not in targets:
            unexpected.append(tensor.name)
            continue
        expected = source_shape(targets[path].shape, in_axes)
        if tuple(tensor.shape) != expected:
            raise ZipjaxError(
                f"tensor {tensor.name} has shape {tuple(tensor.shape)} but the config implies {expected} "
                f"(hidden_size={config.hidden_size}, heads={config.num_heads}, kv_heads={config.num_kv_heads}, "
                f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}, "
                f"vocab_size={config.vocab_size})"
            )
        plan.append((tensor, path, in_axes))
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise ZipjaxError(
            f"{len(unexpected)} tensors do not belong to a {architecture_name} model: {shown}"
        )
    missing = sorted(".".join(p) for p in set(targets) - {path for _, path, _ in plan})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ZipjaxError(f"{len(missing)} parameters have no tensor in the checkpoint: {shown}")

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for tensor, path, in_axes in tqdm(plan, desc="converting tensors", unit="tensor", disable=not progress):
        array = tensor.load()
        if tuple(array.shape) != tuple(tensor.shape):
            raise ZipjaxError(f"tensor {tensor.name} read with shape {array.shape}, header says {tensor.shape}")
        if _inexact(array.dtype) and not np.isfinite(array).all():
            raise ZipjaxError(f"tensor {tensor.name} holds NaN or infinite values; zipjax converts finite weights only")
        flat[path] = _to_target(array, targets[path], in_axes)
    return unflatten_params(flat)
