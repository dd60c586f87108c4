"""Import Hugging Face and GGUF checkpoints into zipjax checkpoints (`zipjax convert SRC DST`).

SRC is a Hugging Face model folder (config.json + safetensors or pytorch_model*.bin weights) or a GGUF file (or a
folder holding exactly one). DST becomes an orbax checkpoint plus our config and the tokenizer files, written
atomically (see zipjax.checkpoint).
"""

from __future__ import annotations

import functools
from pathlib import Path

from zipjax.convert.emu3 import convert_emu3, emu3_layout
from zipjax.convert.files import TOKENIZER_FILES, existing_files
from zipjax.convert.gguf import convert_gguf
from zipjax.convert.hf_config import config_from_hf, read_json
from zipjax.convert.hf_weights import source_tensors, stored_dtype
from zipjax.convert.mapping import tensors_to_params

from zipjax import checkpoint
from zipjax.config import DTYPES
from zipjax.destination import CHECKPOINT, Destination, resolve
from zipjax.errors import ZipjaxError
from zipjax.sharding import one_writer

__all__ = ["convert"]


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None, overwrite: bool = False,
            progress: bool = True, vision_tokenizer: str | Path | None = None) -> Path:
    """Convert SRC into a zipjax checkpoint at DST; returns DST. `dtype` casts (default: keep the source dtype).
    `vision_tokenizer` is the separate VQ-VAE folder that BAAI's original Emu3 language models need. In a
    multi-host run (jax.distributed) process 0 converts and writes; the others wait for it."""
    src, dst = resolve(src, "source"), resolve(dst, "destination")
    job = functools.partial(_convert, src, dst, dtype=dtype, overwrite=overwrite, progress=progress,
                            vision_tokenizer=vision_tokenizer)
    return one_writer(job, lambda: dst, f"converting {src}")


def _convert(src: Path, dst: Path, *, dtype: str | None, overwrite: bool, progress: bool,
             vision_tokenizer: str | Path | None) -> Path:
    if dtype is not None and dtype not in DTYPES:
        raise ZipjaxError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not src.exists():
        raise ZipjaxError(f"source not found: {src}")
    sources = [src] if vision_tokenizer is None else [src, resolve(vision_tokenizer, "vision tokenizer")]
    Destination(dst, overwrite=overwrite, kind=CHECKPOINT, sources=sources).preflight()  # fail before the work
    out = dict(dst=dst, dtype=dtype, overwrite=overwrite, progress=progress, sources=sources)

    gguf_file = _gguf_file(src)
    if gguf_file is not None:
        return convert_gguf(gguf_file, **out)
    if not src.is_dir():
        raise ZipjaxError(f"{src} is neither a Hugging Face model folder nor a .gguf file")
    if not (src / "config.json").is_file():
        raise ZipjaxError(f"{src} has no config.json: it is not a Hugging Face model folder")

    hf = read_json(src / "config.json", "config file")
    if emu3_layout(hf) is not None:
        return convert_emu3(src, hf, vision_tokenizer=sources[1] if vision_tokenizer else None, **out)
    if vision_tokenizer is not None:
        raise ZipjaxError(f"--vision-tokenizer applies to Emu3 models only; {src} is not one")
    config = config_from_hf(src, dtype=dtype)
    tensors = source_tensors(src)
    if dtype is None:  # keep what the weights are stored in, even where config.json says otherwise
        config = config.replace(dtype=_supported(stored_dtype(tensors) or config.dtype))
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[config.architecture]
    params = tensors_to_params(config, tensors, architecture_name=arch, progress=progress)
    files = existing_files(src, (*TOKENIZER_FILES, "generation_config.json"))
    if progress:
        print(f"writing {dst}", flush=True)
    return checkpoint.save(dst, config, params, files=files, overwrite=overwrite, sources=sources,
                           metadata={"source": {"kind": "huggingface", "path": str(src)}})


def _supported(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ZipjaxError(f"the weights are stored as {dtype}; zipjax supports {', '.join(DTYPES)} (pass --dtype)")
    return dtype


def _gguf_file(src: Path) -> Path | None:
    if src.is_file():
        return src if src.suffix == ".gguf" else None
    if src.is_dir() and not (src / "config.json").exists():
        found = sorted(src.glob("*.gguf"))
        if len(found) > 1:
            raise ZipjaxError(f"{src} holds several .gguf files; name the one to convert")
        return found[0] if found else None
    return None
