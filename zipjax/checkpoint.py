"""The zipjax checkpoint folder: an orbax checkpoint of the parameters, our config, and the tokenizer files.

    DIR/zipjax.json   {"format": "zipjax-checkpoint", "version": 1, "config": {...}, "source": ...}
    DIR/params/       orbax (OCDBT) checkpoint of the parameter tree
    DIR/vq_params/    Emu3 only: the vision tokenizer's parameters (its config and vocabulary are in zipjax.json)
    DIR/tokenizer.json, tokenizer_config.json, ... (copied from the source when it has them)

    DIR/checksums.json  size and SHA-256 of every other file, written last

Writes go through zipjax.destination: resolved paths, no destination inside a source, one writer per destination,
only a zipjax checkpoint (or an empty folder) is ever replaced, and the new folder takes the old one's place in one
atomic step, so an interrupted or killed write never leaves a folder that `load` accepts and never loses the old
one. `load` checks every file's size against checksums.json, and the hashes too for checkpoints up to
`HASH_AT_LOAD_BYTES`; `verify` (`zipjax verify DIR`) checks every hash. A record naming anything but a regular file
inside the folder (`../x`, an absolute path, a link) is a damaged record: nothing outside is ever opened.

Weights must be finite: `save` refuses NaN or infinite parameters (so does every converter, which saves through
it), and `load` checks them again after reading, with one jitted reduction over the parameter tree (a hostile
checkpoint can carry a consistent checksums.json).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec

from zipjax.config import ModelConfig
from zipjax.destination import (
    CHECKPOINT,
    CHECKPOINT_MANIFEST,
    Destination,
    check_free_space,
    interrupts_deferred,
    os_errors_of_writers,
    resolve,
)
from zipjax.emu3.model import Emu3Model, Emu3Vision
from zipjax.emu3.vqvae import abstract_vq_params
from zipjax.errors import ZipjaxError
from zipjax.model import Model
from zipjax.sharding import as_auto_mesh, check_mesh, one_writer, replicated_shardings, tree_shardings
from zipjax.transformer import Params, abstract_params, param_logical_axes
from zipjax.validate import integer, json_file, mapping
from zipjax.validate import manifest as read_manifest

FORMAT = "zipjax-checkpoint"
VERSION = 2  # 2: query / key / value weights heads-first [heads, embed, head_dim]; 1 stored [embed, heads, head_dim]
READABLE_VERSIONS = (1, 2)
MANIFEST = CHECKPOINT_MANIFEST
CHECKSUMS = "checksums.json"
HASH_AT_LOAD_BYTES = 256 << 20  # checkpoints up to this size are fully hashed at every load
PARAMS_DIR = "params"
VQ_PARAMS_DIR = "vq_params"
EMU3_KEY = "emu3"


def save(path: str | Path, config: ModelConfig, params: Params, *, files: Iterable[Path] = (),
         metadata: dict[str, Any] | None = None, overwrite: bool = False,
         vision: tuple[Emu3Vision, Params] | None = None, sources: Iterable[Path] = ()) -> Path:
    """Write a checkpoint. `files` (tokenizer files, ...) are copied in next to the parameters; `vision` (Emu3: the
    VQ-VAE's config, vocabulary and parameters) goes into `vq_params/` and the manifest; `sources` are the folders
    or files it was made from, which the destination must stay clear of."""
    _check_tree(abstract_params(config), params, f"parameters for {path}")
    check_finite(params, f"parameters for {path}")
    metadata = dict(metadata or {})
    if vision is not None:
        if config.architecture != "emu3":
            raise ZipjaxError(f"a vision tokenizer belongs to an emu3 checkpoint, not {config.architecture}")
        info, vq_params = vision
        _check_tree(abstract_vq_params(info.vq_config), vq_params, f"VQ-VAE parameters for {path}")
        check_finite(vq_params, f"VQ-VAE parameters for {path}")
        metadata[EMU3_KEY] = info.to_dict()
    elif config.architecture == "emu3":
        raise ZipjaxError("an emu3 checkpoint needs its vision tokenizer (VQ-VAE) parameters")
    files = [Path(f) for f in files]  # the caller vouches for them (zipjax.convert.files checks a source's links)
    write = functools.partial(_write, path, config, params, files=files, metadata=metadata, overwrite=overwrite,
                              vision=vision, sources=sources)
    return one_writer(write, lambda: resolve(path, "destination"), f"writing {path}")


def _write(path: Path | str, config: ModelConfig, params: Params, *, files: list[Path], metadata: dict[str, Any],
           overwrite: bool, vision: tuple[Emu3Vision, Params] | None, sources: Iterable[Path]) -> Path:
    """The folder, written by this process alone (orbax's barriers limited to it)."""
    destination = Destination(path, overwrite=overwrite, kind=CHECKPOINT, sources=sources)
    with destination as staging:
        arrays = [*jax.tree.leaves(params), *(jax.tree.leaves(vision[1]) if vision is not None else [])]
        need = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)
        check_free_space(staging.parent, need + sum(f.stat().st_size for f in files), f"the checkpoint {path}")
        only_this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                               active_processes={jax.process_index()})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=only_this_process)
        with interrupts_deferred(), os_errors_of_writers(path, staging):  # orbax's threads cannot be stopped midway
            try:
                checkpointer.save(staging / PARAMS_DIR, params)
                if vision is not None:
                    checkpointer.save(staging / VQ_PARAMS_DIR, vision[1])
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()  # its threads end here, also after a failed write, not at interpreter exit
        for file in files:
            shutil.copyfile(file, staging / file.name)
        manifest = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), **metadata}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        write_checksums(staging)
        return destination.commit()


