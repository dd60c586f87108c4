"""What a KV-cache method is: the `Method` protocol that generate and the decoders ask, and the checks every method
shares.

    zipjax.generate(model, ids, n, kv=ZipCache(high_bits=4, low_bits=2, saliency_ratio=0.6))

A method is a frozen, keyword-only, self-validating dataclass (hashable: it selects a compilation), so a bad bit width
or ratio is an error where it is written, never inside jit. It answers for itself: its registry `name`, whether it
`has_kernel`, `check` (geometry errors at the call site), `decode_slots` (cache slots it needs after the prompt) and
`make_cache` (the empty cache that runs it). The factory (zipjax.kv.methods) only asks; it never tests a type.

Every method takes `kernel: bool | None = None`, resolved by `zipjax.platform.use_kernel`: None runs the compiled
Pallas kernel where the platform is TPU or GPU and jax.numpy on the CPU; True / False force one path. A method without
a kernel refuses kernel=True by name (`refuse_kernel`) rather than ignore it.

Imports: errors, config, cache, codec.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from zipjax.cache import Cache
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.kv.codec import SUPPORTED_BITS
from zipjax.validate import boolean, integer, number, optional, string


@runtime_checkable
class Method(Protocol):
    """A KV-cache method: what the factory, generate, the CLI and the benchmarks ask of it."""

    name: ClassVar[str]  # its name in zipjax.kv.METHODS and on the command line (`--kv NAME`)
    has_kernel: ClassVar[bool]  # whether decode attention has a Pallas kernel (`kernel=True` is accepted)
    kernel: bool | None

    def check(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int) -> None:
        """Raise a ZipjaxError naming the problem if the cache cannot hold this geometry (before any jit)."""
        ...

    @property
    def decode_slots(self) -> int:
        """Cache slots the method needs after the prompt (e.g. a full-precision buffer that must fit)."""
        ...

    def make_cache(self, config: ModelConfig, batch: int, max_len: int, prefill_len: int,
                   starts: jax.Array | None = None, dtype: jnp.dtype | None = None) -> Cache:
        """The empty cache that runs the method: a prompt of `prefill_len` slots, then decode tokens to `max_len`."""
        ...


def as_method(kv) -> Method | None:
    """The `kv=` argument checked: None for the dense cache, or a method; a clear error for anything else."""
    if kv is None or isinstance(kv, Method):
        return kv
    raise ZipjaxError(f"kv must be None or a zipjax.kv method (ZipCache(), KIVI(), Uniform(), ZipVL(), MiniCache(), "
                      f"see zipjax.kv.METHODS), got {kv!r}")


def _pair(read):
    """The reader of a field annotated `tuple[T, T]`: a tuple of two values that `read` accepts (a list is not
    hashable, and methods are keys of compilation caches)."""
    def read_pair(value, name: str):
        if not isinstance(value, tuple) or len(value) != 2:
            raise ZipjaxError(f"{name} has the wrong type: it must be a tuple of two values, got {value!r:.60}")
        return tuple(read(v, name) for v in value)
    return read_pair


# a method's field annotation -> the reader that checks a value of it (zipjax.validate): True is not 1, "2" is not 2,
# 2.0 is not a bit width
_FIELD_READERS = {
    "int": integer, "float": number, "bool": boolean, "str": string,
    "int | None": lambda value, name: optional(integer, value, name),
    "bool | None": lambda value, name: optional(boolean, value, name),
    "tuple[float, float]": _pair(number),
    "tuple[int, int] | None": lambda value, name: optional(_pair(integer), value, name),
}


def check_field_types(method) -> None:
    """Every field of a method's dataclass holds a value of its annotated type: nothing is coerced silently. Fields
    of other types (nested methods) are checked by the method itself."""
    for field in dataclasses.fields(method):
        read = _FIELD_READERS.get(field.type if isinstance(field.type, str) else getattr(field.type, "__name__", ""))
        if read is not None:
            read(getattr(method, field.name), f"{type(method).__name__}.{field.name}")


def check_bits(name: str, bits: int) -> None:
    integer(bits, name)
    if bits not in SUPPORTED_BITS:
        raise ZipjaxError(f"{name}={bits!r} is not a supported bit width; choose one of {SUPPORTED_BITS}")


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ZipjaxError(f"{name} must be a positive integer, got {value!r}")


def check_group(group: int | None) -> None:
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 1):
        raise ZipjaxError(f"group must be a positive number of channels or None, got {group!r}")


def check_kernel(kernel: bool | None) -> None:
    if kernel is not None and not isinstance(kernel, bool):
        raise ZipjaxError(f"kernel must be None (the Pallas kernel on TPU/GPU, jax.numpy on CPU), True or False, "
                          f"got {kernel!r}")


def refuse_kernel(method: str, kernel: bool | None, why: str) -> None:
    """A method without a kernel: kernel=None and False both mean jax.numpy; True is an error naming the method."""
    check_kernel(kernel)
    if kernel:
        raise ZipjaxError(f"{method} has no Pallas kernel ({why}); use kernel=None or False")


def check_block_sizes(batch: int, max_len: int, prefill_len: int) -> None:
    if batch <= 0:
        raise ZipjaxError(f"a KV cache needs batch > 0, got {batch}")
    if not 1 < prefill_len <= max_len:
        raise ZipjaxError(f"prefill_len must lie in (1, max_len={max_len}], got {prefill_len}")


def check_packing(config: ModelConfig, bits: tuple[int, ...] | int, group: int | None) -> None:
    """Codes of each bit width pack whole bytes per head, and a group divides head_dim."""
    d = config.head_dim
    for b in sorted({bits} if isinstance(bits, int) else set(bits)):
        if d % (8 // b):
            raise ZipjaxError(f"{b}-bit codes pack {8 // b} channels per byte; head_dim {d} is not a multiple")
    if group is not None and d % group:
        raise ZipjaxError(f"quantization group of {group} channels does not divide head_dim {d}")
