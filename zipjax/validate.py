"""Typed reads of values that come from outside: config files, GGUF metadata, manifests, command-line and API
arguments.

Every external value goes through one of these before it is used, so a string where a boolean belongs, a fraction
where a size belongs, NaN, or an absurd size is a `ZipjaxError` naming the field and the value, raised before any
allocation, never a silent coercion (`bool("false")` is True; `int(3.7)` is 3). Files from outside (manifests,
npz arrays) are read with bounds: a regular file only, a size limit, a JSON nesting limit, every npz member's header
checked before its data is read. A leaf: imports errors (and numpy) only.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zipjax.errors import ZipjaxError

# Sizes past these are not models anyone runs; refusing them keeps a hostile config from allocating or looping
# before the weights are compared with it.
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 17  # hidden size, MLP width
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 2048
MAX_POSITIONS = 1 << 24
MAX_SEED = (1 << 63) - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"be {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"be {'<' if hi_open else '<='} {hi}"
    return f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def integer(value: Any, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (Python or numpy; not a bool, float or string) within [lo, hi]."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ZipjaxError(f"{name} has the wrong type: it must be an integer, got {_show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo in (0, 1):
            limit = "" if hi is None else f" no larger than {hi}"
            raise ZipjaxError(f"{name} must be a {'positive' if lo else 'non-negative'} integer{limit}, got {value}")
        raise ZipjaxError(f"{name} must {_range(lo, hi, False, False)}, got {value}")
    return value


def number(value: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite int or float (Python or numpy; not a bool or string) within the bounds (open where asked)."""
    if isinstance(value, np.integer | np.floating):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ZipjaxError(f"{name} has the wrong type: it must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ZipjaxError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise ZipjaxError(f"{name} must {_range(lo, hi, lo_open, hi_open)}, got {value}")
    return value


def boolean(value: Any, name: str) -> bool:
    """true or false, nothing that merely converts to one."""
    if not isinstance(value, bool):
        raise ZipjaxError(f"{name} has the wrong type: it must be true or false, got {_show(value)}")
    return value


def string(value: Any, name: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise ZipjaxError(f"{name} has the wrong type: it must be a string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise ZipjaxError(f"{name} must be one of {', '.join(choices)}; got {_show(value)}")
    return value


def optional(read: Callable[..., Any], value: Any, name: str, **bounds) -> Any:
    """None stays None; anything else goes through `read`."""
    return None if value is None else read(value, name, **bounds)


def integers(value: Any, name: str, *, lo: int | None = None, hi: int | None = None,
             max_items: int = 1 << 16) -> tuple[int, ...]:
    """A list (or one int) of integers within bounds."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ZipjaxError(f"{name} has the wrong type: it must be an integer or a list of integers, got {_show(value)}")
    if len(value) > max_items:
        raise ZipjaxError(f"{name} holds {len(value)} entries, more than {max_items}")
    return tuple(integer(v, f"{name}[{i}]", lo=lo, hi=hi) for i, v in enumerate(value))


def mapping(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise ZipjaxError(f"{name} has the wrong type: it must be a JSON object, got {_show(value)}")
    return value


# ------------------------------------------------------------------------------------------- files from outside

MAX_MANIFEST_BYTES = 64 << 20  # checksums.json of a checkpoint with a hundred thousand files stays below this
MAX_JSON_DEPTH = 32  # zipjax's own manifests nest four deep


def json_file(path: Path, what: str, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """The JSON value in the regular file `path` (a `what`), read with bounds: at most `max_bytes`, nested at most
    MAX_JSON_DEPTH deep; every failure a one-line ZipjaxError."""
    raw = read_bounded(path, what, max_bytes)
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ZipjaxError(f"{path} nests JSON more than {MAX_JSON_DEPTH} deep; it is not a {what}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ZipjaxError(f"{path} is not valid JSON: {_first_line(e)}") from None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ZipjaxError(f"{path} nests JSON more than {MAX_JSON_DEPTH} deep; it is not a {what}")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


def read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (never a pipe or a device, which could block or never
    end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ZipjaxError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ZipjaxError(f"cannot read {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ZipjaxError(f"{path} is not a regular file ({_file_kind(info.st_mode)}); a {what} is a file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > max_bytes:
            raise ZipjaxError(f"{path} holds {info.st_size:,} bytes, more than the {max_bytes:,} a {what} may")
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise ZipjaxError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > max_bytes:
        raise ZipjaxError(f"{path} holds more than the {max_bytes:,} bytes a {what} may")
    return raw


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def manifest(path: Path, fmt: str, versions: tuple[int, ...], what: str) -> dict:
    """A zipjax manifest (`{"format": fmt, "version": v, ...}`), read through `json_file`: a JSON object of format
    `fmt` and an integer version in `versions` (true and 1.0 are not 1)."""
    data = json_file(path, f"{what} manifest")
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ZipjaxError(f"{path} is not a {what} manifest")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in versions:
        readable = ", ".join(map(str, versions))
        raise ZipjaxError(f"{path} has {what} format version {_show(version)}; this zipjax reads version {readable}")
    return data


def names(value: Any, name: str, *, max_items: int = 1024, reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings, none of them `reserved`."""
    if not isinstance(value, list) or not value:
        raise ZipjaxError(f"{name} must be a non-empty list of names, got {_show(value)}")
    if len(value) > max_items:
        raise ZipjaxError(f"{name} holds {len(value)} names, more than {max_items}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or item in reserved:
            extra = f" other than {', '.join(map(repr, reserved))}" if reserved else ""
            raise ZipjaxError(f"{name}[{i}] must be a non-empty string{extra}, got {_show(item)}")
    if len(set(value)) != len(value):
        twice = sorted({v for v in value if value.count(v) > 1})
        raise ZipjaxError(f"{name} names {twice[0]!r} more than once")
    return tuple(value)


# ---------------------------------------------------------------------------------------- npz files from outside

Dim = int | range  # an exact size, or the sizes allowed


@dataclass(frozen=True)
class Member:
    """What one array of an npz file must be: its shape (exact sizes or ranges) and the dtypes it may have."""

    shape: tuple[Dim, ...]
    dtypes: tuple[str, ...]


def npz_arrays(path: Path, members: dict[str, Member], what: str) -> dict[str, np.ndarray]:
    """Exactly the arrays `members` names from the npz (zip of .npy) file `path`, each checked against its npy
    header (shape, dtype; never an object array, so never a pickle) before its data is read, and read to exactly
    the bytes that shape and dtype imply: a compressed or lying member cannot allocate more. Any other member, a
    missing one or trailing data is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            listed = archive.namelist()
            if len(set(listed)) != len(listed):
                raise ZipjaxError(f"{path} lists an array twice; it is not a {what}")
            expected = {f"{key}.npy": key for key in members}
            extra = sorted(set(listed) - set(expected))
            missing = sorted(set(expected) - set(listed))
            if extra or missing:
                problem = (f"holds arrays a {what} does not have: {', '.join(map(repr, extra[:3]))}" if extra
                           else f"lacks the array {expected[missing[0]]!r}")
                raise ZipjaxError(f"{path} {problem}")
            return {key: _member(archive, file, members[key], f"{path}: array {key!r}")
                    for file, key in expected.items()}
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ZipjaxError(f"cannot read {path} (damaged or not an npz file): {_first_line(e)}") from None


def _member(archive: zipfile.ZipFile, file: str, member: Member, what: str) -> np.ndarray:
    with archive.open(file) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ZipjaxError(f"{what} has an unknown npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ZipjaxError(f"{what} holds Python objects (pickled data), which zipjax never loads")
        if dtype.name not in member.dtypes:
            raise ZipjaxError(f"{what} has dtype {dtype.name}, expected {' or '.join(member.dtypes)}")
        fits = len(shape) == len(member.shape) and all(
            d == m if isinstance(m, int) else d in m for d, m in zip(shape, member.shape, strict=False))
        if not fits:
            want = tuple(m if isinstance(m, int) else f"{m.start}..{m.stop - 1}" for m in member.shape)
            raise ZipjaxError(f"{what} has shape {tuple(shape)}, expected {want}")
        nbytes = math.prod(shape) * dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ZipjaxError(f"{what} is truncated: {len(data):,} of {nbytes:,} bytes")
        if f.read(1):
            raise ZipjaxError(f"{what} holds more data than its shape {tuple(shape)}")
    array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array)
