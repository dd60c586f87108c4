"""Harness: offline text domains for training and evaluating expert models: text every Python installation ships.

ME-Switch evaluates experts fine-tuned from one base on distinct domains (instruction, math, code). No package here
ships a family of fine-tunes, so zipjax makes its own experts on three domains the interpreter itself carries, which
any machine can rebuild without a download (zipjax's choice; the paper's data are not available):

- ``prose``: English reference text, the ``pydoc_data.topics`` help topics (one document per topic);
- ``c``: C declarations, the CPython headers in sysconfig's ``include`` directory (one document per ``.h`` file);
- ``tests``: Python test code, the standard library's ``test/`` package (one document per ``.py`` file).

Documents are split into train and held-out by a hash of their name, never by position, so the split does not
depend on file order or on how many files an installation has. For ``tests`` the rule is exactly the one
``checkpoints/train_stdlib_llama.py`` used (sha1 of the path relative to the stdlib, modulo 50), so held-out test
files were never seen by the shipped base model either; ``prose`` and ``c`` hold out one document in eight.

The headers are missing where Python was installed without its development files (a Debian ``python3`` without
``python3-dev``, say): then the ``c`` domain raises a ZipjaxError saying so. The shipped fixture
(``checkpoints/stdlib-experts``) carries its held-out windows, so its tests never need these files.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zipjax.errors import ZipjaxError

DOMAINS = ("prose", "c", "tests")
DESCRIPTIONS = {
    "prose": "pydoc_data.topics help topics (English reference prose)",
    "c": "CPython headers under sysconfig's include directory (C)",
    "tests": "the standard library's test/ package (Python test code)",
}
# documents held out: hash % modulus == 0
HOLDOUT_MODULUS = {"prose": 8, "c": 8, "tests": 50}


def _hash(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16)


def _prose() -> Iterator[tuple[str, str]]:
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield key, pydoc_data.topics.topics[key]


def include_dir() -> Path:
    return Path(sysconfig.get_paths()["include"])


def _c() -> Iterator[tuple[str, str]]:
    root = include_dir()
    headers = sorted(root.rglob("*.h")) if root.is_dir() else []
    if not headers:
        raise ZipjaxError(
            f"the 'c' domain needs the CPython headers, and {root} holds none (Python was installed without its "
            "development files, e.g. Debian's python3-dev); install them or use the other domains"
        )
    for path in headers:
        try:
            yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _tests() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = stdlib / "test"
    files = sorted(root.rglob("*.py")) if root.is_dir() else []
    if not files:
        raise ZipjaxError(f"the 'tests' domain needs the standard library's test package, and {root} has no files")
    for path in files:
        try:
            yield path.relative_to(stdlib).as_posix(), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


_SOURCES = {"prose": _prose, "c": _c, "tests": _tests}


def documents(domain: str, split: str, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(name, text) of the domain's documents in `split` ("train" or "heldout"), in hash order (a deterministic
    shuffle), stopping once `max_chars` characters are collected (None: all)."""
    if domain not in _SOURCES:
        raise ZipjaxError(f"unknown domain {domain!r}; the domains are {', '.join(DOMAINS)}")
    if split not in ("train", "heldout"):
        raise ZipjaxError(f"split must be 'train' or 'heldout', got {split!r}")
    modulus = HOLDOUT_MODULUS[domain]
    docs = [(name, text) for name, text in _SOURCES[domain]()
            if (_hash(name) % modulus == 0) == (split == "heldout") and text.strip()]
    docs.sort(key=lambda d: _hash(d[0]))
    if max_chars is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc[1])
    return out


def token_stream(tokenizer, texts: list[str], bos: int | None, eos: int) -> np.ndarray:
    """One int32 stream [n]: (bos) text eos (bos) text eos ..., encoded without the tokenizer's own specials."""
    parts = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        parts.append(np.array(([bos] if bos is not None else []) + ids + [eos], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def domain_stream(model, domain: str, split: str, max_chars: int | None = None) -> np.ndarray:
    """The domain's `split` documents as one token stream int32 [n] in `model`'s tokenizer, framed by its BOS (if
    the config has one) and first EOS token."""
    cfg = model.config
    texts = [text for _, text in documents(domain, split, max_chars)]
    return token_stream(model.tokenizer, texts, cfg.bos_token_id, cfg.eos_token_ids[0])


def windows(stream: np.ndarray, seq: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows int32 [count, seq + 1] (inputs plus the next-token targets), spread evenly over the
    stream (all that fit when `count` is None or larger)."""
    fit = (len(stream) - 1) // seq
    if fit < 1:
        raise ZipjaxError(f"a stream of {len(stream)} tokens holds no window of {seq + 1}")
    count = fit if count is None else min(count, fit)
    starts = (np.arange(count) * fit // count) * seq  # evenly spaced slots among the `fit` non-overlapping ones
    return np.stack([stream[s: s + seq + 1] for s in starts]).astype(np.int32)
