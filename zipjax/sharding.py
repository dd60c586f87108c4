"""Placing parameters and caches on a device mesh with a small table of logical-axis rules.

Every parameter and cache array carries logical axis names ("heads", "mlp", "batch", ...). `RULES` maps them onto
the mesh axes "data" and "model": attention heads, MLP hidden units and the vocabulary are split over "model"
(tensor parallelism), the batch over "data". XLA's SPMD partitioner does the rest: `generate` is the same code on
one CPU and on a pod. A dimension that the mesh axis does not divide is replicated rather than refused (for example
SmolLM2's 3 KV heads on a 4-way "model" axis).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zipjax.errors import ZipjaxError

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (absent: replicated)
RULES: tuple[tuple[str, str], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all), with `model` defaulting to what is left."""
    devices = list(devices if devices is not None else jax.devices())
    model = model if model is not None else len(devices) // data
    if data * model != len(devices):
        raise ZipjaxError(f"a {data}x{model} mesh needs {data * model} devices, {len(devices)} given")
    return as_auto_mesh(Mesh(np.array(devices).reshape(data, model), MESH_AXES))


def as_auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types, so XLA's partitioner propagates the shardings.

    (jax >= 0.10 makes Explicit axes by default, which would need sharding-in-types annotations everywhere.)
    """
    unknown = [name for name in mesh.axis_names if name not in MESH_AXES]
    if unknown:
        raise ZipjaxError(
            f"mesh axes {unknown} are not known to zipjax; name the axes 'data' (batch) and 'model' (heads, MLP)"
        )
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def logical_sharding(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for an array of `shape` whose axes have the logical names in `logical`."""
    rules = dict(RULES)
    spec = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is not None and (axis not in mesh.shape or size % mesh.shape[axis]):
            axis = None
        spec.append(axis)
    return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh):
    """A tree of NamedShardings: each leaf of `abstract_tree` (anything with .shape) placed by its logical axes."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree.map(lambda spec, x: logical_sharding(spec, x.shape, mesh), logical_tree, abstract_tree,
                        is_leaf=is_spec)


@functools.lru_cache(maxsize=64)
def jit_initializer(recipe: Callable[[jax.Array], Any], mesh: Mesh | None) -> Callable[[jax.Array], Any]:
    """`recipe(starts) -> cache` jitted once per (hashable) recipe and mesh; with a mesh, the cache's arrays are
    placed by its `logical_axes()`. `recipe.batch` is the number of sequences. Caches are built on the devices
    (zeros), never copied from the host."""
    if mesh is None:
        return jax.jit(recipe)
    abstract = jax.eval_shape(recipe, jax.ShapeDtypeStruct((recipe.batch,), jnp.int32))
    return jax.jit(recipe, out_shardings=tree_shardings(abstract, abstract.logical_axes(), mesh))


def per_shard(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array,
              starts: jax.Array) -> jax.Array:
    """Run an attention kernel (q [batch, q_len, heads, d], k, v [batch, kv_heads, len, d], cursor [], starts [batch]
    -> like q) on each shard of the context mesh (`jax.set_mesh`): Pallas kernels are opaque to XLA's partitioner,
    so without this they would see whole, gathered arrays. Batch splits over "data" and heads over "model" where the
    mesh divides them, as the logical-axis rules place the cache; without a context mesh the kernel runs as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, cursor, starts)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    data = "data" if q.shape[0] % sizes.get("data", 1) == 0 and "data" in sizes else None
    model = "model" if k.shape[1] % sizes.get("model", 1) == 0 and "model" in sizes else None
    q_spec, kv_spec = PartitionSpec(data, None, model, None), PartitionSpec(data, model, None, None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(), PartitionSpec(data)),
                         out_specs=q_spec, check_vma=False)(q, k, v, cursor, starts)


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def replicated_shardings(abstract_tree, mesh: Mesh):
    """Every leaf whole on every device (small parameter trees such as Emu3's VQ-VAE)."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract_tree)
