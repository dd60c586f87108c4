"""Enumerate and read the tensors of a Hugging Face model folder, lazily.

Supported layouts: `model.safetensors`; shards listed by `model.safetensors.index.json`; `pytorch_model.bin`; shards
listed by `pytorch_model.bin.index.json` (read with `torch.load(weights_only=True)`). Names and shapes are known
before any tensor data is read, so a wrong architecture or shape fails before the expensive part. bfloat16 tensors
come back as `ml_dtypes.bfloat16` arrays with their bits unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from zipjax.convert.files import source_file
from zipjax.convert.hf_config import read_json

from zipjax.errors import ZipjaxError

_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """A named tensor of a source checkpoint, in Hugging Face naming and layout, read on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name as stored ("bfloat16", "float16", "float32", ...)
    load: Callable[[], np.ndarray]


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def stored_dtype(tensors: list[SourceTensor]) -> str | None:
    """The dtype holding most of the parameters: what the checkpoint really stores, whatever config.json says."""
    sizes: dict[str, int] = {}
    for t in tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + math.prod(t.shape)
    return max(sizes, key=sizes.get) if sizes else None


def weight_files(src: Path) -> list[Path]:
    """The weight files of a model folder, in a stable order; every file an index names must exist."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.exists():
            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ZipjaxError(f"{index} has no 'weight_map'")
            if not all(isinstance(f, str) for f in weight_map.values()):
                raise ZipjaxError(f"{index}: every entry of 'weight_map' must name a file")
            files = sorted(set(weight_map.values()))
            paths = [source_file(src, f, "weight file") for f in files]
            missing = [f for f, path in zip(files, paths, strict=True) if not path.is_file()]
            if missing:
                raise ZipjaxError(f"{index} lists weight files that are missing from {src}: {', '.join(missing)}")
            return paths
        if (src / single).is_file():
            return [source_file(src, single, "weight file")]
    raise ZipjaxError(f"no weights found in {src}: expected one of {', '.join(_LAYOUTS)}")


def source_tensors(src: Path) -> list[SourceTensor]:
    """Every tensor of the folder's weight files (names and shapes read, data not yet)."""
    tensors: list[SourceTensor] = []
    for path in weight_files(src):
        reader = _safetensors_tensors if path.suffix == ".safetensors" else _torch_tensors
        tensors.extend(reader(path))
    names = [t.name for t in tensors]
    if len(names) != len(set(names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ZipjaxError(f"tensors stored more than once across {src}'s weight files: {', '.join(dup[:5])}")
    return tensors


def _safetensors_tensors(path: Path) -> Iterator[SourceTensor]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            headers = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
            shapes = {name: (tuple(h.get_shape()), _SAFETENSORS_DTYPES.get(h.get_dtype(), h.get_dtype().lower()))
                      for name, h in headers.items()}
    except (SafetensorError, OSError) as e:
        raise ZipjaxError(f"weight file {path} is truncated or corrupt: {e}") from None

    def loader(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    return f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ZipjaxError(f"could not read tensor {name} from {path}: {e}") from None
        return load

    for name, (shape, dtype) in shapes.items():
        yield SourceTensor(name, shape, dtype, loader(name))


def _torch_tensors(path: Path) -> Iterator[SourceTensor]:
    try:
        import torch
    except ImportError:
        raise ZipjaxError(
            f"reading {path.name} needs PyTorch; install it with: pip install torch==2.13.0"
        ) from None
    try:
        state = _torch_load(torch, path)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which would run the file's code
        raise ZipjaxError(f"weight file {path} holds Python objects beyond tensors; zipjax reads .bin files only "
                          "with torch's safe loader and never runs pickled code (use a safetensors copy)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ZipjaxError(f"weight file {path} is truncated or corrupt: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ZipjaxError(f"weight file {path} does not hold a state dict")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            dtype = str(tensor.dtype).removeprefix("torch.")
            yield SourceTensor(name, tuple(tensor.shape), dtype, lambda t=tensor: torch_to_numpy(t))


def _torch_load(torch, path: Path):
    """torch's safe loader (tensors and plain containers only, never arbitrary pickled objects); memory-mapped for
    the zip format of torch >= 1.6, read whole for the legacy format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy; bfloat16 is reinterpreted bit for bit (numpy has no native bfloat16)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