def write_checksums(folder: Path, skip: Iterable[str] = ()) -> Path:
    """Record the size and SHA-256 of every file in `folder` (but the record itself and the names in `skip`) in
    checksums.json. Files added later (a README, say) are not part of the record and are ignored by `verify`."""
    skip = {CHECKSUMS, *skip}
    entries = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
               for f in sorted(folder.rglob("*")) if f.is_file() and str(f.relative_to(folder)) not in skip}
    record = folder / CHECKSUMS
    record.write_text(json.dumps({"algorithm": "sha256", "files": entries}, indent=1) + "\n")
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, *, hashes: bool = True) -> list[str]:
    """Problems found in a checkpoint folder against its checksums.json (empty: intact): every recorded file must be
    there with its size and, with `hashes`, its SHA-256. A checkpoint without a record is one problem."""
    path = Path(path)
    record = path / CHECKSUMS
    if not record.is_file():
        return [f"{path} has no {CHECKSUMS} (written by an older zipjax); nothing to verify against"]
    try:
        expected = read_checksums(path)
    except ZipjaxError as e:
        return [str(e)]
    present = {name for name in expected if _regular_file_inside(path, name)}
    problems = [f"missing file {name}" if not os.path.lexists(path / name) else
                f"{name} is a link or not a regular file inside the checkpoint (not read)"
                for name in sorted(set(expected) - present)]
    for name in sorted(present):
        size, digest = expected[name]
        actual = (path / name).stat().st_size
        if actual != size:
            problems.append(f"{name} has {actual} bytes, {size} recorded")
        elif hashes and _sha256(path / name) != digest:
            problems.append(f"{name} does not match its recorded SHA-256 (corrupted)")
    return problems


def read_checksums(path: Path) -> dict[str, tuple[int, str]]:
    """checksums.json of the checkpoint folder `path`: relative file name -> (size, SHA-256). Names must stay inside
    the folder (no `..`, no absolute path); sizes are non-negative integers and hashes 64 hex digits."""
    record = path / CHECKSUMS
    data = mapping(json_file(record, "checksum record"), str(record))
    entries = mapping(data.get("files"), f"{record} field files")
    expected = {}
    for name, entry in entries.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise ZipjaxError(f"{record} records a file outside the checkpoint: {name!r:.80}; the record is damaged")
        entry = mapping(entry, f"{record} entry {name!r:.80}")
        size = integer(entry.get("size"), f"{record} size of {name!r:.80}", lo=0)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            raise ZipjaxError(f"{record} has no valid SHA-256 for {name!r:.80}")
        expected[name] = (size, digest)
    return expected


