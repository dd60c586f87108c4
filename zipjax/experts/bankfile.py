"""Writing an expert bank folder (the format is described in zipjax.experts.store, which reads it back).

Separate from store so that `ExpertBank.save` (zipjax.experts.bank) can write without importing the reader, which
builds banks: the bank reaches this module only through its attributes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from zipjax.destination import Destination, Kind, _json_field, resolve
from zipjax.sharding import one_writer, to_host

FORMAT = "zipjax-expert-bank"
VERSION = 1
MANIFEST = "bank.json"
ARRAYS = "arrays.npz"
FIELDS = ("step", "minimum", "salient_idx", "salient_rows")


def is_bank(path: Path) -> bool:
    return _json_field(path / MANIFEST, "format") == FORMAT


# a router saved in the bank's folder (zipjax.experts.router) is not part of what a bank write produces, so an
# overwrite refuses to delete it
BANK = Kind("a zipjax expert bank", is_bank, lambda path: {MANIFEST, ARRAYS})


def save(bank, path: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Path:
    """Write `bank` to the folder `path` (the format: zipjax.experts.store); returns the resolved path. The folders
    the bank was compressed from (`bank.sources`, and `sources`) are inputs: the bank may not be, contain or lie
    inside any of them."""
    sources = [*bank.sources, *sources]
    return one_writer(lambda: _write(bank, path, overwrite, sources), lambda: resolve(path, "destination"),
                      f"writing {path}")


def check_destination(path: str | Path, *, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """The checks `save` makes before writing, for callers that want to fail before compressing."""
    Destination(path, overwrite=overwrite, kind=BANK, sources=sources).preflight()


def _write(bank, path: str | Path, overwrite: bool, sources: list[str | Path]) -> Path:
    arrays: dict[str, np.ndarray] = {}
    site_info = {}
    for name, site in bank.linears.items():
        for p, plane in enumerate(site.planes):
            arrays[f"linear:{name}:plane{p}"] = np.asarray(to_host(plane))
        for field in FIELDS:
            arrays[f"linear:{name}:{field}"] = np.asarray(to_host(getattr(site, field)))
        site_info[name] = {"widths": list(site.widths)}
    for name, value in bank.norms.items():
        arrays[f"norm:{name}"] = np.asarray(to_host(value))
    destination = Destination(path, overwrite=overwrite, kind=BANK, sources=sources)
    with destination as staging:
        np.savez(staging / ARRAYS, **arrays)
        manifest = {
            "format": FORMAT, "version": VERSION, "names": list(bank.names), "bits": bank.bits,
            "embed_bits": bank.embed_bits, "base_fingerprint": bank.base_fingerprint,
            "settings": dict(bank.settings), "sites": site_info, "norms": list(bank.norms),
            "nbytes": bank.nbytes(),
            "arrays": {"file": ARRAYS, "size": (staging / ARRAYS).stat().st_size, "sha256": _sha256(staging / ARRAYS)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return destination.commit()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
