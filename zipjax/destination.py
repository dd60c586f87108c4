"""Writing a folder (a converted checkpoint, an exported model) without ever losing what the user owns.

    with Destination(dst, overwrite=True, kind=CHECKPOINT, sources=[src]) as staging:
        ...write everything into `staging`...
    # on success `dst` is replaced in one atomic step; on any failure or Ctrl-C nothing of it remains

The rules, each checked before anything is written:
- paths are resolved (symlinks, `..`) before they are compared; an empty destination is refused (it would be the
  current folder);
- the destination must not be, contain, or lie inside a source;
- an existing destination is replaced only with `overwrite`, and only if it is what this kind of write produces
  (a zipjax checkpoint, a folder zipjax exported, an expert bank) or an empty folder, and holds nothing but the
  files such a write produced (its own record of them): a README, a router or any other file the user put there
  makes the replacement a refusal that names it, never a deletion;
- one writer per destination: a lock file beside it (`.NAME.lock`, held with flock for the whole write; the kernel
  releases it if the process dies), so a second conversion to the same place is refused instead of silently
  replacing the first;
- everything is written into a staging folder beside the destination (`.NAME.partial-PID`); staging folders left by
  killed runs are removed by the next run that takes the lock;
- the swap is atomic: `renameat2(RENAME_EXCHANGE)` exchanges the staging folder and the old destination in one
  step, then the old one is deleted. Where the filesystem cannot exchange (not Linux, some network or overlay
  filesystems) the old folder is first renamed to `.NAME.old-PID`; if the run dies between the two renames, the
  next run that takes the lock finds no destination and an `.old-*` folder, and puts it back.

A leaf: imports errors only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from zipjax.errors import ZipjaxError

CHECKPOINT_MANIFEST = "zipjax.json"
EXPORT_MARKER = "zipjax-export.json"


def is_zipjax_checkpoint(path: Path) -> bool:
    """A folder holding a zipjax manifest (the format field is what marks it, not the file name alone)."""
    return _json_field(path / CHECKPOINT_MANIFEST, "format") == "zipjax-checkpoint"


def is_zipjax_export(path: Path) -> bool:
    return _json_field(path / EXPORT_MARKER, "format") == "zipjax-export"


def _json_field(path: Path, key: str, limit: int = 1 << 20):
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data.get(key) if isinstance(data, dict) else None


@dataclass(frozen=True)
class Kind:
    """What a write produces: its name in messages, the test that an existing folder is one, and the files such a
    folder may hold (paths relative to it, from the folder's own record), so that nothing else is ever deleted."""

    name: str
    is_kind: Callable[[Path], bool]
    written: Callable[[Path], set[str]]


def _checkpoint_files(path: Path) -> set[str]:
    """Every file a checkpoint write produced is recorded in its checksums.json (zipjax.checkpoint)."""
    record = _json_field(path / "checksums.json", "files", limit=64 << 20)
    if isinstance(record, dict):
        return {*record, "checksums.json"}
    # a checkpoint without a record: its manifest, the parameter folders and the tokenizer files
    parameters = {str(f.relative_to(path)) for sub in ("params", "vq_params") for f in (path / sub).rglob("*")}
    return {CHECKPOINT_MANIFEST, *parameters, *TOKENIZER_FILE_NAMES}


# the files a converter copies from a Hugging Face folder (zipjax.convert.files.TOKENIZER_FILES, and the generation
# config), and an export writes back
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                        "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json", "generation_config.json")


def _export_files(path: Path) -> set[str]:
    """An export lists its files in its marker; markers written before that: the fixed set export writes."""
    listed = _json_field(path / EXPORT_MARKER, "files")
    if isinstance(listed, list) and all(isinstance(f, str) for f in listed):
        return {*listed, EXPORT_MARKER}
    return {EXPORT_MARKER, "config.json", "model.safetensors", *TOKENIZER_FILE_NAMES}


CHECKPOINT = Kind("a zipjax checkpoint", is_zipjax_checkpoint, _checkpoint_files)
EXPORT = Kind("a folder zipjax exported", is_zipjax_export, _export_files)


