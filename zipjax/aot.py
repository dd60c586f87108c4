"""Ahead-of-time compilation for accelerators this machine does not have: real TPU topologies (libtpu's compiler)
and described NVIDIA GPUs (jax's CUDA plugin), with the library's own shardings.

    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from zipjax import aot
    from zipjax.config import PUBLISHED
    from zipjax.sharding import tree_shardings
    from zipjax.transformer import Transformer, abstract_params, param_logical_axes

    config = PUBLISHED["llama-3-8b"]
    t = aot.target("v5e:2x2")                                   # 4 chips of TPU v5e; "h100" / "h200" for one GPU
    mesh = aot.mesh(t, data=1, model=4)
    shapes = abstract_params(config)
    params = aot.abstract(shapes, tree_shardings(shapes, param_logical_axes(config), mesh))
    tokens = aot.array((1, 512), jnp.int32, NamedSharding(mesh, P()))
    logits = lambda p, x: Transformer(config).apply({"params": p}, x, jnp.arange(512)[None], None)[0]
    with jax.set_mesh(mesh):                                    # the kernels run per shard on the context mesh
        compiled, report = aot.compile(logits, params, tokens, target=t)
    report.temp_bytes, report.fits, report.flops, report.collectives     # per chip

Nothing is allocated and nothing runs: arguments are `jax.ShapeDtypeStruct`s carrying shardings over the target's
devices. Compiling proves what interpret mode cannot: Mosaic's and Triton's block rules, layouts, VMEM/SMEM limits,
and the compiler's own memory plan (argument, output and temporary bytes per chip), FLOPs and bytes accessed (TPU;
XLA reports no cost analysis for GPU executables), and the collectives the SPMD partitioner inserted.

Needs the toolchains of zipjax's `test` extra: `jax[tpu]` at the installed jax version (libtpu) and
`jax-cuda12-plugin` + `jax-cuda12-pjrt` at that version (no CUDA libraries or GPU needed). Peak figures per chip for
rooflines are in `CHIPS` (vendor spec sheets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from zipjax.errors import ZipjaxError
from zipjax.platform import compiling_for, has_accelerator
from zipjax.sharding import MESH_AXES, as_auto_mesh

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    hbm_bandwidth: float  # bytes / s
    bf16_flops: float  # dense peak, FLOP / s


CHIPS = {
    "v5e": Chip("TPU v5e", 16 * GIB, 819e9, 197e12),
    "v5p": Chip("TPU v5p", 95 * GIB, 2765e9, 459e12),
    "v6e": Chip("TPU v6e", 32 * GIB, 1640e9, 918e12),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, 3350e9, 989e12),
    "h200": Chip("NVIDIA H200", 141 * 10**9, 4800e9, 989e12),
}

# XLA's GpuTargetConfigProto (text form) for an SXM Hopper; memory size and bandwidth are filled in per chip.
_GPU_TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{description}"
"""
_GPU_DESCRIPTIONS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A compilation target: its name, chip, and the (compile-only) devices of the topology."""

    name: str
    chip: Chip
    devices: tuple[Any, ...]

    @property
    def kind(self) -> str:
        return "gpu" if self.name in _GPU_DESCRIPTIONS else "tpu"

    @property
    def hosts(self) -> int:
        return len({getattr(d, "process_index", 0) for d in self.devices})


def target(name: str) -> Target:
    """A TPU topology "GEN:AxB[xC]" (v5e, v5p, v6e; e.g. "v5e:2x2", "v5e:4x4" on 4 hosts, "v5p:2x2x2", "v5e:1x2"
    on part of one host) or one GPU ("h100", "h200")."""
    from jax.experimental import topologies

    if name in _GPU_DESCRIPTIONS:
        chip = CHIPS[name]
        config = _GPU_TARGET.format(bandwidth=int(chip.hbm_bandwidth), memory=chip.hbm_bytes,
                                    description=_GPU_DESCRIPTIONS[name])
        try:
            topology = topologies.get_topology_desc("", platform="cuda", target_config=config, topology="1x1x1")
        except Exception as e:  # no plugin: jax says so in its own words
            raise ZipjaxError(f"cannot describe an {name.upper()} here ({_first_line(e)}); install jax-cuda12-plugin "
                              f"and jax-cuda12-pjrt at jax {jax.__version__} (no GPU needed)") from None
        return Target(name, chip, tuple(topology.devices))
    if not has_accelerator():
        # libtpu reads these when it first describes a topology; on a host that is not a TPU VM, say what it would
        # ask, and let several compile-only processes share it (its lockfile guards real chips, which are absent)
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation, _, shape = name.partition(":")
    dims = shape.split("x")
    if generation not in ("v5e", "v5p", "v6e") or not 2 <= len(dims) <= 3 or not all(d.isdigit() for d in dims):
        raise ZipjaxError(f"unknown target {name!r}; use a TPU topology such as v5e:2x2, v5p:2x2x2, v6e:2x2, or "
                          "h100 / h200")
    sizes = [int(d) for d in dims]
    # fewer chips than one host holds (1x1, 1x2, 1x2x1): the topology is that one host
    bounds = {"chips_per_host_bounds": tuple(sizes + [1] * (3 - len(sizes)))} if np.prod(sizes) < 4 else {}
    try:
        topology = topologies.get_topology_desc(name, "tpu", **bounds)
    except Exception as e:
        raise ZipjaxError(f"cannot describe TPU topology {name} here ({_first_line(e)}); install "
                          f"jax[tpu]=={jax.__version__} (libtpu; no TPU needed)") from None
    return Target(name, CHIPS[generation], tuple(topology.devices))


def mesh(t: Target, data: int = 1, model: int | None = None) -> Mesh:
    """A ("data", "model") mesh over the target's devices (model defaults to what data leaves)."""
    model = model if model is not None else len(t.devices) // data
    if data * model != len(t.devices):
        raise ZipjaxError(f"a {data}x{model} mesh needs {data * model} chips; {t.name} has {len(t.devices)}")
    return as_auto_mesh(Mesh(np.array(t.devices).reshape(data, model), MESH_AXES))