def _regular_file_inside(folder: Path, name: str) -> bool:
    """`folder / name` is a regular file (not a link, pipe or device) whose resolved path lies inside `folder`."""
    file = folder / name
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode):
            return False
        return file.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and manifest of a checkpoint folder, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise ZipjaxError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ZipjaxError(f"{path} is not a checkpoint folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = (" It looks like a Hugging Face model; convert it first: zipjax convert SRC DST."
                if (path / "config.json").exists() else "")
        raise ZipjaxError(f"{path} is not a zipjax checkpoint (no {MANIFEST}).{hint}")
    manifest = read_manifest(manifest_path, FORMAT, READABLE_VERSIONS, "zipjax checkpoint")
    return ModelConfig.from_dict(manifest.get("config")), manifest


def load(path: str | Path, dtype: str | jnp.dtype | None = None, mesh: Mesh | None = None) -> Model:
    """Load a zipjax checkpoint. `dtype` casts the parameters (default: as stored); with `mesh` (axes "data" and
    "model") every parameter is read straight into its shards."""
    path = Path(path).absolute()
    config, manifest = read_config(path)
    _check_integrity(path)
    if dtype is not None:
        config = config.replace(dtype=_dtype_name(dtype))
    if mesh is not None:
        mesh = as_auto_mesh(mesh)
        check_mesh(mesh)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ZipjaxError(f"{path} has no {PARAMS_DIR}/ folder: the checkpoint is incomplete")

    abstract = abstract_params(config)
    shardings = None if mesh is None else tree_shardings(abstract, param_logical_axes(config), mesh)
    if manifest["version"] == 1:
        params = _restore_version_1(params_dir, config, abstract, mesh, f"checkpoint {path}")
    else:
        params = _restore(params_dir, abstract, shardings, f"checkpoint {path}")
    check_finite(params, f"checkpoint {path}")
    if config.architecture != "emu3":
        return Model(config=config, params=params, mesh=mesh, path=path)

    if EMU3_KEY not in manifest:
        raise ZipjaxError(f"{path} is an emu3 checkpoint without its vision tokenizer record in {MANIFEST}")
    vision = Emu3Vision.from_dict(manifest[EMU3_KEY])
    vision.check(config.vocab_size)
    if dtype is not None:
        vision = dataclasses.replace(vision, vq_config=vision.vq_config.replace(dtype=config.dtype))
    vq_dir = path / VQ_PARAMS_DIR
    if not vq_dir.is_dir():
        raise ZipjaxError(f"{path} has no {VQ_PARAMS_DIR}/ folder: the emu3 checkpoint is incomplete")
    abstract_vq = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, vision.vq_config.dtype),
                               abstract_vq_params(vision.vq_config))
    vq_params = _restore(vq_dir, abstract_vq, None if mesh is None else replicated_shardings(abstract_vq, mesh),
                         f"VQ-VAE of {path}")
    check_finite(vq_params, f"the VQ-VAE of checkpoint {path}")
    return Emu3Model(config=config, params=params, mesh=mesh, path=path, vision=vision, vq_params=vq_params)


def _map_qkv(tree: Params, fn) -> Params:
    """`tree` (parameters, their abstract values or their logical axes) with `fn` applied to every q, k and v."""
    out = dict(tree)
    for name, layer in tree.items():
        if name.startswith("layer_"):
            out[name] = {**layer, "attn": {k: fn(w) if k in ("q", "k", "v") else w for k, w in layer["attn"].items()}}
    return out


def _swap_leading(x):
    """[a, b, c] -> [b, a, c] for an array, an abstract value or a PartitionSpec (version 1 <-> 2 layouts)."""
    if isinstance(x, PartitionSpec):
        return PartitionSpec(x[1], x[0], *x[2:])
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((x.shape[1], x.shape[0], *x.shape[2:]), x.dtype)
    return jnp.swapaxes(x, 0, 1)