def foreign_files(folder: Path, written: set[str]) -> list[str]:
    """Files (and links) under `folder` that are not in `written`, relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative not in written:
                found.append(relative)
    return sorted(found)


def resolve(path: str | Path, what: str) -> Path:
    """The absolute, symlink-free path; an empty string (an unset shell variable, say) is an error."""
    if str(path).strip() == "":
        raise ZipjaxError(f"the {what} path is empty")
    return Path(path).expanduser().resolve()


def check_apart(dst: Path, sources: Iterable[Path]) -> None:
    """Refuse a destination that is, contains, or lies inside a source (paths already resolved)."""
    for src in sources:
        if dst == src or dst in src.parents:
            raise ZipjaxError(f"the destination {dst} is or contains the source {src}; choose another destination")
        if src in dst.parents:
            raise ZipjaxError(f"the destination {dst} lies inside the source {src}; choose another destination")


class Destination:
    """Context manager: lock, check and stage a write to `dst`; `commit()` swaps the result in."""

    def __init__(self, dst: str | Path, *, overwrite: bool, kind: Kind, sources: Iterable[str | Path] = ()):
        self.path = resolve(dst, "destination")
        self.overwrite = overwrite
        self.kind = kind
        check_apart(self.path, [resolve(s, "source") for s in sources])
        self.staging: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> Path:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ZipjaxError(f"cannot create {self.path}: a part of {parent} is a file, not a folder") from None
        self._lock()
        try:
            self._recover_and_clean()
            self._check_existing()
            self.staging = parent / f".{self.path.name}.partial-{os.getpid()}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        staging = self.staging
        try:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            self._unlock()
        if isinstance(exc, OSError) and staging is not None:
            named = _named_for_user(exc, staging, self.path)
            if named is not exc:
                raise named from None

    def commit(self) -> Path:
        """Put the staged folder in place of the destination, atomically where the filesystem allows."""
        staging, dst = self.staging, self.path
        if not (dst.exists() or dst.is_symlink()):
            staging.rename(dst)
        elif _exchange(staging, dst):
            shutil.rmtree(staging, ignore_errors=True)  # it now holds the old destination
        else:
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            staging.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        self.staging = None
        return dst

    def preflight(self) -> None:
        """The checks of `__enter__` that need no lock, to fail before expensive work (they run again, locked)."""
        parent = next((p for p in (self.path.parent, *self.path.parent.parents) if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ZipjaxError(f"cannot create {self.path}: {parent} is a file, not a folder")
        self._check_existing()

    def _check_existing(self) -> None:
        dst = self.path
        if dst.is_symlink():
            raise ZipjaxError(f"the destination {dst} is a symbolic link; name the folder itself")
        if not dst.exists():
            return
        if not dst.is_dir():
            raise ZipjaxError(f"the destination {dst} exists and is a file; zipjax replaces only folders it wrote")
        empty = not any(dst.iterdir())
        if empty:
            return
        if not self.overwrite:
            raise ZipjaxError(f"destination {dst} already exists; pass --overwrite to replace it")
        if not self.kind.is_kind(dst):
            raise ZipjaxError(f"refusing to replace {dst}: it is not {self.kind.name}, and zipjax only replaces "
                              f"what it wrote; remove it yourself or choose another destination")
        foreign = foreign_files(dst, self.kind.written(dst))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ZipjaxError(f"refusing to replace {dst}: besides {self.kind.name} it holds {shown}, which zipjax "
                              f"did not write there; move them out or choose another destination")

    def _lock(self) -> None:
        lock_path = self.path.parent / f".{self.path.name}.lock"
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ZipjaxError(f"another zipjax process is writing {self.path}; wait for it to finish") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino  # not a file an exiting writer unlinked
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path.parent / f".{self.path.name}.lock")
        os.close(self._lock_fd)
        self._lock_fd = None

    def _recover_and_clean(self) -> None:
        """Under the lock nobody else writes here: a missing destination beside an `.old-*` folder is put back (a
        run died between the two renames of the fallback swap); staging folders of dead runs are removed."""
        parent, name = self.path.parent, self.path.name
        olds = sorted(parent.glob(f".{name}.old-*"))
        if olds and not self.path.exists():
            olds[-1].rename(self.path)
            olds = olds[:-1]
        for leftover in (*olds, *parent.glob(f".{name}.partial-*")):
            shutil.rmtree(leftover, ignore_errors=True)


def _named_for_user(error: OSError, staging: Path, dst: Path) -> OSError:
    """A write error names the user's destination: one that names no file (numpy's and zipfile's writes, say) is
    about `dst`; one that names a file in the hidden staging folder, about that file's place in `dst`."""
    if error.filename is None:
        return OSError(error.errno, error.strerror, str(dst)) if error.errno else error
    try:
        inside = Path(os.fsdecode(error.filename)).relative_to(staging)
    except (TypeError, ValueError):
        return error
    return OSError(error.errno, error.strerror, str(dst / inside)) if error.errno else error


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def interrupts_deferred(message: str = "finishing the write in progress, then stopping") -> Iterator[None]:
    """Hold Ctrl-C until the block is done (writers whose background threads cannot be stopped midway, such as
    orbax's), then raise KeyboardInterrupt. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:
            print(f"\n{message}", file=sys.stderr, flush=True)
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# how tensorstore (under orbax) and safetensors spell the operating system's error number in their own exceptions
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")


@contextlib.contextmanager
def os_errors_of_writers(path: Path, staging: Path | None = None) -> Iterator[None]:
    """The operating system's write errors (a full disk, a file-size limit, a read-only folder) that orbax and
    safetensors raise as their own exception types, with the error number only in the text, come out of this block
    as the OSError they are, so the command line reports them in one line like any other. Anything else passes
    through unchanged. orbax's threads also log the failure on the way: muted here, the OSError says it.

    When a write fails midway, orbax returns while tensorstore's threads still finish (or fail) the writes in
    flight, each then reporting to orbax's closed event loop ("Event loop is closed", printed as an unraisable
    exception) and possibly writing into `staging` after it was removed. So on failure this waits until the
    writers have settled (`settle`), with those reports muted, before the error leaves the block and the staging
    folder is removed."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        with _orphan_reports_muted() as reports:
            try:
                yield
            except Exception:
                if staging is not None:
                    settle(staging, reports)
                raise
    except Exception as e:
        match = _OS_ERROR_CODE.search(str(e))
        if match is None:
            raise
        code = int(match.group(1) or match.group(2))
        raise OSError(code, os.strerror(code), str(path)) from None
    finally:
        absl.setLevel(level)


