"""The zipjax checkpoint folder: an orbax checkpoint of the parameters, our config, and the tokenizer files.

    DIR/zipjax.json   {"format": "zipjax-checkpoint", "version": 1, "config": {...}, "source": ...}
    DIR/params/       orbax (OCDBT) checkpoint of the parameter tree
    DIR/tokenizer.json, tokenizer_config.json, ... (copied from the source when it has them)

Writes are atomic: everything is written into a hidden sibling folder that is renamed onto DIR only when complete,
so an interrupted write never leaves a folder that `load` accepts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.model import Model
from zipjax.sharding import as_auto_mesh, tree_shardings
from zipjax.transformer import Params, abstract_params, param_logical_axes

FORMAT = "zipjax-checkpoint"
VERSION = 1
MANIFEST = "zipjax.json"
PARAMS_DIR = "params"


def save(path: str | Path, config: ModelConfig, params: Params, *, files: Iterable[Path] = (),
         metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint atomically. `files` (tokenizer files, ...) are copied in next to the parameters."""
    path = Path(path).absolute()
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ZipjaxError(f"{path} already exists; choose another destination or overwrite it explicitly")
    _check_tree(config, params, f"parameters for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary folder
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        for file in files:
            shutil.copy2(file, staging / Path(file).name)
        manifest = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), **(metadata or {})}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZipjaxError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZipjaxError(f"{manifest_path} is not a zipjax checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise ZipjaxError(
            f"{path} has checkpoint format version {manifest.get('version')}; this zipjax reads version {VERSION}"
        )
    return ModelConfig.from_dict(manifest.get("config")), manifest


def load(path: str | Path, dtype: str | jnp.dtype | None = None, mesh: Mesh | None = None) -> Model:
    """Load a zipjax checkpoint. `dtype` casts the parameters (default: as stored); with `mesh` (axes "data" and
    "model") every parameter is read straight into its shards."""
    path = Path(path).absolute()
    config, _ = read_config(path)
    if dtype is not None:
        config = config.replace(dtype=jnp.dtype(dtype).name)
    if mesh is not None:
        mesh = as_auto_mesh(mesh)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ZipjaxError(f"{path} has no {PARAMS_DIR}/ folder: the checkpoint is incomplete")

    abstract = abstract_params(config)
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(params_dir).item_metadata.tree
    except (OSError, ValueError, FileNotFoundError) as e:
        raise ZipjaxError(f"cannot read the parameters in {params_dir}: {e}") from None
    _check_tree(config, stored, f"checkpoint {path}")

    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = tree_shardings(abstract, param_logical_axes(config), mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        params = checkpointer.restore(params_dir, target)
    except (OSError, ValueError) as e:
        raise ZipjaxError(f"cannot read the parameters in {params_dir}: {e}") from None
    return Model(config=config, params=params, mesh=mesh, path=path)


def _check_tree(config: ModelConfig, tree, what: str) -> None:
    """Parameter names and shapes must be exactly those the config implies."""
    expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
        abstract_params(config))}
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
