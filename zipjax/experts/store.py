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
missing or not a bank, another format version, arrays whose size or hash differ from the record, and (a hostile
bank carries a consistent hash) any manifest field of the wrong type or range, any array member the manifest does
not name, of another dtype or shape than the manifest and the base imply (checked from its npy header before its
data is read: zipjax.validate.npz_arrays), non-finite values and salient indices out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from zipjax import validate
from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, LinearDelta, get_path, norm_paths, place_bank, sites
from zipjax.experts.bankfile import ARRAYS, FIELDS, FORMAT, MANIFEST, VERSION, _sha256, save
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.quantize import check_packable, plane_widths
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
    return validate.manifest(manifest_path, FORMAT, (VERSION,), "zipjax expert bank")


@dataclass(frozen=True)
class _Fields:
    """bank.json's fields, each checked by type and range."""

    names: tuple[str, ...]
    bits: int
    embed_bits: int
    fingerprint: str
    widths: dict[str, tuple[int, ...]]  # site name -> plane widths
    norms: tuple[str, ...]
    size: int
    sha256: str
    settings: tuple[tuple[str, str], ...]


def _fields(manifest: dict, where: Path) -> _Fields:
    names = validate.names(manifest.get("names"), f"{where} names", reserved=("auto",))
    bits = validate.integer(manifest.get("bits"), f"{where} bits", lo=1, hi=4)
    embed_bits = validate.integer(manifest.get("embed_bits"), f"{where} embed_bits", lo=1, hi=4)
    fingerprint_ = _hex64(manifest.get("base_fingerprint"), f"{where} base_fingerprint")
    site_info = validate.mapping(manifest.get("sites"), f"{where} sites")
    widths = {}
    for name, info in site_info.items():
        info = validate.mapping(info, f"{where} site {name!r:.60}")
        want = plane_widths(embed_bits if name in ("embed", "lm_head") else bits)
        got = validate.integers(info.get("widths"), f"{where} site {name!r:.60} widths", lo=1, hi=8, max_items=4)
        if got != want:
            raise ZipjaxError(f"{where} site {name!r:.60} has plane widths {list(got)}; its bits imply {list(want)}")
        widths[name] = got
    norms = validate.names(manifest.get("norms"), f"{where} norms")
    record = validate.mapping(manifest.get("arrays"), f"{where} arrays")
    if record.get("file") != ARRAYS:
        raise ZipjaxError(f"{where} arrays names the file {record.get('file')!r:.60}, not {ARRAYS}")
    size = validate.integer(record.get("size"), f"{where} arrays size", lo=0)
    settings = validate.mapping(manifest.get("settings", {}), f"{where} settings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items()):
        raise ZipjaxError(f"{where} settings must map names to strings")
    return _Fields(names, bits, embed_bits, fingerprint_, widths, norms, size,
                   _hex64(record.get("sha256"), f"{where} arrays sha256"), tuple(settings.items()))


def _hex64(value, name: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or set(value) - set("0123456789abcdef"):
        raise ZipjaxError(f"{name} must be a SHA-256 (64 hex digits), got {value!r:.60}")
    return value


def load(path: str | Path, base: Model) -> ExpertBank:
    """The bank in folder `path`, checked against `base` (its weights' fingerprint and its sites), placed like
    the base's parameters (on its mesh, if it has one). Every manifest field is checked by type and range, every
    array's dtype and shape against what the manifest and the base imply before its data is read, and its values
    (finite, salient indices in range) after."""
    path = Path(path).expanduser().absolute()
    fields = _fields(read_manifest(path), path / MANIFEST)
    if fields.fingerprint != fingerprint(base.params):
        raise ZipjaxError(f"the expert bank {path} was built on other base weights (fingerprint "
                          f"{fields.fingerprint[:12]}...) than the given base ({fingerprint(base.params)[:12]}...); "
                          "a delta is only valid on the exact weights it was taken from")
    site_defs = sites(base.config)
    if set(fields.widths) != set(site_defs):
        raise ZipjaxError(f"the expert bank {path} does not cover this base's weights (sites differ)")
    if set(fields.norms) != set(norm_paths(base.config)) or len(fields.norms) != len(norm_paths(base.config)):
        raise ZipjaxError(f"the expert bank {path} does not cover this base's norms (norms differ)")
    arrays_path = path / ARRAYS
    if not arrays_path.is_file():
        raise ZipjaxError(f"the expert bank {path} has no {ARRAYS}: the bank is incomplete")
    if arrays_path.stat().st_size != fields.size or _sha256(arrays_path) != fields.sha256:
        raise ZipjaxError(f"{arrays_path} does not match its recorded size and SHA-256 (damaged or truncated)")
    views = {name: jax.eval_shape(site.to_view, get_path(base.params, site.path)).shape
             for name, site in site_defs.items()}
    arrays = validate.npz_arrays(arrays_path, _members(fields, views, base), "zipjax expert bank")
    linears = {name: _site(name, arrays, fields.widths[name], views[name], arrays_path)
               for name in site_defs}
    norms = {name: _finite(arrays[f"norm:{name}"], f"{arrays_path}: norm {name}") for name in fields.norms}
    bank = ExpertBank(linears=linears, norms=norms, names=fields.names, bits=fields.bits,
                      embed_bits=fields.embed_bits, base_fingerprint=fields.fingerprint, settings=fields.settings)
    return place_bank(bank, base.config, base.mesh)


def _members(fields: _Fields, views: dict[str, tuple[int, int]], base: Model) -> dict[str, validate.Member]:
    """What every array of the bank must be, from the manifest and the base: [E, ...] for E experts."""
    num = len(fields.names)
    members = {}
    for name, (n_in, n_out) in views.items():
        check_packable(n_in, fields.widths[name], f"expert bank site {name}")
        for p, w in enumerate(fields.widths[name]):
            members[f"linear:{name}:plane{p}"] = validate.Member((num, n_in * w // 8, n_out), ("uint8",))
        members[f"linear:{name}:step"] = validate.Member((num, n_out), ("float16",))
        members[f"linear:{name}:minimum"] = validate.Member((num, n_out), ("float16",))
        members[f"linear:{name}:salient_idx"] = validate.Member((num, range(n_in + 1)), ("int32",))
        members[f"linear:{name}:salient_rows"] = validate.Member((num, range(n_in + 1), n_out), ("float16",))
    for name, norm_path in norm_paths(base.config).items():
        members[f"norm:{name}"] = validate.Member((num, *get_path(base.params, norm_path).shape), ("float32",))
    return members


def _site(name: str, arrays: dict[str, np.ndarray], widths: tuple[int, ...], view: tuple[int, int],
          where: Path) -> LinearDelta:
    what = f"{where}: site {name}"
    key = f"linear:{name}:"
    idx, rows = arrays[key + "salient_idx"], arrays[key + "salient_rows"]
    if rows.shape[1] != idx.shape[1]:
        raise ZipjaxError(f"{what} has {idx.shape[1]} salient indices but {rows.shape[1]} salient rows")
    if idx.size and (idx.min() < 0 or idx.max() >= view[0]):
        raise ZipjaxError(f"{what} has salient indices outside [0, {view[0]})")
    if idx.shape[1] > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise ZipjaxError(f"{what} names a salient input channel twice")
    return LinearDelta(planes=tuple(arrays[f"{key}plane{p}"] for p in range(len(widths))),
                       step=_finite(arrays[key + "step"], f"{what} step"),
                       minimum=_finite(arrays[key + "minimum"], f"{what} minimum"),
                       salient_idx=idx, salient_rows=_finite(rows, f"{what} salient rows"), widths=widths)


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ZipjaxError(f"{what} holds NaN or infinite values")
    return array


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
