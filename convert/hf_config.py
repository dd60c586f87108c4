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

# Hugging Face architecture class -> zipjax architecture.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZipjaxError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZipjaxError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ZipjaxError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def architecture_of(hf: dict[str, Any], where: Path) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if architectures:
        raise ZipjaxError(
            f"{where}: architecture {', '.join(map(str, architectures))} is not supported; zipjax converts {supported}"
        )
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ZipjaxError(
        f"{where}: model_type {model_type!r} (no 'architectures' field) is not supported; zipjax converts {supported}"
    )


def rope_from_hf(hf: dict[str, Any], where: Path) -> RopeConfig:
    """RoPE settings from either layout: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ZipjaxError(f"{where}: 'rope_parameters' must be an object")
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise ZipjaxError(f"{where}: per-layer-type 'rope_parameters' are not supported")
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ZipjaxError(
            f"{where}: RoPE scaling type {rope_type!r} is not supported; zipjax supports {', '.join(ROPE_TYPES)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ZipjaxError(f"{where}: partial_rotary_factor != 1 is not supported")
    fields: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in scaling:
            raise ZipjaxError(f"{where}: RoPE scaling {rope_type!r} needs a 'factor'")
        fields["factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise ZipjaxError(f"{where}: llama3 RoPE scaling needs {key!r}")
            fields[key] = float(scaling[key])
        fields["original_max_position_embeddings"] = int(
            scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        )
    return RopeConfig(**fields)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


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
    """The ModelConfig of a LLaMA-shaped decoder described by `hf` (a config.json, or the text part of one)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ZipjaxError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ZipjaxError(f"{where}: {flag}=true is not supported")
    if hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
        raise ZipjaxError(f"{where}: mixed attention layer_types are not supported")

    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        fields = dict(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise ZipjaxError(f"{where} is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ZipjaxError(f"{where} has a field of the wrong type: {e}") from None

    gen = generation
    eos = _token_ids(gen.get("eos_token_id", hf.get("eos_token_id")))
    declared = hf.get("dtype") or hf.get("torch_dtype")  # a hint only: convert() keeps what the weights store
    stored_dtype = dtype or (declared if declared in DTYPES else "float32")
    return ModelConfig(
        **fields,
        rope=rope_from_hf(hf, where),
        sliding_window=int(hf["sliding_window"]) if architecture == "mistral" and hf.get("sliding_window") else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=gen.get("pad_token_id", hf.get("pad_token_id")),
        dtype=str(stored_dtype),
    )
