"""Which jax backend to start when the user has not said (decided before jax is imported), which platform code is
being traced for, and the one kernel policy: whether a Pallas kernel or its jax.numpy path runs.

    use_kernel(None)   # the compiled kernel where the platform traced for is a TPU or a GPU, jnp on a CPU
    use_kernel(True)   # the kernel everywhere (interpreted on a CPU: for tests, slow)
    use_kernel(False)  # the jnp path everywhere

Every KV method, image decoder and expert attachment takes `kernel: bool | None = None` and resolves it here, at
trace time; nothing falls back on an exception.

With the ahead-of-time toolchains installed (libtpu and jax's CUDA plugin, zipjax's `test` extra), jax tries every
plugin at start-up: on a machine without the hardware that costs seconds and prints a CUDA plugin error and libtpu
warnings, then falls back to the CPU anyway. Where the machine has no accelerator device at all, zipjax asks jax for
the CPU directly (`JAX_PLATFORMS=cpu`). Compiling for a described TPU or GPU (zipjax.aot) still works then: that
needs the toolchains, not the devices. A `JAX_PLATFORMS` the user set is never changed, and nothing changes on a
machine with an NVIDIA GPU, a TPU or an AMD GPU.

On such a machine the CUDA plugin's C++ logger also announces, on every start, that it found no GPU (two lines on
stderr that no setting silences); zipjax imports jax with that file descriptor muted there, so `zipjax` commands
keep their one-line error promise.

A leaf: imports os, sys, contextvars and pathlib only (it must run before jax is imported; `platform` imports jax
when first called, `host_free_bytes` resource).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from pathlib import Path

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("zipjax_platform", default=None)

# device nodes that mean an accelerator jax could use: NVIDIA, TPU (v2/v3 accel, v4+ vfio), AMD
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/accel0", "/dev/vfio/0",
                     "/dev/kfd")


def has_accelerator() -> bool:
    return any(Path(node).exists() for node in ACCELERATOR_NODES)


def choose_default_platform() -> None:
    """Run jax on the CPU when the user has not chosen a platform and the machine has no accelerator device, with
    the plugins' start-up chatter muted (see the module docstring). Before `import jax` this sets JAX_PLATFORMS;
    after it (a script that imported jax first) it sets the `jax_platforms` option instead, which still works while
    no backend has started; once one has, nothing changes."""
    wants_cpu = "JAX_PLATFORMS" not in os.environ and not has_accelerator()
    if "jax" not in sys.modules:
        if wants_cpu:
            os.environ["JAX_PLATFORMS"] = "cpu"
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            with _stderr_muted():
                import jax  # imported once here, quietly; every later import reuses it

                _register_plugins()
        return
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    if wants_cpu and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    if jax.config.jax_platforms == "cpu":
        with _stderr_muted():
            _register_plugins()


COMPILATION_CACHE_ENV = "ZIPJAX_COMPILATION_CACHE"
COMPILATION_CACHE_BYTES = 2 << 30  # least recently used programs are dropped past this


def compilation_cache_dir() -> Path | None:
    """Where compiled programs persist between runs: $ZIPJAX_COMPILATION_CACHE if set (0, off, no or an empty value
    turn the cache off), else $XDG_CACHE_HOME/zipjax/jax-compilation (~/.cache/zipjax/jax-compilation)."""
    chosen = os.environ.get(COMPILATION_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "no", "false") else Path(chosen).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "zipjax" / "jax-compilation"


def enable_compilation_cache() -> None:
    """Turn on jax's persistent compilation cache (see `compilation_cache_dir`), so a second run of the same program
    loads its executables instead of compiling them again. A cache directory the user gave jax is left alone."""
    import jax

    folder = compilation_cache_dir()
    if folder is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)


def _register_plugins() -> None:
    """Load jax's PJRT plugins now, where their start-up lines are muted, rather than at the first computation. This
    starts no backend (`jax.distributed.initialize` may still follow). Where a jax version lacks the hook, the
    plugins load later, as jax does by default."""
    from jax._src import xla_bridge

    register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    if register is not None:
        register()


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (C++ loggers write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def platform() -> str:
    """The platform code is being traced for: "tpu", "gpu" or "cpu". It is jax's default backend, except while
    compiling ahead of time for another one (zipjax.aot), which says so with `compiling_for`. Every choice between a
    kernel and its jnp path is made on this, explicitly; nothing falls back on an exception."""
    import jax

    chosen = _PLATFORM.get() or jax.default_backend()
    return "gpu" if chosen in ("cuda", "rocm") else chosen


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
    """Trace for platform `name` ("tpu" or "gpu") inside the block, whatever the default backend is."""
    token = _PLATFORM.set(name)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def use_kernel(kernel: bool | None) -> bool:
    """The kernel policy: None means the compiled Pallas kernel where the platform traced for is a TPU or a GPU and
    the jax.numpy path on a CPU; True or False forces it."""
    if kernel is None:
        return platform() in ("tpu", "gpu")
    if kernel and platform() == "cpu" and not _NOTICES:
        _NOTICES.add("interpreted")
        print("zipjax: a Pallas kernel runs interpreted on this CPU (slow, for testing); kernel=None takes the "
              "jax.numpy path here", file=sys.stderr, flush=True)
    return bool(kernel)


_NOTICES: set[str] = set()  # notices already printed by this process


def free_memory_bytes() -> int | None:
    """Memory free for new arrays on the default device: its allocator's limit less what is in use on a TPU or GPU;
    on a CPU, the least of what the machine can still give (`host_free_bytes`); None where nothing can be read."""
    import jax

    stats = jax.local_devices()[0].memory_stats()  # this process's own device (a pod has others)
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_free_bytes()


def host_free_bytes() -> int | None:
    """What this process can still allocate on the host: the least of the machine's available memory (page cache
    that can be dropped included), the room left under its container's memory limit (cgroup v2 or v1) and under
    its own address-space limit (RLIMIT_AS, `ulimit -v`). None where none of them can be read."""
    found = [_meminfo("MemAvailable"), _cgroup_room(), _address_space_room()]
    if found[0] is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            found[0] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    known = [value for value in found if value is not None]
    return max(0, min(known)) if known else None


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # absent, or "max" (no limit)


def _meminfo(field: str, path: str = "/proc/meminfo") -> int | None:
    """A field of /proc/meminfo (or /proc/self/status) in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (f"{v1}limit_in_bytes", f"{v1}usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:  # v1 writes "no limit" as a huge number
            return cap - used
    return None


def _address_space_room() -> int | None:
    try:
        import resource
    except ImportError:  # not on a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _meminfo("VmSize", "/proc/self/status")
    if soft == resource.RLIM_INFINITY or size is None:
        return None
    return soft - size