def _restore_version_1(directory: Path, config: ModelConfig, abstract: Params, mesh: Mesh | None,
                       what: str) -> Params:
    """A version-1 checkpoint ([embed, heads, head_dim] projections) read into its own layout, then turned
    heads-first on the devices (with a mesh, each shard is read where it belongs and moved locally)."""
    old = _map_qkv(abstract, _swap_leading)
    if mesh is None:  # the logical axes (another trace of the model) only place shards
        return jax.jit(lambda p: _map_qkv(p, _swap_leading))(_restore(directory, old, None, what))
    axes = param_logical_axes(config)
    restored = _restore(directory, old, tree_shardings(old, _map_qkv(axes, _swap_leading), mesh), what)
    return jax.jit(lambda p: _map_qkv(p, _swap_leading),
                   out_shardings=tree_shardings(abstract, axes, mesh))(restored)


def _dtype_name(dtype) -> str:
    try:
        return jnp.dtype(dtype).name
    except (TypeError, ValueError):
        raise ZipjaxError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r:.60}") from None


def _inexact(dtype: np.dtype) -> bool:
    """Floating or complex, bfloat16 and the other ml_dtypes floats (numpy kind "V") included."""
    return dtype.kind in "fc" or jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _all_finite(tree) -> list[jax.Array]:
    return [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]


def check_finite(tree, what: str) -> None:
    """Refuse a parameter tree holding NaN or infinity, naming the first such parameter: host (numpy) leaves are
    checked on the host, device arrays by one jitted reduction per leaf in one program. Other leaves are left to
    the shape checks."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    on_device = [(k, x) for k, x in leaves if isinstance(x, jax.Array)]
    on_host = [(k, np.asarray(x)) for k, x in leaves if isinstance(x, np.ndarray | np.generic)]
    bad = [k for k, x in on_host if _inexact(x.dtype) and not np.isfinite(x).all()]
    if on_device and not bad:
        flags = _all_finite([x for _, x in on_device])
        bad = [k for (k, _), ok in zip(on_device, flags, strict=True) if not bool(ok)]
    if bad:
        raise ZipjaxError(f"{what}: parameter {jax.tree_util.keystr(bad[0])} holds NaN or infinite values")


def _check_integrity(path: Path) -> None:
    """Sizes against checksums.json, and hashes for small checkpoints; a checkpoint without a record passes."""
    if not (path / CHECKSUMS).is_file():
        return
    try:
        total = sum(size for size, _ in read_checksums(path).values())
    except ZipjaxError as e:
        raise ZipjaxError(f"checkpoint {path} is damaged: {e}") from None
    problems = verify(path, hashes=total <= HASH_AT_LOAD_BYTES)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ZipjaxError(f"checkpoint {path} is damaged: {problems[0]}{more}; `zipjax verify {path}` lists all")


def _restore(directory: Path, abstract: Params, shardings: Params | None, what: str) -> Params:
    """Read an orbax parameter tree after checking its names and shapes against `abstract`."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(directory).item_metadata.tree
    except Exception as e:  # orbax raises many types for damaged folders; every one means unreadable input here
        raise ZipjaxError(f"cannot read the parameters in {directory} (damaged or truncated?): "
                          f"{type(e).__name__}: {_first_line(e)}") from None
    _check_tree(abstract, stored, what)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return checkpointer.restore(directory, target)
    except Exception as e:  # as above: orbax and tensorstore errors on damaged data
        raise ZipjaxError(f"cannot read the parameters in {directory} (damaged or truncated?): "
                          f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no details"


def _check_tree(abstract: Params, tree, what: str) -> None:
    """Parameter names and shapes must be exactly those the config implies (`abstract`)."""
    expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    actual = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise ZipjaxError(
            f"{what} do not match the config: missing {missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}"
        )
    for name, shape in expected.items():
        if actual[name] != shape:
            raise ZipjaxError(f"{what}: parameter {name} has shape {actual[name]}, the config implies {shape}")
