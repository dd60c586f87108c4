"""Writing an expert bank folder (the format is described in zipjax.experts.store, which reads it back).

Separate from store so that `ExpertBank.save` (zipjax.experts.bank) can write without importing the reader, which
builds banks: the bank reaches this module only through its attributes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from zipjax.destination import Destination, _json_field
from zipjax.sharding import one_writer, to_host

FORMAT = "zipjax-expert-bank"
VERSION = 1
MANIFEST = "bank.json"
ARRAYS = "arrays.npz"
FIELDS = ("step", "minimum", "salient_idx", "salient_rows")


def is_bank(path: Path) -> bool:
    return _json_field(path / MANIFEST, "format") == FORMAT


BANK = ("a zipjax expert bank", is_bank)


def save(bank, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `bank` to the folder `path` (the format: zipjax.experts.store); returns the resolved path."""
    return one_writer(lambda: _write(bank, path, overwrite), lambda: Path(path).resolve(), f"writing {path}")


def _write(bank, path: str | Path, overwrite: bool) -> Path:
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
    destination = Destination(path, overwrite=overwrite, kind=BANK)
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
