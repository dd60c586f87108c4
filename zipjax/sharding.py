"""Placing parameters and caches on a device mesh with a small table of logical-axis rules.

Every parameter and cache array carries logical axis names ("heads", "mlp", "batch", ...). `RULES` maps them onto
the mesh axes "data" and "model": attention heads, MLP hidden units and the vocabulary are split over "model"
(tensor parallelism), the batch over "data". XLA's SPMD partitioner does the rest: `generate` is the same code on
one CPU and on a pod.

A dimension that its mesh axis does not divide is not split by it. Where that would leave a large array whole on
every chip, `FALLBACKS` names the next logical axis of the same array that takes the mesh axis instead: KV heads that
the "model" axis does not divide (LLaMA-3-70B's 8 on a 16-way axis, SmolLM2's 3 on 4) split the cache by sequence
(then head_dim if the sequence does not divide either) and the k/v projections by head_dim. Sequence, not head_dim,
for the cache because a decode step's attention then needs only reductions of the size of its output over the
"model" axis (the partial softmax sums and [batch, heads, head_dim] values) where splitting head_dim would reduce
whole [batch, heads, cache_len] score rows; every chip holds 1/model of the cache either way, so its memory is the
same. Attention over a sequence-split cache runs per sequence shard (`per_shard`, `states_per_shard`): each chip
attends over its own slots and the partial softmax states (max, sum, unnormalised output) are combined across the
"model" axis by log-sum-exp, so K/V never move; only the queries and the [batch, heads, head_dim] outputs do.
Anything else the mesh does not divide is replicated rather than refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zipjax.errors import ZipjaxError
from zipjax.kernels.common import SoftmaxState, combine, merge_states

T = TypeVar("T")
_WRITING_ALONE = contextvars.ContextVar("zipjax_writing_alone", default=False)

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (absent: replicated)
RULES: tuple[tuple[str, str], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)

# logical axis -> the logical axes (of the same array, in order) that take its mesh axis when it cannot
FALLBACKS: dict[str, tuple[str, ...]] = {
    "kv_heads": ("seq", "head_dim"),
}


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
    """NamedSharding for an array of `shape` whose axes have the logical names in `logical` (see RULES and
    FALLBACKS; a mesh axis splits at most one dimension, and only one that it divides)."""
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    return NamedSharding(mesh, PartitionSpec(*logical_spec(names, shape, dict(mesh.shape))))


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int]) -> list[str | None]:
    """The mesh axis (or None) of each dimension: RULES first; a mesh axis a dimension could not take goes to the
    first of that dimension's FALLBACKS that it divides and that is still unsplit."""
    rules = dict(RULES)
    divides = lambda axis, size: axis in mesh_shape and size % mesh_shape[axis] == 0
    spec: list[str | None] = [None] * len(shape)
    for i, (name, size) in enumerate(zip(names, shape, strict=True)):
        axis = rules.get(name) if name is not None else None
        if axis is not None and axis not in spec and divides(axis, size):
            spec[i] = axis
    for name in names:
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in spec or axis not in mesh_shape or mesh_shape[axis] == 1:
            continue
        for alternative in FALLBACKS.get(name, ()):
            j = names.index(alternative) if alternative in names else -1
            if j >= 0 and spec[j] is None and rules.get(alternative) is None and divides(axis, shape[j]):
                spec[j] = axis
                break
    return spec


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


_KV_AXES = ("batch", "kv_heads", "seq", "head_dim")  # a cache layer's K/V (zipjax.cache.KV_AXES)

State = tuple[jax.Array, jax.Array, jax.Array]  # partial softmax state: max, sum, unnormalised output


