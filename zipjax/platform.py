"""Which jax backend to start when the user has not said, decided before jax is imported.

With the ahead-of-time toolchains installed (libtpu and jax's CUDA plugin, zipjax's `test` extra), jax tries every
plugin at start-up: on a machine without the hardware that costs seconds and prints a CUDA plugin error and libtpu
warnings, then falls back to the CPU anyway. Where the machine has no accelerator device at all, zipjax asks jax for
the CPU directly (`JAX_PLATFORMS=cpu`). Compiling for a described TPU or GPU (zipjax.aot) still works then: that
needs the toolchains, not the devices. A `JAX_PLATFORMS` the user set is never changed, and nothing changes on a
machine with an NVIDIA GPU, a TPU or an AMD GPU.

A leaf: imports os, sys and pathlib only (it must run before jax is imported).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# device nodes that mean an accelerator jax could use: NVIDIA, TPU (v2/v3 accel, v4+ vfio), AMD
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/accel0", "/dev/vfio/0",
                     "/dev/kfd")


def has_accelerator() -> bool:
    return any(Path(node).exists() for node in ACCELERATOR_NODES)


def choose_default_platform() -> None:
    """Set JAX_PLATFORMS=cpu when it is unset, jax is not imported yet, and no accelerator device exists."""
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    if not has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"