def _is_orphan_report(unraisable) -> bool:
    """A background thread's callback that found its asyncio event loop closed: the write it belonged to was
    abandoned by a failure that is reported on its own."""
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@contextlib.contextmanager
def _orphan_reports_muted() -> Iterator[list[float]]:
    """Within the block, orphan reports (`_is_orphan_report`) are counted (the list of their times) instead of
    printed; every other unraisable exception goes to the hook that was in place."""
    previous = sys.unraisablehook
    reports: list[float] = []

    def hook(unraisable) -> None:
        if _is_orphan_report(unraisable):
            reports.append(time.monotonic())
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield reports
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _tree_state(folder: Path) -> tuple:
    """Every file under `folder` with its size and modification time: changes while something writes there."""
    state = []
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                state.append((root, name, info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


def settle(folder: Path, reports: list, *, quiet: float = 0.5, limit: float = 60.0) -> bool:
    """Wait until nothing has changed under `folder` and no orphan report arrived for `quiet` seconds (writer
    threads of a failed write finishing), at most `limit` seconds. True if it settled."""
    deadline = time.monotonic() + limit
    last = (_tree_state(folder), len(reports))
    calm_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = (_tree_state(folder), len(reports))
        if now != last:
            last, calm_since = now, time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return True
    return False


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse a write of about `need` bytes into `folder` that the disk holding it cannot take, before writing
    anything (a write that fills the disk fails deep inside orbax's threads instead)."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ZipjaxError(f"{what} needs about {need / 2**30:.2f} GiB and the disk holding {folder} has "
                          f"{free / 2**30:.2f} GiB free")
