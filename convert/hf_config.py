"""Hugging Face `config.json` (+ `generation_config.json`) -> zipjax `ModelConfig`.

Reads both config layouts that exist in the wild: transformers 4 (`rope_theta` and `rope_scaling` at the top level)
and transformers 5 (`rope_parameters` holding `rope_type`, `rope_theta` and the scaling fields). Anything the zipjax
model cannot reproduce exactly is refused with a message naming the field, rather than converted approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zipjax.config import DTYPES, ROPE_TYPES, ModelConfig, RopeConfig
from zipjax.errors import ZipjaxError
from zipjax.validate import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    boolean,
    integer,
    integers,
    mapping,
    number,
    optional,
)

MAX_JSON_BYTES = 16 << 20  # config files are kilobytes; anything this large is not one

# Hugging Face architecture class -> zipjax architecture.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    try:
        if path.stat().st_size > max_bytes:
            raise ZipjaxError(f"{what} {path} is {path.stat().st_size} bytes, more than a {what} can be")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZipjaxError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ZipjaxError(f"{what} {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ZipjaxError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ZipjaxError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def architectures_of(hf: dict[str, Any], where: Path) -> list[str]:
    """The `architectures` list of a config.json (one string is taken as a list of one)."""
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ZipjaxError(f"{where}: 'architectures' must be a list of class names, got {architectures!r:.80}")
    return architectures


def architecture_of(hf: dict[str, Any], where: Path) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = architectures_of(hf, where)
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if architectures:
        raise ZipjaxError(
            f"{where}: architecture {', '.join(map(str, architectures))} is not supported; zipjax converts {supported}"
        )
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ZipjaxError(
        f"{where}: model_type {model_type!r} (no 'architectures' field) is not supported; zipjax converts {supported}"
    )


def rope_from_hf(hf: dict[str, Any], where: Path | str) -> RopeConfig:
    """RoPE settings from either layout: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = hf.get("rope_parameters")
    if params is not None:
        params = dict(mapping(params, f"{where}: 'rope_parameters'"))
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise ZipjaxError(f"{where}: per-layer-type 'rope_parameters' are not supported")
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(mapping(hf.get("rope_scaling") or {}, f"{where}: 'rope_scaling'"))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ZipjaxError(
            f"{where}: RoPE scaling type {rope_type!r} is not supported; zipjax supports {', '.join(ROPE_TYPES)}"
        )
    if number(scaling.get("partial_rotary_factor", 1.0), f"{where}: partial_rotary_factor") != 1.0:
        raise ZipjaxError(f"{where}: partial_rotary_factor != 1 is not supported")
    fields: dict[str, Any] = {"theta": number(theta, f"{where}: rope_theta"), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in scaling:
            raise ZipjaxError(f"{where}: RoPE scaling {rope_type!r} needs a 'factor'")
        fields["factor"] = number(scaling["factor"], f"{where}: RoPE scaling factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise ZipjaxError(f"{where}: llama3 RoPE scaling needs {key!r}")
            fields[key] = number(scaling[key], f"{where}: RoPE {key}")
        fields["original_max_position_embeddings"] = integer(
            scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)),
            f"{where}: RoPE original_max_position_embeddings", lo=1, hi=MAX_POSITIONS)
    return RopeConfig(**fields)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    return () if value is None else integers(value, name, lo=0)


def config_from_hf(src: Path, dtype: str | None = None) -> ModelConfig:
    """Build the ModelConfig for a Hugging Face model folder (its config.json and generation_config.json)."""
    where = src / "config.json"
    hf = read_json(where, "config file")
    return text_config_from_dict(hf, where, architecture=architecture_of(hf, where),
                                 generation=generation_config(src), dtype=dtype)


def generation_config(src: Path) -> dict[str, Any]:
    path = src / "generation_config.json"
    return read_json(path, "generation config") if path.exists() else {}


def text_config_from_dict(hf: dict[str, Any], where: Path, *, architecture: str, generation: dict[str, Any],
                          dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a LLaMA-shaped decoder described by `hf` (a config.json, or the text part of one). Every
    value is type- and range-checked (zipjax.validate); errors name the file and the field."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ZipjaxError(f"{where}: hidden_act {hf['hidden_act']!r:.60} is not supported (only 'silu')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ZipjaxError(f"{where} is missing the field {key!r}")
    try:
        return _model_config(hf, architecture, generation, dtype)
    except ZipjaxError as e:
        raise ZipjaxError(f"{where}: {e}") from None


def _model_config(hf: dict[str, Any], architecture: str, generation: dict[str, Any], dtype: str | None
                  ) -> ModelConfig:
    for flag in ("attention_bias", "mlp_bias"):
        if optional(boolean, hf.get(flag), flag):
            raise ZipjaxError(f"{flag}=true is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and (not isinstance(layer_types, list) or len({str(t) for t in layer_types}) > 1):
        raise ZipjaxError("mixed attention layer_types are not supported")
    limits = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
              "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
              "head_dim": MAX_HEAD_DIM, "max_position_embeddings": MAX_POSITIONS}
    for key, limit in limits.items():  # in the file's own names, before anything derives from them
        optional(integer, hf.get(key), key, lo=1, hi=limit)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    eos = _token_ids(hf.get("eos_token_id"), "eos_token_id")  # checked even where generation_config overrides it
    if generation.get("eos_token_id") is not None:
        eos = _token_ids(generation["eos_token_id"], "generation_config eos_token_id")
    declared = hf.get("dtype") or hf.get("torch_dtype")  # a hint only: convert() keeps what the weights store
    window = hf.get("sliding_window") if architecture == "mistral" else None
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope_from_hf(hf, "rope settings"),
        sliding_window=window or None,
        tie_word_embeddings=boolean(hf.get("tie_word_embeddings", False), "tie_word_embeddings"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=generation.get("pad_token_id", hf.get("pad_token_id")),
        dtype=dtype or (declared if isinstance(declared, str) and declared in DTYPES else "float32"),
    )