def on_chip(t: Target, index: int = 0) -> SingleDeviceSharding:
    return SingleDeviceSharding(t.devices[index])


def abstract(tree, shardings) -> Any:
    """ShapeDtypeStructs of `tree` (anything with shape and dtype) with the matching shardings (a tree, or one
    sharding for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def array(shape: Sequence[int], dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def replicated(m: Mesh) -> NamedSharding:
    return NamedSharding(m, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Report:
    """What the compiler planned, per chip."""

    target: str
    chips: int
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float | None  # None where the backend reports no cost analysis (GPU)
    bytes_accessed: float | None
    collectives: dict[str, int]
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Memory the program needs on a chip: arguments, outputs not aliased to arguments, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops of a compiled (per-device, optimised) HLO module, by kind."""
    return dict(Counter(m.group(1) for m in _COLLECTIVE.finditer(hlo_text)))


def compile(fn: Callable, *args, target: Target, **jit_kwargs) -> tuple[jax.stages.Compiled, Report]:
    """Trace, lower and compile `fn(*args)` for `target`; `args` are abstract (see `abstract`), their shardings on
    the target's devices. `jit_kwargs` go to jax.jit (static_argnames, donate_argnames, out_shardings, ...)."""
    start = time.perf_counter()
    # kernels choose their path by the traced-for platform; Pallas' TPU lowering reads the default device's kind
    with compiling_for(target.kind), jax.default_device(target.devices[0]), _not_persisted():
        lowered = jax.jit(fn, **jit_kwargs).trace(*args).lower()
        compiled = lowered.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    return compiled, Report(
        target=target.name, chips=len(target.devices), hbm_bytes=target.chip.hbm_bytes,
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        flops=None if not cost else float(cost.get("flops", 0.0)),
        bytes_accessed=None if not cost else float(cost.get("bytes accessed", 0.0)),
        collectives=collectives(compiled.as_text()), compile_seconds=seconds)


@contextlib.contextmanager
def _not_persisted():
    """Keep ahead-of-time executables out of the persistent compilation cache: only the chip they target could load
    them (a later run's read of one fails with a warning), and they are large."""
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
