"""Which files of a source folder a conversion may read or copy.

A name given by the source (a shard listed in an index, a tokenizer file) must stay inside the source folder: no
absolute paths, no `..`. A symbolic link is followed only to a file inside the source folder, or into the `blobs/`
folder of the Hugging Face cache repository the folder is a snapshot of (`models--ORG--NAME/snapshots/REV/x` ->
`../../blobs/HASH`, how the hub cache stores every file); a link anywhere else (`tokenizer.json` -> `~/.ssh/id_rsa`)
is refused by name, so nothing outside the model can end up inside a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from zipjax.errors import ZipjaxError
from zipjax.tokenizer import TOKENIZER_FILES

__all__ = ["TOKENIZER_FILES", "existing_files", "source_file"]


def _allowed_roots(src: Path) -> list[Path]:
    roots = [src.resolve()]
    if src.parent.name == "snapshots":  # a Hugging Face cache snapshot
        roots.append((src.parent.parent / "blobs").resolve())
    return roots


def source_file(src: Path, name: str, what: str = "file") -> Path:
    """`src / name` after checking that the name and any link stay inside the source (see the module docstring)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ZipjaxError(f"{src}: the {what} name {name!r} points outside the source folder")
    path = src / relative
    target = path.resolve()
    if not any(target == root or root in target.parents for root in _allowed_roots(src)):
        raise ZipjaxError(f"{path} links to {target}, outside the source folder; zipjax does not follow it")
    if path.is_symlink() and not target.is_file():
        raise ZipjaxError(f"{path} is a broken link")
    return path


def existing_files(src: Path, names: tuple[str, ...]) -> list[Path]:
    """The files among `names` that exist in `src` (each checked by `source_file`)."""
    return [source_file(src, name) for name in names if (src / name).is_file() or (src / name).is_symlink()]
