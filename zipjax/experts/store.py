"""An expert bank on disk: a folder beside the base checkpoint.

    BANK/bank.json    {"format": "zipjax-expert-bank", "version": 1, "names": [...], "bits": 2, "embed_bits": 4,
                       "base_fingerprint": sha256, "settings": {...}, "sites": {name: {"widths": [...]}},
                       "norms": [...], "nbytes": {...}, "arrays": {"file": "arrays.npz", "size": n, "sha256": h}}
    BANK/arrays.npz   every array, uncompressed, keyed "linear:<site>:<field>" and "norm:<name>"

Why npz and not orbax (which zipjax.checkpoint uses for parameters): a bank is a few MB to a few GB of small,
mostly uint8 arrays that are read whole; one npz file is bit-exact, needs no tensorstore, diffs as one blob in a
repository (the shipped stdlib-llama bank) and is checked by one SHA-256 at load. Orbax's sharded restore matters
for base weights that do not fit one host, which a bank does not approach. Writes go through
zipjax.destination (atomic replace, one writer, only a bank folder is ever overwritten).

`load` refuses a bank built on other base weights (the fingerprint of zipjax.experts.fingerprint), a folder that is
missing or not a bank, another format version, and arrays whose size or hash differ from the record.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, LinearDelta, get_path, place_bank, sites
from zipjax.experts.bankfile import ARRAYS, FIELDS, FORMAT, MANIFEST, VERSION, _sha256, save
from zipjax.experts.fingerprint import fingerprint
from zipjax.model import Model

__all__ = ["load", "save"]

def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise ZipjaxError(f"expert bank not found: {path}")
    if not path.is_dir():
        raise ZipjaxError(f"{path} is not an expert bank folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ZipjaxError(f"{path} is not a zipjax expert bank (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ZipjaxError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ZipjaxError(f"{manifest_path} is not a zipjax expert bank manifest")
    if manifest.get("version") != VERSION:
        raise ZipjaxError(f"{path} has expert bank format version {manifest.get('version')!r:.20}; this zipjax reads "
                          f"version {VERSION}")
    return manifest


def load(path: str | Path, base: Model) -> ExpertBank:
    """The bank in folder `path`, checked against `base` (its weights' fingerprint and its sites), placed like
    the base's parameters (on its mesh, if it has one)."""
    path = Path(path).expanduser().absolute()
    manifest = read_manifest(path)
    try:
        names, bits, embed_bits = list(manifest["names"]), int(manifest["bits"]), int(manifest["embed_bits"])
        stored_fingerprint, site_info = str(manifest["base_fingerprint"]), dict(manifest["sites"])
        norm_names, record = list(manifest["norms"]), dict(manifest["arrays"])
        settings = tuple((str(k), str(v)) for k, v in dict(manifest.get("settings", {})).items())
    except (KeyError, TypeError, ValueError) as e:
        raise ZipjaxError(f"{path / MANIFEST} is malformed ({type(e).__name__}: {e})") from None
    if stored_fingerprint != fingerprint(base.params):
        raise ZipjaxError(f"the expert bank {path} was built on other base weights (fingerprint "
                          f"{stored_fingerprint[:12]}...) than the given base ({fingerprint(base.params)[:12]}...); "
                          "a delta is only valid on the exact weights it was taken from")
    if set(site_info) != set(sites(base.config)):
        raise ZipjaxError(f"the expert bank {path} does not cover this base's weights (sites differ)")
    arrays_path = path / ARRAYS
    if not arrays_path.is_file():
        raise ZipjaxError(f"the expert bank {path} has no {ARRAYS}: the bank is incomplete")
    if arrays_path.stat().st_size != record.get("size") or _sha256(arrays_path) != record.get("sha256"):
        raise ZipjaxError(f"{arrays_path} does not match its recorded size and SHA-256 (damaged or truncated)")
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ZipjaxError(f"cannot read {arrays_path} ({type(e).__name__}: {e})") from None
    try:
        linears = {
            name: LinearDelta(
                planes=tuple(arrays[f"linear:{name}:plane{p}"] for p in range(len(info["widths"]))),
                **{field: arrays[f"linear:{name}:{field}"] for field in FIELDS},
                widths=tuple(int(w) for w in info["widths"]),
            )
            for name, info in site_info.items()
        }
        norms = {name: arrays[f"norm:{name}"] for name in norm_names}
    except KeyError as e:
        raise ZipjaxError(f"{arrays_path} lacks the array {e}") from None
    bank = ExpertBank(linears=linears, norms=norms, names=tuple(names), bits=bits, embed_bits=embed_bits,
                      base_fingerprint=stored_fingerprint, settings=settings)
    check_shapes(bank, base)
    return place_bank(bank, base.config, base.mesh)


def check_shapes(bank: ExpertBank, base: Model) -> None:
    """Every site's arrays must have the shapes the base's weights imply."""
    num = bank.num_experts
    for name, site in sites(base.config).items():
        w = site.to_view(get_path(base.params, site.path))
        n_in, n_out = w.shape
        d = bank.linears[name]
        k = d.salient_idx.shape[-1] if d.salient_idx.ndim == 2 else -1
        expected = {"step": (num, n_out), "minimum": (num, n_out), "salient_idx": (num, k),
                    "salient_rows": (num, k, n_out)}
        expected.update({f"plane{p}": (num, n_in * wd // 8, n_out) for p, wd in enumerate(d.widths)})
        actual = {f: getattr(d, f).shape for f in FIELDS}
        actual.update({f"plane{p}": x.shape for p, x in enumerate(d.planes)})
        for field, shape in expected.items():
            if tuple(actual[field]) != shape:
                raise ZipjaxError(f"expert bank site {name} {field} has shape {tuple(actual[field])}, the base "
                                  f"implies {shape}")
