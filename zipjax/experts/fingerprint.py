"""A fingerprint of a base model's weights: what expert deltas and banks record, so that they are never applied to
another base.

A delta is only meaningful on the exact weights it was taken from: on another base (a different fine-tune of the
same architecture, another dtype's rounding) base + delta is a silently wrong model. The fingerprint hashes every
parameter's path, shape, dtype and bytes, so it identifies the weights, not just the architecture. It is computed
from the weights as loaded (float32 and bfloat16 copies of one checkpoint differ, on purpose).
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from zipjax.sharding import to_host


def fingerprint(params) -> str:
    """sha256 hex digest of a parameter pytree (every leaf's path, shape, dtype and bytes, in path order)."""
    digest = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda item: jax.tree_util.keystr(item[0]))
    for path, leaf in leaves:
        array = np.ascontiguousarray(to_host(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
