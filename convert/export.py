"""zipjax checkpoint -> Hugging Face model folder (`zipjax export SRC DST`): the inverse of `convert`.

Lets a model trained or transformed in zipjax (the shipped stdlib-llama, say) be loaded by transformers, which is
how its parity is tested and how the benchmarks give transformers the very same weights. The tensor layout is the
inverse of convert.mapping; values are written in the checkpoint's dtype without casting (bfloat16 stays bit-exact).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm
from zipjax.convert.files import TOKENIZER_FILES, existing_files
from zipjax.convert.mapping import HEADS, hf_tensor_names

from zipjax.checkpoint import load
from zipjax.config import ModelConfig
from zipjax.destination import (
    EXPORT,
    EXPORT_MARKER,
    Destination,
    check_free_space,
    os_errors_of_writers,
    resolve,
)
from zipjax.errors import ZipjaxError
from zipjax.transformer import Params

_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral")}


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json contents (transformers-4 layout, which transformers 4 and 5 both read)."""
    if config.architecture not in _ARCHITECTURES:
        raise ZipjaxError(
            f"exporting {config.architecture} checkpoints is not supported; zipjax exports {', '.join(_ARCHITECTURES)}"
        )
    architecture, model_type = _ARCHITECTURES[config.architecture]
    rope = config.rope
    scaling: dict[str, Any] | None = None
    if rope.type == "linear":
        scaling = {"rope_type": "linear", "factor": rope.factor}
    elif rope.type == "llama3":
        scaling = {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                   "high_freq_factor": rope.high_freq_factor,
                   "original_max_position_embeddings": rope.original_max_position_embeddings}
    eos = list(config.eos_token_ids)
    hf = {
        "architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": rope.theta, "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id, "torch_dtype": config.dtype,
    }
    if config.architecture == "mistral":
        hf["sliding_window"] = config.sliding_window
    return hf


def hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> numpy array in torch's [out, in] layout."""
    state = {}
    for name, path, in_axes in hf_tensor_names(config):
        value = params
        for key in path:
            value = value[key]
        array = np.asarray(value)
        if in_axes == HEADS:  # [heads, embed, head_dim] -> [heads * head_dim, embed]
            array = array.transpose(0, 2, 1).reshape(-1, array.shape[1])
        elif in_axes is not None:
            array = array.reshape(int(np.prod(array.shape[:in_axes])), -1).T
        state[name] = np.ascontiguousarray(array)
    return state


def export_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the zipjax checkpoint SRC as a Hugging Face folder DST (config.json, model.safetensors, tokenizer, and
    `zipjax-export.json`, which marks the folder as one zipjax may replace with --overwrite)."""
    src = resolve(src, "source")
    destination = Destination(dst, overwrite=overwrite, kind=EXPORT, sources=[src])
    destination.preflight()
    model = load(src)
    config_json = hf_config_dict(model.config)
    files = existing_files(src, (*TOKENIZER_FILES, "generation_config.json"))
    with destination as staging:
        state = {}
        for name, array in tqdm(hf_state_dict(model.config, model.params).items(), desc="exporting tensors",
                                unit="tensor", disable=not progress):
            state[name] = array
        check_free_space(staging.parent, sum(a.nbytes for a in state.values()), f"the export {dst}")
        with os_errors_of_writers(dst):
            save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        for file in files:
            shutil.copyfile(file, staging / file.name)
        marker = {"format": "zipjax-export", "source": str(src),
                  "files": sorted(f.name for f in staging.iterdir())}  # what --overwrite may replace
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return destination.commit()
