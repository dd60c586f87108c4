"""Renamed public names kept for one release: the old keyword and attribute still work and warn once per process.

    @renamed_fields(window="lag")
    @dataclasses.dataclass(frozen=True)
    class FixedWindow: ...

`FixedWindow(window=7)` is then `FixedWindow(lag=7)`, and `decoder.window` reads `decoder.lag`, each with one
DeprecationWarning naming the new spelling; both spellings at once are refused. Imports: errors.
"""

from __future__ import annotations

import functools
import warnings

from zipjax.errors import ZipjaxError

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """A DeprecationWarning with `message`, the first time this process asks for it (stacklevel: the caller's)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def renamed_fields(**renames: str):
    """Class decorator (above @dataclass) mapping each deprecated field name to its new name: the old keyword in the
    constructor and the old attribute both reach the new field, warning once. Subclasses that are dataclasses of
    their own need the decorator again (their __init__ is their own)."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ZipjaxError(f"{cls.__name__} takes {new}= (formerly {old}=), not both")
                    warn_once(f"{cls.__name__}({old}=...) is deprecated: it is {cls.__name__}({new}=...)", 2)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for old, new in renames.items():
            setattr(cls, old, property(functools.partial(_read_renamed, old=old, new=new),
                                       doc=f"Deprecated: the field `{new}`."))
        return cls

    return decorate


def _read_renamed(obj, *, old: str, new: str):
    warn_once(f"{type(obj).__name__}.{old} is deprecated: it is {type(obj).__name__}.{new}")
    return getattr(obj, new)