def _context_sizes() -> dict[str, int] | None:
    """Axis sizes of the context mesh (`jax.set_mesh`), or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def cache_spec(shape: Sequence[int], names: Sequence[str | None] = _KV_AXES) -> list[str | None]:
    """The mesh axis of each dimension of a cache array on the context mesh, by the rules that place it (a
    [batch, kv_heads, len, head_dim] K/V by default); all None without a context mesh."""
    sizes = _context_sizes()
    names = tuple(names) + (None,) * (len(shape) - len(names))
    return [None] * len(shape) if sizes is None else logical_spec(names, shape, sizes)


def sequence_split(kv_shape: Sequence[int]) -> bool:
    """Whether a cache's K/V [batch, kv_heads, len, head_dim] are split by sequence over "model" on the context
    mesh: the KV heads do not divide the axis and the slots do (FALLBACKS)."""
    return cache_spec(kv_shape)[2] == "model"


def per_shard(kernel: Callable | None, q: jax.Array, k: jax.Array, v: jax.Array, cursor: jax.Array,
              starts: jax.Array, *, partial: Callable[..., State] | None = None) -> jax.Array:
    """Run an attention kernel (q [batch, q_len, heads, d], k, v [batch, kv_heads, len, d], cursor [], starts [batch]
    -> like q) on each shard of the context mesh (`jax.set_mesh`): Pallas kernels are opaque to XLA's partitioner,
    so without this they would see whole, gathered arrays. Batch splits over "data" and heads over "model" where the
    mesh divides them, as the logical-axis rules place the cache; without a context mesh the kernel runs as is.

    A cache split by sequence over "model" runs `partial(q, k, v, cursor, starts, first_slot) -> (m, l [batch,
    q_len, 1, heads], acc [batch, q_len, 1, heads, d])` instead, on each shard's own slots (first_slot: where the
    shard's slots begin) with every query head, and combines the shards' states across "model" (pmax / psum of
    small [batch, q_len, heads(, d)] arrays): K/V stay where they are. Without `partial` such a cache is gathered."""
    if _context_sizes() is None:
        return kernel(q, k, v, cursor, starts)
    spec = cache_spec(k.shape)
    data = spec[0]
    if partial is not None and spec[2] == "model":
        def sequence_shard(q, k, v, cursor, starts):
            first_slot = jax.lax.axis_index("model") * k.shape[2]
            state = partial(q, k, v, cursor, starts, first_slot)
            return combine([state], axis_name="model")[0].astype(q.dtype)

        q_spec, kv_spec = PartitionSpec(data, None, None, None), PartitionSpec(data, None, "model", None)
        return jax.shard_map(sequence_shard, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(), PartitionSpec(data)),
                             out_specs=q_spec, check_vma=False)(q, k, v, cursor, starts)
    model = spec[1]
    q_spec, kv_spec = PartitionSpec(data, None, model, None), PartitionSpec(data, model, None, None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(), PartitionSpec(data)),
                         out_specs=q_spec, check_vma=False)(q, k, v, cursor, starts)


def scatter_per_shard(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array,
                      written: jax.Array, starts: jax.Array) -> jax.Array:
    """Run a parallel-decoding attention kernel (q [batch, q_len, heads, d], k, v [batch, kv_heads, len, d], q_slots
    [batch, q_len], written [batch, len], starts [batch] -> like q; zipjax.kernels.zipar_attention) on each shard of
    the context mesh, as `per_shard` does for the prompt: batch over "data" and heads over "model" where the cache is
    placed so; a cache split by sequence is gathered per shard. Without a context mesh the kernel runs as is."""
    if _context_sizes() is None:
        return kernel(q, k, v, q_slots, written, starts)
    data, model = cache_spec(k.shape)[:2]
    q_spec, kv_spec = PartitionSpec(data, None, model, None), PartitionSpec(data, model, None, None)
    rows = PartitionSpec(data, None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, rows, rows, PartitionSpec(data)),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_slots, written, starts)


def states_per_shard(kernel: Callable[..., State], q: jax.Array, arrays: tuple[jax.Array | None, ...],
                     q_slot: jax.Array, starts: jax.Array) -> State:
    """Run a kernel that returns partial softmax states over a compressed cache's segment on each shard of the
    context mesh: `kernel(q, arrays, q_slot, starts) -> SoftmaxState(max, denom [batch, kv_heads, parts, G], acc
    [batch, kv_heads, parts, G, d])` with q [batch, kv_heads, G, d], `arrays` a NamedTuple (e.g.
    zipjax.kernels.quantized_attention.PackedSegment) of arrays [batch, kv_heads, n, ...] (n: tokens or blocks;
    None: absent), q_slot [] and starts [batch] (the kernel masks by the slot each token holds, so a shard of
    tokens needs no offset). Batch splits over "data" and KV heads over "model" where they divide; else, where
    "model" divides every array's token / block axis (its shards then hold whole blocks), each shard attends its
    own tokens and the states are combined across "model" (one [batch, kv_heads, 1, G(, d)] state, on every
    shard); else the arrays are whole on each "model" shard. Without a context mesh the kernel runs as is."""
    sizes = _context_sizes()
    if sizes is None:
        return kernel(q, arrays, q_slot, starts)
    present = [x for x in arrays if x is not None]
    data = "data" if "data" in sizes and q.shape[0] % sizes["data"] == 0 else None
    split = sizes.get("model", 1) > 1
    heads = "model" if split and q.shape[1] % sizes["model"] == 0 else None
    sequence = split and heads is None and all(x.shape[2] % sizes["model"] == 0 for x in present)
    spec = lambda x: PartitionSpec(data, heads, "model" if sequence else None, *(None,) * (x.ndim - 3))
    array_specs = [PartitionSpec() if x is None else spec(x) for x in arrays]
    state_specs = SoftmaxState(PartitionSpec(data, heads), PartitionSpec(data, heads), PartitionSpec(data, heads))

    def shard(q, *rest):
        *parts, q_slot, starts = rest
        state = kernel(q, arrays._make(parts), q_slot, starts)
        return merge_states([state], "model") if sequence else state

    return jax.shard_map(shard, in_specs=(PartitionSpec(data, heads), *array_specs, PartitionSpec(),
                                          PartitionSpec(data)),
                         out_specs=state_specs, check_vma=False)(q, *arrays, q_slot, starts)


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """The context mesh (`jax.set_mesh`) under which a model's jitted programs are traced and run: what `per_shard`
    and `states_per_shard` read to run the Pallas kernels on each shard. Every entry point that runs a model on its
    mesh enters it; without a mesh, nothing."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def to_host(x) -> np.ndarray:
    """The whole value of an array on this host: gathered from every process when it spans devices of others (a
    multi-host mesh), else read directly. Every host gets the same result."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place(x, mesh: Mesh | None, spec: PartitionSpec | None = None) -> jax.Array:
    """Host data that is the same on every process, as one global array placed on `mesh` by `spec` (axes the mesh
    does not divide are replicated); each process fills only its own devices' shards. Without a mesh, on the
    default device."""
    x = np.asarray(x)
    if mesh is None:
        return jnp.asarray(x)
    sizes, spec = dict(mesh.shape), tuple(spec or ())
    fitted = [a if a is not None and a in sizes and dim % sizes[a] == 0 else None
              for a, dim in zip(spec + (None,) * (x.ndim - len(spec)), x.shape, strict=True)]
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec(*fitted)), lambda index: x[index])


def one_writer(write: Callable[[], T], elsewhere: Callable[[], T], what: str) -> T:
    """Run a host-side job that writes files (a conversion, a checkpoint) on process 0 only. The other processes
    of a multi-host run wait for it, then return `elsewhere()` (the same path, say), or raise if it failed there.
    On one process: `write()`."""
    # is_initialized first: a conversion never starts a backend (that would cost seconds and log noise)
    if not jax.distributed.is_initialized() or jax.process_count() == 1 or _WRITING_ALONE.get():
        return write()
    result, error = None, None
    if jax.process_index() == 0:
        token = _WRITING_ALONE.set(True)  # a nested one_writer (convert -> save) runs here directly
        try:
            result = write()
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
        finally:
            _WRITING_ALONE.reset(token)
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise ZipjaxError(f"{what} failed on process 0 (its output has the error)")
    return result if jax.process_index() == 0 else elsewhere()


def check_mesh(mesh: Mesh) -> None:
    """In a multi-process run every process must build the same mesh over all devices of all processes."""
    if jax.process_count() > 1 and set(mesh.devices.flat) != set(jax.devices()):
        raise ZipjaxError(f"the mesh holds {mesh.devices.size} devices but the {jax.process_count()} processes have "
                          f"{jax.device_count()}; in a multi-host run build it over all of them "
                          "(zipjax.make_mesh does, on every process)")


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def replicated_shardings(abstract_tree, mesh: Mesh):
    """Every leaf whole on every device (small parameter trees such as Emu3's VQ-VAE)."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract_tree)
